r"""GRPO on the shared engine: a special case of f-DPG on the exact enumerable model, and a run like the others.

1. With one inner step (ratio 1), no std scaling, no KL term and the ``dr_grpo`` normaliser, the mean of the
   gradients the real :class:`fdpg.algorithms.grpo.GRPOTrainer` applies is
   :math:`\frac{\beta}{L}(1 - \frac1G)\nabla KL(\pi_\theta\|p_t)` for :math:`p_t\propto\pi_{\theta_t}e^{r/\beta}`,
   i.e. :math:`-\frac1L(1-\frac1G)\nabla E_\pi[r]` (:mod:`objectives.grpo`; Hotelling's test against enumeration).
   Two seeded bugs (the advantage's sign, a leave-one-out baseline: the factor 1 instead of :math:`1 - 1/G`) and a
   documented departure (std scaling) are rejected by the same test.
2. A short GRPO run on the tiny model raises the reward; its run directory has the shared metrics and its own, and
   a resumed run reproduces the uninterrupted one.
3. Bad settings are refused with the reason.
"""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

import pytest
import torch
from enumerable_lm import enumerable_trainer, exact_divergence_gradient, exact_prompt, flat_grad, recorded_gradients
from fdpg_testing import (
    REQUIRED_METRICS,
    assert_same_metrics,
    assert_same_state,
    build_trainer,
    read_jsonl,
    trainable_state,
    vowel_fraction,
)
from statistics_testing import P_VALUE_FLOOR, projected_hotelling

import fdpg.algorithms.grpo as grpo_module
from fdpg.config import TrainConfig
from objectives import get_divergence
from objectives.grpo import group_advantages as true_group_advantages

BETA = 0.5
GROUP = 4
LENGTH = 3  # max_new_tokens of the enumerable trainer
#: The settings under which GRPO's expected gradient is exactly -(1 - 1/G)/L grad E[r].
SPECIAL_CASE = dict(algo="grpo", grpo_iterations=1, grpo_minibatches=1, scale_rewards="none", kl_coef=0.0,
                    grpo_loss="dr_grpo", samples_per_prompt=GROUP)
GRPO_METRICS = ("grpo/loss", "grpo/clip_fraction", "grpo/kl_k3", "grpo/reward_mean", "grpo/zero_std_fraction")


def _special_case_gradients(model_dir: Path, tmp_path: Path, steps: int = 40, **changes: Any):
    trainer = enumerable_trainer(model_dir, tmp_path, beta=BETA, **{**SPECIAL_CASE, **changes})
    params = list(trainer._policy_trainable().values())
    exact = [exact_prompt(trainer, p) for p in trainer.prompts]
    expected_reward = sum((e.log_pi.exp() * e.features["reward"].double()).sum() for e in exact) / len(exact)
    gradient = -(1 - 1 / GROUP) / LENGTH * flat_grad(expected_reward, params)
    # The same vector as the f-DPG reverse-KL gradient toward p_t = pi_t exp(r / beta), scaled by (1 - 1/G) beta / L.
    for e in exact:
        e.log_P = e.log_pi.detach() + e.features["reward"].double() / BETA
    tilted = (1 - 1 / GROUP) * BETA / LENGTH * exact_divergence_gradient(exact, get_divergence("rkl"), params)
    assert float(gradient.norm()) > 1e-3
    assert float((tilted - gradient).norm()) < 1e-5 * float(gradient.norm())  # float32 rounding
    grads, metrics = recorded_gradients(trainer, steps)
    return grads, gradient, metrics


def test_grpo_special_case_is_the_tilted_reverse_kl_gradient(enumerable_model_dir: Path, tmp_path: Path) -> None:
    grads, gradient, metrics = _special_case_gradients(enumerable_model_dir, tmp_path)
    t2, rank, p_value = projected_hotelling(grads, gradient)
    assert p_value > P_VALUE_FLOOR, f"T^2 = {t2:.1f} on {rank} dof (p = {p_value:.2g})"
    assert all(m["grpo/clip_fraction"] == 0 for m in metrics)  # ratio 1: nothing clipped


def _leave_one_out(rewards: torch.Tensor, group_size: int, scale: str = "group") -> torch.Tensor:
    groups = rewards.reshape(-1, group_size)
    return (groups - (groups.sum(-1, keepdim=True) - groups) / (group_size - 1)).reshape(-1)


@pytest.mark.parametrize("variant", ["advantage sign flipped", "leave-one-out baseline", "std scaling"])
@pytest.mark.slow
def test_the_special_case_test_rejects_departures(enumerable_model_dir: Path, tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch, variant: str) -> None:
    """Power check: two seeded bugs and one documented departure from the special case are rejected."""
    changes: dict[str, Any] = {}
    if variant == "advantage sign flipped":
        monkeypatch.setattr(grpo_module, "group_advantages", lambda *a, **k: -true_group_advantages(*a, **k))
    elif variant == "leave-one-out baseline":
        monkeypatch.setattr(grpo_module, "group_advantages", _leave_one_out)
    else:
        changes["scale_rewards"] = "group"
    grads, gradient, _ = _special_case_gradients(enumerable_model_dir, tmp_path, **changes)
    t2, rank, p_value = projected_hotelling(grads, gradient)
    assert p_value < 1e-6, f"{variant}: not rejected (T^2 = {t2:.1f} on {rank} dof, p = {p_value:.2g})"


