"""The f-DPG trainer end to end on a tiny model: run directory, metrics, LoRA reference, divergences."""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path

import pytest
import torch
from fdpg_testing import REQUIRED_METRICS, read_jsonl, toy_scorer, trainable_state
from safetensors.torch import load_file

import fdpg.algorithms.f_dpg as trainer_module
import fdpg.engine as engine_module
from fdpg.log_probs import completion_token_log_probs
from fdpg.models import load_causal_lm
from fdpg.sampling import sample_completions
from objectives import ZeroTargetError, binary_constraint, rl_with_kl
from objectives import surrogate_loss as true_surrogate_loss


def _check_run_dir(run_dir: Path, steps: int, weights_file: str) -> list[dict]:
    config = json.loads((run_dir / "config.json").read_text())
    assert config["config"]["steps"] == steps and config["config"]["divergence"]
    env = config["environment"]
    assert {"versions", "git_commit"} <= set(env)
    assert env["versions"]["torch"] and env["versions"]["transformers"] and env["versions"]["fdpg"]

    metrics = read_jsonl(run_dir / "metrics.jsonl")
    assert [m["step"] for m in metrics] == list(range(1, steps + 1))
    for m in metrics:
        missing = [k for k in REQUIRED_METRICS if k not in m]
        assert not missing, f"metrics.jsonl lacks {missing}"
        assert any(k.startswith("score/") for k in m)
        for k in ("kl_pi_a", "entropy", "log_z", "tokens_per_s", "time/generate", "time/backward"):
            assert isinstance(m[k], float) and math.isfinite(m[k]), (k, m[k])
        assert 0 <= m["distinct_1"] <= 1 and m["tokens_per_s"] > 0

    samples = read_jsonl(run_dir / "samples.jsonl")
    assert len(samples) == 8 * steps
    assert {"step", "prompt", "completion", "scores", "log_pi", "log_a", "log_p", "pseudo_reward"} <= set(samples[0])
    first = [s for s in samples if s["step"] == 1]
    assert [s["scores"]["reward"] for s in first] == pytest.approx(toy_scorer([s["completion"] for s in first],
                                                                              [])["reward"])

    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "finished" and summary["steps_completed"] == steps and summary["error"] is None
    assert (run_dir / "final" / weights_file).is_file()
    assert (run_dir / "checkpoints" / f"step-{steps}" / "trainable.safetensors").is_file()
    return metrics


@pytest.mark.slow
def test_full_fine_tuning_run_writes_everything_and_trains(make_trainer, tiny_model_dir: Path) -> None:
    trainer = make_trainer(steps=3)
    before = trainable_state(trainer)
    summary = trainer.train()
    assert summary["status"] == "finished"
    run_dir = trainer.run_dir
    metrics = _check_run_dir(run_dir, 3, "model.safetensors")
    after = trainable_state(trainer)
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert len(changed) == len(before), f"unchanged parameters: {set(before) - set(changed)}"
    assert metrics[0]["kl_pi_a"] == pytest.approx(0.0, abs=1e-5)  # first batch: pi = a
    assert metrics[-1]["kl_pi_a"] != pytest.approx(0.0, abs=1e-6)
    # final/ is the trained model, and the reference copy is still the base model
    final = load_file(str(run_dir / "final" / "model.safetensors"))
    name = next(k for k in final if "q_proj" in k)
    torch.testing.assert_close(final[name], after[name])
    base = load_causal_lm(str(tiny_model_dir))
    for n, p in trainer.policy._reference.named_parameters():
        assert torch.equal(p, base.state_dict()[n]), n


@pytest.mark.slow
def test_lora_run_reference_is_the_adapter_free_base(make_trainer, tiny_model_dir: Path) -> None:
    trainer = make_trainer(steps=3, lora_r=4, lora_target_modules="q_proj,v_proj")
    policy = trainer.policy
    assert policy.uses_lora and policy._reference is None  # no second copy of the weights
    before = trainable_state(trainer)
    assert before and all("lora_" in k for k in before)
    trainer.train()
    _check_run_dir(trainer.run_dir, 3, "adapter_model.safetensors")
    after = trainable_state(trainer)
    assert any(not torch.equal(before[k], after[k]) for k in before)

    base = load_causal_lm(str(tiny_model_dir))
    model = trainer._unwrapped()
    # The base weights inside the PEFT model did not change.
    base_state = base.state_dict()
    frozen = {k.replace("base_model.model.", "").replace(".base_layer", ""): v
              for k, v in model.state_dict().items() if "lora_" not in k}
    assert set(frozen) == set(base_state)
    for name, value in base_state.items():
        assert torch.equal(frozen[name], value), name

    batch = sample_completions(model, policy.tokenizer, ["hello", "the cat sat on"] * 2, 10, seed=5)
    with torch.no_grad():
        with policy.reference(model) as ref:
            log_a = completion_token_log_probs(ref, batch)
        log_base = completion_token_log_probs(base, batch)
        log_pi = completion_token_log_probs(model, batch)
    torch.testing.assert_close(log_a, log_base, atol=1e-5, rtol=0)
    assert float((log_pi - log_a).abs().max()) > 1e-4  # the adapter is back on after the context
    assert any("lora_" in k for k in load_file(str(trainer.run_dir / "final" / "adapter_model.safetensors")))


