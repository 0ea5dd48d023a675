"""``objectives.grpo`` against TRL 1.16's own GRPOTrainer loss, and the group advantage against its formula.

TRL's trainer is built on the tiny Llama (perturbed with seeded noise, as in ``test_preference_trl``) with a reward
function that is never called; one fixed batch (prompts, completions of different lengths, advantages, old and
reference log-probabilities a seeded perturbation of the model's own, so that ratios move off 1 and the clip binds)
goes through its ``_compute_loss``; ours reads the same token log-probabilities from a float64 copy of the model
and gives :func:`objectives.grpo.per_token_loss` and :func:`objectives.grpo.aggregate`. Every aggregation TRL and we
share, with the KL term, clip-higher, two-sided clipping and GSPO's sequence ratio, agrees to 1e-5.
"""

from __future__ import annotations

import copy
import random

import numpy as np
import pytest
import torch

pytest.importorskip("trl")

from datasets import Dataset  # noqa: E402
from test_preference_trl import NOISE, TOLERANCE, _perturbed_llama  # noqa: E402

from objectives.grpo import GRPO_LOSSES, aggregate, group_advantages, per_token_loss  # noqa: E402

B, PROMPT, T = 6, 5, 7


def _fixed_batch(vocab: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    lengths = torch.tensor([7, 3, 5, 1, 6, 4])
    completion_mask = (torch.arange(T)[None] < lengths[:, None]).long()
    prompt_mask = torch.ones(B, PROMPT, dtype=torch.long)
    prompt_mask[1, :2] = 0  # left padding, as TRL's prompts
    return {"prompt_ids": torch.randint(3, vocab, (B, PROMPT), generator=g), "prompt_mask": prompt_mask,
            "completion_ids": torch.randint(3, vocab, (B, T), generator=g), "completion_mask": completion_mask,
            "advantages": torch.randn(B, generator=g)}


def _token_log_probs(model, batch) -> torch.Tensor:
    ids = torch.cat([batch["prompt_ids"], batch["completion_ids"]], 1)
    attention = torch.cat([batch["prompt_mask"], batch["completion_mask"]], 1)
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=attention).logits.double()
    token = torch.log_softmax(logits[:, :-1], -1).gather(-1, ids[:, 1:, None]).squeeze(-1)
    return token[:, -T:]


CASES = [pytest.param({"loss_type": name}, id=name) for name in GRPO_LOSSES] + [
    pytest.param({"loss_type": "grpo", "beta": 0.04}, id="grpo-kl"),
    pytest.param({"loss_type": "grpo", "beta": 0.04, "use_bias_correction_kl": False}, id="grpo-kl-uncorrected"),
    pytest.param({"loss_type": "dapo", "beta": 0.1, "epsilon_high": 0.28}, id="dapo-kl-clip-higher"),
    pytest.param({"loss_type": "bnpo", "delta": 1.5, "epsilon": 0.1}, id="bnpo-two-sided"),
    pytest.param({"loss_type": "grpo", "importance_sampling_level": "sequence", "epsilon": 3e-4,
                  "epsilon_high": 4e-4}, id="gspo"),
    pytest.param({"loss_type": "dr_grpo", "beta": 0.02, "importance_sampling_level": "sequence"}, id="dr_grpo-seq"),
    pytest.param({"loss_type": "cispo", "epsilon_high": 1.1}, id="cispo-cap"),
]


@pytest.mark.parametrize("settings", CASES)
def test_every_grpo_loss_equals_trls(settings, tiny_model_dir, tiny_tokenizer, tmp_path):
    from trl import GRPOConfig, GRPOTrainer

    policy = _perturbed_llama(tiny_model_dir, seed=1)
    batch = _fixed_batch(len(tiny_tokenizer))
    ours_model = copy.deepcopy(policy).double()
    log_pi = _token_log_probs(ours_model, batch)
    g = torch.Generator().manual_seed(5)
    old = log_pi + 0.3 * torch.randn(log_pi.shape, generator=g, dtype=torch.float64)
    ref = log_pi + 0.5 * torch.randn(log_pi.shape, generator=g, dtype=torch.float64)
    inputs = dict(batch, old_per_token_logps=old.float(), ref_per_token_logps=ref.float(),
                  num_items_in_batch=batch["completion_mask"].sum())

    python_state, numpy_state = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=[]):
        args = GRPOConfig(output_dir=str(tmp_path), report_to=[], use_cpu=True, bf16=False,
                          per_device_train_batch_size=B, num_generations=3, max_completion_length=T, **settings)
        trainer = GRPOTrainer(model=policy, reward_funcs=lambda completions, **kw: [0.0] * len(completions),
                              args=args, train_dataset=Dataset.from_dict({"prompt": ["a b", "c d"] * 3}),
                              processing_class=tiny_tokenizer)
        trainer.model.eval()  # eval: no gradient-accumulation division (one micro-batch here)
        with torch.no_grad():
            theirs = float(trainer.compute_loss(trainer.model, inputs))
    random.setstate(python_state)
    np.random.set_state(numpy_state)

    mask = batch["completion_mask"].double()
    loss, _ = per_token_loss(log_pi, old.float().double(), batch["advantages"].double(), mask,
                             settings["loss_type"], settings.get("epsilon", 0.2), settings.get("epsilon_high"),
                             settings.get("delta"), settings.get("importance_sampling_level", "token"),
                             ref.float().double(), settings.get("beta", 0.0),
                             settings.get("use_bias_correction_kl", True))
    ours = float(aggregate(loss, mask, settings["loss_type"], n_sequences=B, n_tokens=float(mask.sum()),
                           max_completion_length=T))
    assert NOISE > 0 and abs(ours) > 1e-3
    assert ours == pytest.approx(theirs, abs=TOLERANCE, rel=TOLERANCE), settings


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_group_advantages_are_the_papers_formula(scale):
    rewards = torch.tensor([1.0, 0.0, 3.0, 2.0, 2.0, 2.0, -1.0, 4.0, 0.5], dtype=torch.float64)
    out = group_advantages(rewards, 3, scale)
    expected = []
    for i, r in enumerate(rewards.tolist()):
        group = rewards[3 * (i // 3): 3 * (i // 3) + 3].tolist()
        mean = sum(group) / 3
        std = {"group": np.std(group, ddof=1), "batch": np.std(rewards.tolist(), ddof=1), "none": None}[scale]
        expected.append((r - mean) if std is None else (r - mean) / (std + 1e-4))
    assert out.tolist() == pytest.approx(expected, abs=1e-12)
    assert out[3:6].abs().max() == 0  # a group of equal rewards teaches nothing


def test_bad_groups_are_refused():
    with pytest.raises(ValueError, match="groups of at least 2"):
        group_advantages(torch.zeros(5), 2)
    with pytest.raises(ValueError, match="unknown reward scaling"):
        group_advantages(torch.zeros(4), 2, "prompt")
