r"""The gradient the f-DPG trainer applies is the exact :math:`\nabla_\theta D_f(\pi_\theta\|p)`.

On the enumerable Hugging Face model (6 tokens, completions of at most 3 tokens: every one can be listed,
``enumerable_lm.py``), the real :class:`fdpg.algorithms.f_dpg.FDPGTrainer` runs many steps at the same parameters (the
optimizer's step is replaced by a recorder, so nothing moves) with fresh samples each step: sampling, scoring,
the reference pass, the running ``log Z``, pseudo-rewards, the default ``prompt_loo`` baseline, importance weights,
the micro-batched surrogate loss and its backward. The mean of the recorded gradients must equal the exact
gradient by enumeration (Hotelling's test on its projections onto the exact direction and random ones), for
reverse KL, forward KL and JS, on-policy, under ``--temperature`` and ``--top_p`` (where the expectation is the
gradient over the nucleus), with ``--off_policy``, and conditionally with one ``Z_c`` per prompt. The same test
rejects seeded bugs (an ascending loss, a dropped ``log Z``, dropped importance weights): the test of the test.
The logged metrics (``kl_pi_a``, ``kl_p_pi``, ``d_f``, ``entropy``) are checked against their exact values.
Under ``--mixed_precision bf16`` (every pass in bf16, the no-grad ones with weights cast once) the applied gradient
is the exact gradient of the bf16 policy, enumerated under the same autocast, and the fp32 policy's is rejected.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch
from accelerate.state import AcceleratorState
from enumerable_lm import (
    ExactPrompt,
    enumerable_trainer,
    exact_divergence_gradient,
    exact_prompt,
    expected_trainer_gradient,
    recorded_gradients,
)
from statistics_testing import P_VALUE_FLOOR, projected_hotelling

import fdpg.algorithms.f_dpg as trainer_module
from fdpg.algorithms.f_dpg import FDPGTrainer
from objectives import ForwardKL, binary_constraint, get_divergence, rl_with_kl
from objectives import surrogate_loss as true_surrogate_loss

BETA = 0.5
BATCH = 64
STEPS = 40  # recorded steps, after WARMUP steps that let the running log Z settle
WARMUP = 2


def exactness_trainer(model_dir: Path, tmp_path: Path, **overrides: Any) -> FDPGTrainer:
    return enumerable_trainer(model_dir, tmp_path, beta=BETA, **overrides)


def applied_gradients(trainer: FDPGTrainer, steps: int = STEPS) -> tuple[torch.Tensor, list[dict[str, Any]]]:
    return recorded_gradients(trainer, steps, WARMUP)


def exact_prompts(trainer: FDPGTrainer) -> list[ExactPrompt]:
    return [exact_prompt(trainer, p) for p in trainer.prompts]


def check_unbiased(trainer: FDPGTrainer, exact_gradient: torch.Tensor) -> list[dict[str, Any]]:
    grads, metrics = applied_gradients(trainer)
    t2, rank, p_value = projected_hotelling(grads, exact_gradient)
    assert p_value > P_VALUE_FLOOR, f"T^2 = {t2:.1f} on {rank} dof (p = {p_value:.2g})"
    return metrics


CASES = {
    "rkl": dict(divergence="rkl"),
    "fkl": dict(divergence="fkl"),
    "js": dict(divergence="js"),
    "fkl-binary": dict(divergence="fkl", target=binary_constraint("has_a")),
    "js-temperature": dict(divergence="js", temperature=1.6),
    "fkl-off-policy": dict(divergence="fkl", off_policy=True),
    "js-conditional": dict(divergence="js", prompts=("a", "b"), target=rl_with_kl("reward", BETA).as_conditional()),
    "fkl-moving-average": dict(divergence="fkl", baseline="moving_average"),
    # --mixed_precision bf16: sampling, reference and training in bf16 (weights cast once for the no-grad passes);
    # the exact gradient is that of the bf16 policy, enumerated under the same autocast.
    # The samples come from the bf16 sampling copy (LoRA merged, fdpg.sampling_copy): another q, corrected by the
    # rewards and weights of the training forward; with --bf16_sampling autocast from the autocast policy itself.
    "rkl-bf16": dict(divergence="rkl", mixed_precision="bf16"),
    "js-bf16": dict(divergence="js", mixed_precision="bf16"),
    "rkl-bf16-autocast-sampling": dict(divergence="rkl", mixed_precision="bf16", bf16_sampling="autocast"),
}


def _move_proposal_closer_to_p(trainer: FDPGTrainer, ratio: float = 0.2, step: float = 0.05) -> None:
    """An off-policy proposal q that differs from pi and is much closer to p, so that the trainer's noisy
    refresh test (estimated D_f(pi||p) < D_f(q||p)) never replaces it: normalised exact-gradient steps from pi
    until D_f(q||p) < ``ratio`` D_f(pi||p)."""
    div = trainer.divergence
    params = list(trainer._policy_trainable().values())
    with torch.no_grad():
        d_pi = sum(float(div.exact(e.log_pi, e.log_p)) for e in exact_prompts(trainer))
    proposal = {name: p.detach().clone() for name, p in trainer._policy_trainable().items()}
    for _ in range(40):
        trainer._swap_params(proposal)  # the model holds q
        try:
            exact = [exact_prompt(trainer, p, with_proposal=False) for p in trainer.prompts]
            d_q = sum(float(div.exact(e.log_pi, e.log_p)) for e in exact)
            gradient = exact_divergence_gradient(exact, div, params) if d_q >= ratio * d_pi else None
        finally:
            trainer._swap_params(proposal)
        if gradient is None:
            trainer.proposal = proposal
            return
        for (name, p), g in zip(proposal.items(), torch.split(gradient, [p.numel() for p in params])):
            proposal[name] = p - step * g.reshape(p.shape).to(p.dtype) / float(gradient.norm())
    raise AssertionError(f"no proposal closer to p than pi found (D_f(pi||p) = {d_pi:.3f}, D_f(q||p) = {d_q:.3f})")


# rkl in the fast suite (a wrong gradient fails the inner loop), the other cases in the full one.
@pytest.mark.parametrize("case", [pytest.param(c, marks=() if c == "rkl" else pytest.mark.slow) for c in CASES])
def test_the_applied_gradient_is_the_exact_gradient(enumerable_model_dir: Path, tmp_path: Path, case: str) -> None:
    trainer = exactness_trainer(enumerable_model_dir, tmp_path, **CASES[case])
    params = list(trainer._policy_trainable().values())
    if trainer.config.off_policy:
        _move_proposal_closer_to_p(trainer)
    exact = exact_prompts(trainer)
    gradient = exact_divergence_gradient(exact, trainer.divergence, params)
    assert float(gradient.norm()) > 1e-3
    # The oracle's expectation (support of q, E_q[R] baseline) is the divergence's gradient when q covers all. In
    # bf16 the two autograd graphs of that one quantity round differently: ~1% of the largest entry (0.9% here).
    bf16 = trainer.config.mixed_precision == "bf16"
    torch.testing.assert_close(expected_trainer_gradient(exact, trainer.divergence, params), gradient,
                               rtol=2e-2 if bf16 else 1e-4, atol=(2e-2 if bf16 else 1e-5) * float(gradient.abs().max()))
    if trainer.config.off_policy:
        assert float((exact[0].log_q - exact[0].log_pi.detach()).abs().max()) > 0.1  # q really differs from pi
    metrics = check_unbiased(trainer, gradient)
    assert not any(m["proposal_refreshed"] for m in metrics)
    if trainer.conditional:
        assert metrics[-1]["log_z_keys"] == 2


@pytest.mark.slow
@pytest.mark.parametrize("sampling", ["autocast", "copy"])
def test_the_bf16_gradient_is_that_of_the_bf16_policy_not_the_fp32_one(enumerable_model_dir: Path,
                                                                       tmp_path: Path, sampling: str) -> None:
    """The power of the bf16 cases above: the fp32 policy's exact gradient (5.7% away from the bf16 policy's on this
    model) is rejected by the same test that accepts the bf16 one. Sampling from the bf16 copy (importance weights
    pi/q of the training forward) needs twice the steps for the same power."""
    fp32 = exactness_trainer(enumerable_model_dir, tmp_path / "fp32")
    fp32_gradient = exact_divergence_gradient(exact_prompts(fp32), fp32.divergence,
                                              list(fp32._policy_trainable().values()))
    AcceleratorState._reset_state()  # a second Accelerator, with other settings, in this process
    trainer = exactness_trainer(enumerable_model_dir, tmp_path / "bf16", mixed_precision="bf16", bf16_sampling=sampling)
    bf16_gradient = exact_divergence_gradient(exact_prompts(trainer), trainer.divergence,
                                              list(trainer._policy_trainable().values()))
    assert float((bf16_gradient - fp32_gradient).norm()) > 0.03 * float(fp32_gradient.norm())
    grads, _ = applied_gradients(trainer, STEPS * (2 if sampling == "copy" else 1))
    t2, rank, p_value = projected_hotelling(grads, fp32_gradient)
    assert p_value < 1e-3, f"the fp32 gradient is not rejected (T^2 = {t2:.1f} on {rank} dof, p = {p_value:.2g})"


@pytest.mark.slow
def _sample_from_other_weights(trainer: FDPGTrainer, scale: float = 0.5) -> None:
    """The trainer samples (and records log q) from perturbed weights, then trains the unperturbed ones: what bf16's
    KV-cached decode does to q on a real model (0.04-0.32 nats a sequence, ``bench/bf16_error.py``), made large
    enough here for the test to see."""
    params = list(trainer._policy_trainable().values())
    generator = torch.Generator().manual_seed(1)
    deltas = [scale * float(p.detach().abs().mean()) * torch.randn(p.shape, generator=generator) for p in params]
    original = trainer.sample

    def sample(step: int):
        saved = [p.detach().clone() for p in params]
        with torch.no_grad():
            for p, d in zip(params, deltas):
                p.add_(d.to(p))
        try:
            return original(step)
        finally:
            with torch.no_grad():
                for p, k in zip(params, saved):
                    p.copy_(k)

    trainer.sample = sample


@pytest.mark.slow
@pytest.mark.parametrize("from_forward", [True, False], ids=["from-the-forward", "from-sampling"])
def test_bf16_rewards_from_the_training_forward_correct_a_sampler_that_differs(enumerable_model_dir: Path,
                                                                              tmp_path: Path,
                                                                              from_forward: bool) -> None:
    """Under mixed precision the pseudo-rewards and pi/q come from the training forward's log pi, so the estimate
    stays that of the trained policy when sampling computes another q; from the sampling pass it is biased."""
    trainer = exactness_trainer(enumerable_model_dir, tmp_path, mixed_precision="bf16")
    assert trainer.rewards_from_forward
    gradient = exact_divergence_gradient(exact_prompts(trainer), trainer.divergence,
                                         list(trainer._policy_trainable().values()))
    _sample_from_other_weights(trainer)
    batch = trainer.sample(0)
    with trainer.accelerator.autocast(), torch.no_grad():
        gap = (batch.log_q.double() - trainer.sequence_log_probs(batch, reference=False)).abs()
    assert float(gap.mean()) > 0.05, float(gap.mean())
    trainer.rewards_from_forward = from_forward
    grads, _ = applied_gradients(trainer)
    t2, rank, p_value = projected_hotelling(grads, gradient)
    if from_forward:
        assert p_value > P_VALUE_FLOOR, f"T^2 = {t2:.1f} on {rank} dof (p = {p_value:.2g})"
    else:
        assert p_value < 1e-6, f"the bias is not seen (T^2 = {t2:.1f} on {rank} dof, p = {p_value:.2g})"


@pytest.mark.slow
def test_top_p_gradient_is_the_gradient_over_the_nucleus(enumerable_model_dir: Path, tmp_path: Path) -> None:
    """Under top-p, q = 0 outside the nucleus: the estimate is unbiased for the nucleus' expectation (which is
    not the full gradient), and the log q the sampler records is the exact nucleus probability."""
    trainer = exactness_trainer(enumerable_model_dir, tmp_path, divergence="fkl", top_p=0.8)
    params = list(trainer._policy_trainable().values())
    exact = exact_prompts(trainer)
    nucleus = expected_trainer_gradient(exact, trainer.divergence, params)
    full = exact_divergence_gradient(exact, trainer.divergence, params)
    assert bool((exact[0].log_q == -math.inf).any())
    assert float((nucleus - full).norm()) > 0.05 * float(full.norm())
    batch = trainer.sample(0)
    idx = exact[0].index(batch.completion_ids, batch.completion_mask)
    torch.testing.assert_close(batch.log_q.double(), exact[0].log_q[idx], atol=1e-4, rtol=0)
    torch.testing.assert_close(batch.log_pi.double(), exact[0].log_pi.detach()[idx], atol=1e-4, rtol=0)
    check_unbiased(trainer, nucleus)


def _negated_loss(*args: Any, **kwargs: Any) -> torch.Tensor:
    return -true_surrogate_loss(*args, **kwargs)


def _unweighted_loss(log_pi, rewards, baseline, weights=None, normaliser=None) -> torch.Tensor:
    return true_surrogate_loss(log_pi, rewards, baseline, None, normaliser=normaliser)


def _inverted_weights_loss(log_pi, rewards, baseline, weights=None, normaliser=None) -> torch.Tensor:
    return true_surrogate_loss(log_pi, rewards, baseline, 1 / weights, normaliser=normaliser)


SEEDED_BUGS = {
    "ascends D_f": (dict(divergence="fkl"), "loss", _negated_loss),
    "log Z never subtracted": (dict(divergence="fkl"), "log_z", None),
    "importance weights dropped (temperature)": (dict(divergence="js", temperature=1.6), "loss", _unweighted_loss),
    "importance weights inverted (off-policy)": (dict(divergence="fkl", off_policy=True), "loss",
                                                 _inverted_weights_loss),
}


@pytest.mark.parametrize("bug", list(SEEDED_BUGS))
@pytest.mark.slow
def test_the_exactness_test_rejects_seeded_bugs(enumerable_model_dir: Path, tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch, bug: str) -> None:
    """Power check: each one-line bug in the trainer makes the same test fail."""
    settings, where, replacement = SEEDED_BUGS[bug]
    trainer = exactness_trainer(enumerable_model_dir, tmp_path, **settings)
    params = list(trainer._policy_trainable().values())
    if trainer.config.off_policy:
        _move_proposal_closer_to_p(trainer)
    gradient = exact_divergence_gradient(exact_prompts(trainer), trainer.divergence, params)
    if where == "loss":
        monkeypatch.setattr(trainer_module, "surrogate_loss", replacement)
    else:
        monkeypatch.setattr(trainer.log_z, "log_z_many", lambda keys, n=None: torch.zeros(len(keys),
                                                                                          dtype=torch.float64))
    grads, _ = applied_gradients(trainer)
    t2, rank, p_value = projected_hotelling(grads, gradient)
    assert p_value < 1e-6, f"{bug}: not rejected (T^2 = {t2:.1f} on {rank} dof, p = {p_value:.2g})"


@pytest.mark.slow
def test_metrics_are_their_exact_values(enumerable_model_dir: Path, tmp_path: Path) -> None:
    """Per-step kl_pi_a, kl_p_pi, d_f and entropy average to the exact KL(pi||a), KL(p||pi), D_f(pi||p), H(pi)."""
    trainer = exactness_trainer(enumerable_model_dir, tmp_path, divergence="js", temperature=1.3)
    (e,) = exact_prompts(trainer)
    with torch.no_grad():
        log_pi, pi = e.log_pi.detach(), e.log_pi.detach().exp()
        exact = {"kl_pi_a": float((pi * (log_pi - e.log_a)).sum()),
                 "kl_p_pi": float(ForwardKL().exact(log_pi, e.log_p)),
                 "d_f": float(get_divergence("js").exact(log_pi, e.log_p)),
                 "entropy": float(-(pi * log_pi).sum()),
                 "log_z": e.log_Z}
    assert exact["kl_pi_a"] > 0.05 and exact["kl_p_pi"] > 0.05
    _, metrics = applied_gradients(trainer, steps=30)
    for name, value in exact.items():
        values = torch.tensor([m[name] for m in metrics], dtype=torch.float64)
        if name == "log_z":  # a running estimate: its last value has seen every sample
            assert abs(float(values[-1]) - value) < 0.05, (name, float(values[-1]), value)
            continue
        se = float(values.std()) / math.sqrt(len(values))
        assert abs(float(values.mean()) - value) < 4 * se + 1e-9, (name, float(values.mean()), value, se)