@pytest.mark.slow
def test_second_run_never_overwrites_the_first(make_trainer, tmp_path: Path) -> None:
    first = make_trainer(steps=1, output_dir=tmp_path / "same")
    first.train()
    first_metrics = (tmp_path / "same" / "metrics.jsonl").read_text()
    second = make_trainer(steps=1, output_dir=tmp_path / "same")
    second.train()
    assert first.run_dir == tmp_path / "same"
    assert second.run_dir == tmp_path / "same-2"
    assert (tmp_path / "same" / "metrics.jsonl").read_text() == first_metrics
    assert len(read_jsonl(tmp_path / "same-2" / "metrics.jsonl")) == 1


def _vowel_constraint(completions: list[str], prompts: list[str]) -> dict[str, list[float]]:
    """b = 1 for completions containing a vowel (about half of the tiny model's samples)."""
    return {"b": [float(any(v in t for v in "aeiou")) for t in completions]}


@pytest.mark.parametrize("divergence", ["fkl", "tv", "js"])
def test_finite_f_prime_at_infinity_handles_zero_target(make_trainer, divergence: str) -> None:
    expected = {"fkl": 0.0, "tv": -0.5, "js": -math.log(2)}[divergence]  # -f'(inf) where p = 0
    trainer = make_trainer(steps=2, divergence=divergence, target=binary_constraint("b"),
                           scorer=_vowel_constraint)
    before = trainable_state(trainer)
    summary = trainer.train()
    assert summary["status"] == "finished"
    metrics = read_jsonl(trainer.run_dir / "metrics.jsonl")
    assert all(0 < m["target_zero_fraction"] < 1 for m in metrics)
    samples = read_jsonl(trainer.run_dir / "samples.jsonl")
    zero = [s for s in samples if s["scores"]["b"] == 0]
    assert zero and all(s["log_p"] is None for s in zero)  # -inf is written as null
    assert all(s["pseudo_reward"] == pytest.approx(expected) for s in zero)
    assert all(math.isfinite(s["pseudo_reward"]) for s in samples)
    after = trainable_state(trainer)
    assert any(not torch.equal(v, after[k]) for k, v in before.items())


def test_all_zero_first_batch_under_forward_kl(make_trainer) -> None:
    """No sample has P > 0 yet (Z estimate 0): p = 0 for every sample, not NaN."""
    trainer = make_trainer(steps=2, divergence="fkl", target=binary_constraint("b"),
                           scorer=lambda c, p: {"b": [0.0] * len(c)})
    assert trainer.train()["status"] == "finished"
    metrics = read_jsonl(trainer.run_dir / "metrics.jsonl")
    assert [m["target_zero_fraction"] for m in metrics] == [1.0, 1.0]
    assert [m["pseudo_reward_mean"] for m in metrics] == [0.0, 0.0]


def test_reverse_kl_on_zero_target_fails_clearly(make_trainer) -> None:
    trainer = make_trainer(steps=2, divergence="rkl", target=binary_constraint("b"),
                           scorer=lambda c, p: {"b": [float(i % 2) for i in range(len(c))]})
    with pytest.raises(ZeroTargetError, match=r"p\(x\) = 0.*'rkl'.*(fkl|max_log_ratio)"):
        trainer.train()
    summary = json.loads((trainer.run_dir / "summary.json").read_text())
    assert summary["status"] == "failed" and "ZeroTargetError" in summary["error"]
    assert summary["steps_completed"] == 0
    assert not (trainer.run_dir / "final").exists()


