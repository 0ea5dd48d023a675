"""``objectives.preference.preference_loss`` agrees with Hugging Face TRL's ``DPOTrainer`` on the same token ids.

TRL (checked against 1.16) has no standalone DPO loss function, so each case goes through its trainer:

1. the tiny random Llama of ``tiny_model_dir`` is loaded twice and each copy perturbed with its own seeded Gaussian
   noise (std ``NOISE`` on every weight), giving a policy and a reference that differ, so the log-ratios are of
   order 1 and no loss sits at its trivial value (``log 2`` for sigmoid); a float64 copy of each is kept for our side
   before TRL patches the models;
2. ``DPOTrainer(model=policy, ref_model=reference, args=DPOConfig(output_dir=tmp, report_to=[], use_cpu=True,
   bf16=False, per_device_train_batch_size=4, beta=BETA, loss_type=..., f_divergence_type=...,
   f_alpha_divergence_coef=..., label_smoothing=...), train_dataset=Dataset.from_dict({"prompt": [...], "chosen":
   [...], "rejected": [...]}), processing_class=tiny_tokenizer)``: plain-text pairs need no chat template; TRL
   appends the tokenizer's eos (``</s>``) to each response and tokenizes;
3. one collated batch, ``next(iter(trainer.get_train_dataloader()))``: ``input_ids``, ``attention_mask`` and
   ``completion_mask`` of ``2N`` rows, the ``N`` chosen sequences first, then the ``N`` rejected ones, right-padded;
4. ``trainer.model.eval()`` and, under ``torch.no_grad()``, ``trainer.compute_loss(trainer.model, batch)``: TRL's
   policy and reference forwards (its fused LM head, float32) and its mean over pairs of the per-pair loss;
5. our side, from the same batch: each float64 model's logits, ``log_softmax`` at position ``i`` gathered at token
   ``i + 1``, summed where ``completion_mask[:, 1:]`` is 1 (the log-probability of the response tokens, eos
   included), policy minus reference = the log-ratios; the response lengths for ``ipo`` are
   ``completion_mask.sum(1)``; then ``preference_loss(...).mean()``.

The two agree to an absolute 1e-5 (TRL runs in float32, ours in float64; the differences seen are 4e-9 to 3e-6, the
largest for forward KL, whose score ``1 - 1/t`` multiplies TRL's float32 rounding of ``log t`` by ``1/t``). TRL's
own logged metrics (``rewards/chosen`` = beta times the mean chosen log-ratio, ``logps/chosen``) are checked against
our log-probabilities too, so a failure tells a log-probability mismatch from a loss-formula one.

``bf16=False`` matters: TRL defaults to bf16 mixed precision even on CPU, and then the accelerate-prepared reference
runs under bf16 autocast while the policy (prepared only by ``train()``) runs in float32 when ``compute_loss`` is
called directly, which moves the log-ratios by ~1e-2.

TRL's ``sigmoid`` loss ignores ``label_smoothing`` (in 1.16 only ``robust``, ``exo_pair``, ``aot`` and
``aot_unpaired`` read it), so our conservative-DPO smoothing of ``sigmoid`` has no TRL counterpart and is compared
with ``label_smoothing=0`` only.
"""

from __future__ import annotations

import copy
import math
import random

import numpy as np
import pytest
import torch

pytest.importorskip("trl")

from datasets import Dataset  # noqa: E402
from transformers import LlamaForCausalLM  # noqa: E402
from trl import DPOConfig, DPOTrainer  # noqa: E402

from objectives import get_divergence  # noqa: E402
from objectives.preference import preference_loss  # noqa: E402

BETA = 0.5
NOISE = 0.1
"""Std of the Gaussian noise added to every weight of the tiny Llama (init std 0.02) for the policy and the
reference, each with its own seed: per-token log-ratios of order 0.3, per-response ones of order 1."""
TOLERANCE = 1e-5

PAIRS = {
    "prompt": ["the cat", "2+2=", "hello", "q: why?"],
    "chosen": [" sat on the mat.", "4", " world!", " a: because it rains"],
    "rejected": [" ran", "five, surely", " there", " a: no"],
}