# --------------------------------------------------------------------------------- runs on the tiny model
@pytest.mark.slow
def test_short_grpo_run_raises_the_reward(make_trainer) -> None:
    """Vowel fraction (the toy reward) of the last 5 steps' samples above the first 5's by 3 standard errors."""
    trainer = make_trainer(algo="grpo", steps=20, learning_rate=1e-2, batch_size=16, generation_batch_size=16,
                           micro_batch_size=16, samples_per_prompt=4, max_new_tokens=6, grpo_iterations=2)
    assert trainer.train()["status"] == "finished"
    samples = read_jsonl(trainer.run_dir / "samples.jsonl")
    first = [vowel_fraction(s["completion"]) for s in samples if s["step"] <= 5]
    last = [vowel_fraction(s["completion"]) for s in samples if s["step"] > 15]
    stderr = (statistics.variance(first) / len(first) + statistics.variance(last) / len(last)) ** 0.5
    assert statistics.mean(last) - statistics.mean(first) > 3 * stderr, (statistics.mean(first),
                                                                          statistics.mean(last), stderr)


def test_grpo_run_directory_has_the_shared_metrics_and_its_own(make_trainer) -> None:
    trainer = make_trainer(algo="grpo", steps=2, lora_r=4, grpo_minibatches=2, grpo_iterations=2, micro_batch_size=2,
                           kl_coef=0.05, importance_sampling="sequence", grpo_loss="grpo")
    assert trainer.train()["status"] == "finished"
    metrics = read_jsonl(trainer.run_dir / "metrics.jsonl")
    for m in metrics:
        missing = [k for k in (*REQUIRED_METRICS, *GRPO_METRICS, "score/reward") if k not in m]
        assert not missing, f"metrics.jsonl lacks {missing}"
    assert metrics[1]["grpo/kl_k3"] > 0  # the policy moved off the reference
    samples = read_jsonl(trainer.run_dir / "samples.jsonl")
    assert {"prompt", "completion", "scores", "log_pi", "log_a", "pseudo_reward"} <= set(samples[0])


@pytest.mark.slow
def test_grpo_resume_reproduces_the_uninterrupted_run(tiny_model_dir: Path, tmp_path: Path) -> None:
    settings = dict(algo="grpo", lora_r=4, grpo_minibatches=2, grpo_iterations=2, kl_coef=0.05, save_every=2)
    reference = build_trainer(tiny_model_dir, tmp_path / "reference", steps=4, **settings)
    assert reference.train()["status"] == "finished"
    first = build_trainer(tiny_model_dir, tmp_path / "run", steps=2, **settings)
    assert first.train()["status"] == "finished"
    resumed = build_trainer(tiny_model_dir, tmp_path / "ignored", steps=4, resume=str(first.run_dir), **settings)
    assert resumed.train()["status"] == "finished"
    want = read_jsonl(reference.run_dir / "metrics.jsonl")
    got = read_jsonl(first.run_dir / "metrics.jsonl")
    assert [m["step"] for m in got] == [1, 2, 3, 4]
    for g, w in zip(got, want):
        assert_same_metrics(g, w)
    assert_same_state(trainable_state(resumed), trainable_state(reference))


# --------------------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize(("settings", "message"), [
    (dict(algo="grpo", divergence="fkl"), r"--algo grpo maximises the reward.*--divergence 'fkl'"),
    (dict(algo="grpo", temperature=0.7), r"samples from pi itself"),
    (dict(algo="grpo", batch_size=8, samples_per_prompt=1), r"--samples_per_prompt must be at least 2"),
    (dict(algo="grpo", grpo_loss="ppo"), r"--grpo_loss must be one of grpo, bnpo, dr_grpo, dapo"),
    (dict(algo="grpo", scale_rewards="prompt"), r"--scale_rewards must be one of group, batch, none"),
    (dict(algo="grpo", importance_sampling="token_mean"), r"--importance_sampling must be one of token, sequence"),
    (dict(algo="grpo", batch_size=8, samples_per_prompt=4, grpo_minibatches=3), r"--grpo_minibatches \(3\) must"),
    (dict(algo="grpo", grpo_delta=0.9), r"--grpo_delta 0.9 is out of range"),
    (dict(algo="grpo", kl_coef=-0.1), r"--kl_coef -0.1 is out of range"),
])
def test_bad_grpo_settings_are_refused_with_the_reason(settings: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        TrainConfig(**settings)