def test_conditional_target_keeps_one_log_z_per_prompt(make_trainer) -> None:
    trainer = make_trainer(steps=2, target=rl_with_kl("reward", 0.1).as_conditional())
    trainer.train()
    metrics = read_jsonl(trainer.run_dir / "metrics.jsonl")
    prompts = {s["prompt"] for s in read_jsonl(trainer.run_dir / "samples.jsonl")}
    assert metrics[-1]["log_z_keys"] == len(prompts) >= 2
    assert json.loads((trainer.run_dir / "config.json").read_text())["config"]["conditional"] is True


def test_gpt2_with_lora_on_its_attention(make_trainer, tiny_gpt2_dir: Path) -> None:
    trainer = make_trainer(model_dir=tiny_gpt2_dir, steps=1, lora_r=4, lora_target_modules="c_attn")
    assert trainer.train()["status"] == "finished"
    assert (trainer.run_dir / "final" / "adapter_model.safetensors").is_file()


def test_lora_target_modules_that_do_not_exist_name_the_real_layers(make_trainer) -> None:
    with pytest.raises(ValueError, match=r"--lora_target_modules 'c_attn'.*q_proj"):
        make_trainer(lora_r=4, lora_target_modules="c_attn")


@pytest.mark.slow
def test_bf16_mixed_precision_samples_from_the_policy_it_trains(make_trainer) -> None:
    """Under --mixed_precision bf16 --bf16_sampling autocast generation runs under the same autocast as the scoring
    and training passes, so the recorded log pi is that of the bf16 policy (not of the fp32 one) and a step
    trains."""
    trainer = make_trainer(mixed_precision="bf16", bf16_sampling="autocast", lora_r=4, max_new_tokens=16)
    batch = trainer.sample(0)
    model, mask = trainer._unwrapped(), batch.completion_mask.bool()
    with torch.inference_mode():
        with trainer.accelerator.autocast():
            bf16 = completion_token_log_probs(model, batch)
        fp32 = completion_token_log_probs(model, batch)
    off_bf16 = float((batch.token_log_pi - bf16)[mask].abs().mean())
    off_fp32 = float((batch.token_log_pi - fp32)[mask].abs().mean())
    assert off_bf16 < 0.5 * off_fp32, (off_bf16, off_fp32)
    metrics = trainer.train_step(0)
    assert math.isfinite(metrics["kl_pi_a"]) and math.isfinite(metrics["grad_norm"])


@pytest.mark.parametrize(("native", "amx", "says"), [(False, False, "without native bf16"),
                                                    (True, False, "avx512_bf16 but no AMX"), (True, True, None)])
def test_bf16_on_a_cpu_where_it_is_slower_warns(make_trainer, monkeypatch, native: bool, amx: bool,
                                                says: str | None) -> None:
    """bf16 matmuls without avx512_bf16/AMX run ~50x slower than fp32, with avx512_bf16 alone no faster: the
    trainer says which, and says nothing on an AMX CPU."""
    monkeypatch.setattr(engine_module, "cpu_bf16_is_native", lambda: native)
    monkeypatch.setattr(engine_module, "cpu_has_amx", lambda: amx)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        make_trainer(mixed_precision="bf16", lora_r=4)
    slow = [str(w.message) for w in caught if "--mixed_precision bf16 on a CPU" in str(w.message)]
    assert slow == ([] if says is None else [slow[0]]) and (says is None or says in slow[0]), slow