# (TRL's DPOConfig settings, our preference_loss settings)
CASES = [
    pytest.param({"loss_type": "sigmoid"}, {"divergence": "rkl", "loss": "sigmoid"}, id="sigmoid-reverse_kl"),
    pytest.param({"loss_type": "ipo"}, {"divergence": "rkl", "loss": "ipo"}, id="ipo-reverse_kl"),
    pytest.param({"loss_type": "hinge"}, {"divergence": "rkl", "loss": "hinge"}, id="hinge-reverse_kl"),
    pytest.param({"loss_type": "robust", "label_smoothing": 0.1},
                 {"divergence": "rkl", "loss": "robust", "label_smoothing": 0.1}, id="robust0.1-reverse_kl"),
    pytest.param({"loss_type": "sigmoid", "f_divergence_type": "forward_kl"},
                 {"divergence": "fkl", "loss": "sigmoid"}, id="sigmoid-forward_kl"),
    pytest.param({"loss_type": "sigmoid", "f_divergence_type": "js_divergence"},
                 {"divergence": "js", "loss": "sigmoid"}, id="sigmoid-js_divergence"),
    pytest.param({"loss_type": "sigmoid", "f_divergence_type": "alpha_divergence", "f_alpha_divergence_coef": 0.3},
                 {"divergence": "alpha:0.3", "loss": "sigmoid"}, id="sigmoid-alpha0.3"),
    pytest.param({"loss_type": "sigmoid", "f_divergence_type": "alpha_divergence", "f_alpha_divergence_coef": 0.5},
                 {"divergence": "alpha:0.5", "loss": "sigmoid"}, id="sigmoid-alpha0.5"),
    # f-divergences under the other losses (TRL supports them there too)
    pytest.param({"loss_type": "ipo", "f_divergence_type": "js_divergence"},
                 {"divergence": "js", "loss": "ipo"}, id="ipo-js_divergence"),
    pytest.param({"loss_type": "hinge", "f_divergence_type": "alpha_divergence", "f_alpha_divergence_coef": 0.3},
                 {"divergence": "alpha:0.3", "loss": "hinge"}, id="hinge-alpha0.3"),
    pytest.param({"loss_type": "robust", "label_smoothing": 0.2, "f_divergence_type": "forward_kl"},
                 {"divergence": "fkl", "loss": "robust", "label_smoothing": 0.2}, id="robust0.2-forward_kl"),
    # the losses TRL 1.16 has beside those (issue 35): on the f-DPO scores ...
    pytest.param({"loss_type": "exo_pair", "label_smoothing": 0.1},
                 {"divergence": "rkl", "loss": "exo_pair", "label_smoothing": 0.1}, id="exo_pair0.1-reverse_kl"),
    pytest.param({"loss_type": "exo_pair", "label_smoothing": 0.2, "f_divergence_type": "js_divergence"},
                 {"divergence": "js", "loss": "exo_pair", "label_smoothing": 0.2}, id="exo_pair0.2-js_divergence"),
    pytest.param({"loss_type": "discopop"}, {"divergence": "rkl", "loss": "discopop"}, id="discopop-reverse_kl"),
    pytest.param({"loss_type": "discopop", "discopop_tau": 0.5, "f_divergence_type": "forward_kl"},
                 {"divergence": "fkl", "loss": "discopop", "discopop_tau": 0.5}, id="discopop0.5-forward_kl"),
    pytest.param({"loss_type": "sigmoid_norm"}, {"divergence": "rkl", "loss": "sigmoid_norm"},
                 id="sigmoid_norm-reverse_kl"),
    pytest.param({"loss_type": "sigmoid_norm", "f_divergence_type": "alpha_divergence", "f_alpha_divergence_coef": 0.5},
                 {"divergence": "alpha:0.5", "loss": "sigmoid_norm"}, id="sigmoid_norm-alpha0.5"),
    # ... and on the log-ratios themselves (reverse KL only)
    pytest.param({"loss_type": "nca_pair"}, {"divergence": "rkl", "loss": "nca_pair"}, id="nca_pair"),
    pytest.param({"loss_type": "bco_pair"}, {"divergence": "rkl", "loss": "bco_pair"}, id="bco_pair"),
    pytest.param({"loss_type": "sppo_hard"}, {"divergence": "rkl", "loss": "sppo_hard"}, id="sppo_hard"),
    pytest.param({"loss_type": "apo_zero"}, {"divergence": "rkl", "loss": "apo_zero"}, id="apo_zero"),
    pytest.param({"loss_type": "apo_down"}, {"divergence": "rkl", "loss": "apo_down"}, id="apo_down"),
]


