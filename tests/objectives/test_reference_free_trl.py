"""``objectives.reference_free`` against TRL 1.16's own CPOTrainer (CPO, SimPO) and ORPOTrainer on the same token ids.

As in ``test_preference_trl``: the tiny Llama perturbed with seeded noise (here only a policy: these losses have no
reference), TRL's trainer builds and collates one batch of the same four pairs, and its ``get_batch_loss_metrics``
gives its loss; our side reads the log-probabilities of the same label tokens from a float64 copy of the model
(``labels[:, 1:] != -100``: the response tokens, eos included), and our tensor functions give ours.

ORPO: TRL 1.16 takes the NLL over the prompt *and* the response ("computed over the full prompt and response", its
comment); the paper's :math:`\\mathcal L_{SFT}` (Hong et al. 2024, Eq. 2) and ours are over the response tokens. So
TRL's odds-ratio term (its loss minus its logged ``nll_loss``) is compared with ours to 1e-5, and the NLL of each is
checked against its own definition.
"""

from __future__ import annotations

import copy
import random

import numpy as np
import pytest
import torch

pytest.importorskip("trl")

from datasets import Dataset  # noqa: E402
from test_preference_trl import BETA, NOISE, PAIRS, TOLERANCE, _perturbed_llama  # noqa: E402

from objectives.reference_free import chosen_nll, orpo_odds_ratio_loss, reference_free_pair_loss  # noqa: E402

assert NOISE > 0


def _trl_batch_loss(kind: str, policy, tokenizer, output_dir, settings: dict):
    """TRL's loss and metrics on one collated batch of PAIRS, the batch, and the trainer (no training)."""
    if kind == "cpo":
        from trl.experimental.cpo import CPOConfig as Config
        from trl.experimental.cpo import CPOTrainer as Trainer
    else:
        from trl.experimental.orpo import ORPOConfig as Config
        from trl.experimental.orpo import ORPOTrainer as Trainer
    python_state, numpy_state = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=[]):
        args = Config(output_dir=str(output_dir), report_to=[], use_cpu=True, bf16=False, per_device_train_batch_size=4,
                      beta=BETA, max_length=64, **settings)
        trainer = Trainer(model=policy, args=args, train_dataset=Dataset.from_dict(PAIRS), processing_class=tokenizer)
        batch = next(iter(trainer.get_train_dataloader()))
        trainer.model.eval()
        with torch.no_grad():
            loss, metrics = trainer.get_batch_loss_metrics(trainer.model, batch)
    random.setstate(python_state)
    np.random.set_state(numpy_state)
    return float(loss), metrics, batch, trainer


def _token_log_probs(model, trainer, batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``[2N, T-1]`` float64 per-token log-probs of the label tokens, their mask, and the full attention mask."""
    pad = getattr(trainer, "pad_token_id", None)
    pad = trainer.padding_value if pad is None else pad
    cat = trainer.concatenated_inputs(batch, padding_value=pad)
    ids, attention = cat["concatenated_input_ids"], cat["concatenated_attention_mask"]
    labels = cat["concatenated_labels"]
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=attention).logits.double()
    token = torch.log_softmax(logits[:, :-1], -1).gather(-1, ids[:, 1:, None]).squeeze(-1)
    return token, (labels[:, 1:] != -100), attention[:, 1:].bool()


CPO_CASES = [
    pytest.param({"loss_type": "sigmoid", "cpo_alpha": 1.0}, {"loss": "cpo", "nll_coef": 1.0}, id="cpo"),
    pytest.param({"loss_type": "sigmoid", "cpo_alpha": 0.3, "label_smoothing": 0.1},
                 {"loss": "cpo", "nll_coef": 0.3, "label_smoothing": 0.1}, id="cpo-smoothed"),
    pytest.param({"loss_type": "simpo", "cpo_alpha": 0.0, "simpo_gamma": 0.5},
                 {"loss": "simpo", "simpo_gamma": 0.5}, id="simpo"),
    pytest.param({"loss_type": "simpo", "cpo_alpha": 0.0, "simpo_gamma": 1.4},
                 {"loss": "simpo", "simpo_gamma": 1.4}, id="simpo-gamma1.4"),
]


@pytest.mark.parametrize(("trl_settings", "ours"), CPO_CASES)
def test_cpo_and_simpo_match_trls_cpo_trainer(trl_settings, ours, tiny_model_dir, tiny_tokenizer, tmp_path):
    policy = _perturbed_llama(tiny_model_dir, seed=1)
    policy64 = copy.deepcopy(policy).double()
    trl_loss, _, batch, trainer = _trl_batch_loss("cpo", policy, copy.deepcopy(tiny_tokenizer), tmp_path, trl_settings)
    token, mask, _ = _token_log_probs(policy64, trainer, batch)
    seq = torch.where(mask, token, torch.zeros_like(token)).sum(-1)
    lengths = mask.sum(-1)
    (lw, ll), (nw, nl), (mw, _), (tw, _) = seq.chunk(2), lengths.chunk(2), mask.chunk(2), token.chunk(2)
    settings = dict(ours)
    loss, coef = settings.pop("loss"), settings.pop("nll_coef", 0.0)
    value = reference_free_pair_loss(loss, lw, ll, nw, nl, BETA, **settings).mean()
    if coef:
        value = value + coef * chosen_nll(tw, mw, float(mw.sum()))
    assert abs(float(value) - trl_loss) < TOLERANCE, f"ours {float(value)!r} vs TRL {trl_loss!r}"


def test_orpos_odds_ratio_term_matches_trls_orpo_trainer(tiny_model_dir, tiny_tokenizer, tmp_path):
    policy = _perturbed_llama(tiny_model_dir, seed=1)
    policy64 = copy.deepcopy(policy).double()
    trl_loss, metrics, batch, trainer = _trl_batch_loss("orpo", policy, copy.deepcopy(tiny_tokenizer), tmp_path, {})
    token, mask, attended = _token_log_probs(policy64, trainer, batch)
    seq = torch.where(mask, token, torch.zeros_like(token)).sum(-1)
    lengths = mask.sum(-1)
    (lw, ll), (nw, nl) = seq.chunk(2), lengths.chunk(2)
    ours = orpo_odds_ratio_loss(lw / nw, ll / nl, BETA).mean()
    trl_nll = float(metrics["nll_loss"])
    assert abs(float(ours) - (trl_loss - trl_nll)) < TOLERANCE
    # each NLL is its own definition: TRL's over prompt + response, ours (the paper's) over the response
    tw, mw, aw = token.chunk(2)[0], mask.chunk(2)[0], attended.chunk(2)[0]
    assert trl_nll == pytest.approx(float(-(tw[aw]).mean()), abs=TOLERANCE)
    assert float(chosen_nll(tw, mw, float(mw.sum()))) == pytest.approx(float(-(tw[mw]).mean()), abs=1e-12)
    assert float(ours) > 0.05