@pytest.mark.parametrize("precision", ["no", "bf16"])
def test_the_micro_batch_loop_casts_the_frozen_weights_once_under_bf16(make_trainer, precision: str) -> None:
    """Every algorithm's backward loop (TrainingLoop.accumulation) runs with the frozen linear layers on copies cast
    once for the step under --mixed_precision bf16 (fdpg.cast_linears.cast_frozen_linears), and only then; the
    adapter's layers keep autocast's casts, and every forward is restored after the loop."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # bf16 on a CPU where it is slow
        trainer = make_trainer(mixed_precision=precision, lora_r=4)
    modules = list(trainer._unwrapped().modules())
    frozen = [m for m in modules if type(m) is torch.nn.Linear and not m.weight.requires_grad]
    trainable = [m for m in modules if type(m) is torch.nn.Linear and m.weight.requires_grad]
    seen = []
    for _rows, _ in trainer.accumulation(range(4), size=2):
        seen.append(sum("forward" in vars(m) for m in frozen))
        assert not any("forward" in vars(m) for m in trainable)
    assert frozen and trainable and seen == [len(frozen) if precision == "bf16" else 0] * 2
    assert not any("forward" in vars(m) for m in frozen)  # (accelerate wraps the top model's own forward)


def test_update_log_z_returns_log_P_minus_the_importance_sampling_log_Z(make_trainer) -> None:
    r"""``update_log_z`` adds the batch to the running estimate and returns :math:`\log p = \log P - \log\hat Z_c`
    with, per key :math:`c` over the :math:`n_c` samples seen so far,
    :math:`\log\hat Z_c = \operatorname{logsumexp}_{k \in c}(\log P_k - \log q_k) - \log n_c` (recomputed here
    from the batches alone). After the first batch that forces the self-normalisation
    :math:`\frac{1}{n_c}\sum_{k\in c} p_k/q_k = 1` exactly; :math:`P = 0` stays :math:`p = 0`. Returning
    :math:`\log P` itself (no :math:`\log Z` subtracted) fails all three."""
    trainer = make_trainer()
    gen = torch.Generator().manual_seed(0)
    keys = ["c", "d", "c", "d", "c", "d"]
    batches = []
    for _ in range(2):
        log_P = (3.0 + 2.0 * torch.randn(6, generator=gen)).double()
        log_P[4] = -math.inf  # P = 0: one sample of key c
        log_q = (-5.0 + torch.randn(6, generator=gen)).double()
        batches.append((log_P, log_q))
    for step, (log_P, log_q) in enumerate(batches):
        log_p = trainer.update_log_z(log_P, log_q, keys)
        for c in set(keys):
            idx = [j for j, k in enumerate(keys) if k == c]
            seen = torch.cat([(P - q)[idx] for P, q in batches[:step + 1]])
            log_z = float(torch.logsumexp(seen, 0)) - math.log(len(seen))
            assert abs(log_z) > 1.0  # Z far from 1, so a missing log Z cannot pass
            finite = [j for j in idx if math.isfinite(float(log_P[j]))]
            torch.testing.assert_close(log_p[finite], log_P[finite] - log_z, rtol=0, atol=1e-9)
            if step == 0:
                ratio = torch.exp(log_p[idx] - log_q[idx])  # p/q, 0 where P = 0
                assert float(ratio.sum()) / len(idx) == pytest.approx(1.0, abs=1e-9)
        assert float(log_p[4]) == -math.inf


def test_forward_kl_pseudo_rewards_in_the_loss_are_normalised_per_prompt(make_trainer, monkeypatch) -> None:
    r"""The pseudo-rewards that reach the loss depend on :math:`\log Z`: on the first step, on-policy
    (:math:`q = \pi_\theta`), one :math:`Z_c` per prompt, the forward-KL pseudo-reward is
    :math:`R_j = p_j/\pi_j = (P_j/q_j)\big/\big(\frac{1}{n_c}\sum_{k\in c}P_k/q_k\big)`, so its mean over each
    prompt is exactly 1 (with :math:`\log Z` left out it would be :math:`\hat Z_c`, here far from 1), and the
    baseline beside it is the default ``prompt_loo``: :math:`b_j = \frac{1}{n_c-1}\sum_{k\ne j, c_k=c_j}R_k
    = (n_c - R_j)/(n_c - 1)`."""
    recorded = []

    def recording_loss(log_pi, rewards, baseline=0.0, importance_weights=None, normaliser=None):
        recorded.append((rewards.detach().clone(), baseline.detach().clone(), importance_weights))
        return true_surrogate_loss(log_pi, rewards, baseline, importance_weights, normaliser)

    monkeypatch.setattr(trainer_module, "surrogate_loss", recording_loss)
    trainer = make_trainer(steps=1, divergence="fkl", target=rl_with_kl("reward", 0.1).as_conditional())
    assert trainer.config.baseline == "prompt_loo" and trainer.proposal is None
    prompts = trainer.step_prompts(0)  # the batch's prompt per sample (the same draw as train_step's)
    trainer.train_step(0)
    rewards = torch.cat([r for r, _, _ in recorded]).double()
    baseline = torch.cat([b for _, b, _ in recorded]).double()
    assert len(rewards) == len(prompts) == trainer.config.batch_size and all(w is None for _, _, w in recorded)
    assert sorted(trainer.log_z.keys) == sorted(set(prompts))
    assert all(abs(trainer.log_z.log_z(c)) > 1.0 for c in set(prompts))  # Z_c far from 1: a dropped log Z shows
    for c in set(prompts):
        idx = [j for j, q in enumerate(prompts) if q == c]
        group, n_c = rewards[idx], len(idx)
        assert n_c >= 2 and float(group.mean()) == pytest.approx(1.0, abs=1e-6), (c, group)
        torch.testing.assert_close(baseline[idx], (n_c - group) / (n_c - 1), rtol=0, atol=1e-6)