def _perturbed_llama(model_dir, seed: int) -> LlamaForCausalLM:
    """The tiny Llama with seeded Gaussian noise of std ``NOISE`` added to every weight (float32, eval mode)."""
    model = LlamaForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(NOISE * torch.randn(parameter.shape, generator=generator))
    return model.eval()


def _sequence_logps(model: LlamaForCausalLM, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """``[2N]`` float64 log-probability of each row's completion tokens: the logits at position ``i`` score token
    ``i + 1``, kept where ``completion_mask[:, 1:]`` is 1."""
    input_ids, completion_mask = batch["input_ids"], batch["completion_mask"]
    with torch.no_grad():
        logits = model(input_ids=input_ids, attention_mask=batch["attention_mask"]).logits.double()
    token_logps = torch.log_softmax(logits[:, :-1], dim=-1).gather(-1, input_ids[:, 1:, None]).squeeze(-1)
    return (token_logps * completion_mask[:, 1:]).sum(dim=1)


def _trl_loss(policy, reference, tokenizer, output_dir, settings: dict) -> tuple[float, dict, DPOTrainer]:
    """TRL's loss on one collated batch of ``PAIRS``, the batch it was computed on, and the trainer."""
    # DPOTrainer calls transformers.set_seed: keep the global RNG streams of the rest of the suite as they were.
    python_state, numpy_state = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=[]):
        # bf16=False: TRL defaults to bf16 mixed precision, under which the accelerate-prepared reference runs in
        # bf16 autocast while the policy (prepared only by train()) runs in float32 here: log-probs off by ~1e-2.
        args = DPOConfig(output_dir=str(output_dir), report_to=[], use_cpu=True, bf16=False,
                         per_device_train_batch_size=4, beta=BETA, **settings)
        trainer = DPOTrainer(model=policy, ref_model=reference, args=args,
                             train_dataset=Dataset.from_dict(PAIRS), processing_class=tokenizer)
        batch = next(iter(trainer.get_train_dataloader()))
        trainer.model.eval()
        with torch.no_grad():
            loss = trainer.compute_loss(trainer.model, batch)
    random.setstate(python_state)
    np.random.set_state(numpy_state)
    return float(loss), batch, trainer


@pytest.mark.parametrize(("trl_settings", "our_settings"), CASES)
def test_preference_loss_matches_trl_dpo_trainer(trl_settings, our_settings, tiny_model_dir, tiny_tokenizer,
                                                 tmp_path):
    policy, reference = _perturbed_llama(tiny_model_dir, seed=1), _perturbed_llama(tiny_model_dir, seed=2)
    policy64, reference64 = copy.deepcopy(policy).double(), copy.deepcopy(reference).double()
    tokenizer = copy.deepcopy(tiny_tokenizer)  # TRL may set attributes on it (pad token)

    trl_loss, batch, trainer = _trl_loss(policy, reference, tokenizer, tmp_path, trl_settings)

    n = len(PAIRS["prompt"])
    assert batch["input_ids"].shape[0] == 2 * n
    log_ratios = _sequence_logps(policy64, batch) - _sequence_logps(reference64, batch)
    chosen_log_ratio, rejected_log_ratio = log_ratios.chunk(2)
    chosen_lengths, rejected_lengths = batch["completion_mask"].sum(dim=1).chunk(2)
    assert log_ratios.abs().max() > 0.5, "the reference is too close to the policy for a meaningful comparison"

    settings = dict(our_settings)
    divergence = get_divergence(settings.pop("divergence"))
    ours = preference_loss(chosen_log_ratio, rejected_log_ratio, divergence, BETA, chosen_lengths=chosen_lengths,
                           rejected_lengths=rejected_lengths, **settings).mean().item()
    if settings["loss"] == "sigmoid":
        assert abs(ours - math.log(2)) > 0.01, "sigmoid loss at its trivial value log 2"

    # TRL's logged metrics (private, 1.16): the log-probabilities and log-ratios it computed on this batch
    metrics = trainer._metrics["eval"]
    policy_chosen_logps = _sequence_logps(policy64, batch).chunk(2)[0]
    assert metrics["logps/chosen"][-1] == pytest.approx(policy_chosen_logps.mean().item(), abs=1e-4)
    assert metrics["rewards/chosen"][-1] == pytest.approx(BETA * chosen_log_ratio.mean().item(), abs=TOLERANCE)

    assert abs(ours - trl_loss) < TOLERANCE, f"ours {ours!r} vs TRL {trl_loss!r} (diff {abs(ours - trl_loss):.3g})"


@pytest.mark.parametrize(("losses", "weights"), [
    pytest.param(["sigmoid", "sft"], [0.8, 0.2], id="sigmoid+sft"),
    pytest.param(["sigmoid", "bco_pair", "sft"], [0.8, 0.2, 1.0], id="mpo"),  # MPO's own combination
])
def test_weighted_combinations_and_sft_match_trl(losses, weights, tiny_model_dir, tiny_tokenizer, tmp_path):
    """TRL's ``loss_type`` list with ``loss_weights`` (MPO) and its ``sft`` term (the chosen responses' NLL per
    token of the batch): ours, the weighted sum of ``preference_loss`` means and :func:`chosen_nll`."""
    from objectives.reference_free import chosen_nll

    policy, reference = _perturbed_llama(tiny_model_dir, seed=1), _perturbed_llama(tiny_model_dir, seed=2)
    policy64, reference64 = copy.deepcopy(policy).double(), copy.deepcopy(reference).double()
    trl_loss, batch, _ = _trl_loss(policy, reference, copy.deepcopy(tiny_tokenizer), tmp_path,
                                   {"loss_type": losses, "loss_weights": weights})
    log_ratios = _sequence_logps(policy64, batch) - _sequence_logps(reference64, batch)
    chosen_log_ratio, rejected_log_ratio = log_ratios.chunk(2)
    input_ids, mask = batch["input_ids"], batch["completion_mask"][:, 1:].bool()
    with torch.no_grad():
        logits = policy64(input_ids=input_ids, attention_mask=batch["attention_mask"]).logits.double()
    token = torch.log_softmax(logits[:, :-1], -1).gather(-1, input_ids[:, 1:, None]).squeeze(-1)
    ours = 0.0
    for name, weight in zip(losses, weights):
        if name == "sft":
            chosen_mask = mask.chunk(2)[0]
            ours += weight * float(chosen_nll(token.chunk(2)[0], chosen_mask, float(chosen_mask.sum())))
        else:
            ours += weight * float(preference_loss(chosen_log_ratio, rejected_log_ratio, get_divergence("rkl"), BETA,
                                                   name).mean())
    assert abs(ours - trl_loss) < TOLERANCE, f"ours {ours!r} vs TRL {trl_loss!r}"


@pytest.mark.parametrize("trl_settings", [
    pytest.param({"loss_type": "aot"}, id="aot"),
    pytest.param({"loss_type": "aot", "label_smoothing": 0.1}, id="aot-smoothed"),
    pytest.param({"loss_type": "aot_unpaired"}, id="aot_unpaired"),
    pytest.param({"loss_type": "aot_unpaired", "label_smoothing": 0.2}, id="aot_unpaired-smoothed"),
])
def test_batch_losses_match_trl(trl_settings, tiny_model_dir, tiny_tokenizer, tmp_path):
    """AOT's losses sort over the batch: ``batch_preference_loss`` on the batch TRL collated equals TRL's."""
    from objectives.preference import batch_preference_loss

    policy, reference = _perturbed_llama(tiny_model_dir, seed=1), _perturbed_llama(tiny_model_dir, seed=2)
    policy64, reference64 = copy.deepcopy(policy).double(), copy.deepcopy(reference).double()
    trl_loss, batch, _ = _trl_loss(policy, reference, copy.deepcopy(tiny_tokenizer), tmp_path, trl_settings)
    ref_w, ref_l = _sequence_logps(reference64, batch).chunk(2)
    pol_w, pol_l = _sequence_logps(policy64, batch).chunk(2)
    ours = batch_preference_loss(trl_settings["loss_type"], pol_w - ref_w, pol_l - ref_l, BETA,
                                 trl_settings.get("label_smoothing", 0.0), ref_w, ref_l).mean().item()
    assert abs(ours - trl_loss) < TOLERANCE, f"ours {ours!r} vs TRL {trl_loss!r}"
