r"""PPO on the shared engine: a special case of f-DPG on the exact enumerable model, and a run like f-DPG's.

1. With one epoch of one minibatch (ratio 1), no critic, :math:`\gamma = \lambda = 1`, the k1 KL in the reward and
   the constant normaliser (sum over tokens, mean over sequences), the mean of the gradients the real
   :class:`fdpg.algorithms.ppo.PPOTrainer` applies is
   :math:`\beta\,\nabla KL(\pi\|p)` for :math:`p\propto a\,e^{r/\beta}`,
   the f-DPG reverse-KL gradient scaled by :math:`\beta` (Hotelling's test against enumeration). Seeded bugs and
   a documented departure (advantage whitening) are rejected by the same test.
2. A short PPO run on the tiny model raises the reward of a simple scorer.
3. The run directory has f-DPG's files and shared metric names plus PPO's own; value head, KL controller and
   optimizer are checkpointed, and a resumed run reproduces the uninterrupted one.
4. Bad input fails before any expensive work, with the reason.
"""

from __future__ import annotations

import dataclasses
import json
import statistics
from pathlib import Path
from typing import Any

import pytest
import torch
from enumerable_lm import enumerable_trainer, exact_divergence_gradient, exact_prompt, recorded_gradients
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

import fdpg.algorithms.ppo as ppo_module
from fdpg.config import TrainConfig
from objectives import binary_constraint, exponential_family, get_divergence, rl_with_kl

BETA = 0.5
#: The settings under which PPO's expected gradient is exactly beta * grad KL(pi || p).
SPECIAL_CASE = dict(algo="ppo", ppo_epochs=1, ppo_minibatches=1, critic="none", gamma=1.0, gae_lambda=1.0,
                    kl_estimator="k1", kl_in="reward", loss_aggregation="seq_mean_token_sum",
                    whiten_advantages=False)
PPO_METRICS = ("ppo/approx_kl", "ppo/clip_fraction", "ppo/value_loss", "ppo/explained_variance", "ppo/kl_coef",
               "ppo/return_mean", "ppo/return_std", "ppo/advantage_mean", "ppo/advantage_std", "ppo/policy_loss")


def _special_case_gradients(model_dir: Path, tmp_path: Path, steps: int = 40, **changes: Any):
    trainer = enumerable_trainer(model_dir, tmp_path, beta=BETA, **{**SPECIAL_CASE, **changes})
    params = list(trainer._policy_trainable().values())
    exact = [exact_prompt(trainer, p) for p in trainer.prompts]
    gradient = BETA * exact_divergence_gradient(exact, get_divergence("rkl"), params)
    assert float(gradient.norm()) > 1e-3
    grads, metrics = recorded_gradients(trainer, steps)
    return grads, gradient, metrics


def test_ppo_special_case_is_beta_times_the_reverse_kl_gradient(enumerable_model_dir: Path, tmp_path: Path) -> None:
    grads, gradient, metrics = _special_case_gradients(enumerable_model_dir, tmp_path)
    t2, rank, p_value = projected_hotelling(grads, gradient)
    assert p_value > P_VALUE_FLOOR, f"T^2 = {t2:.1f} on {rank} dof (p = {p_value:.2g})"
    assert all(m["ppo/clip_fraction"] == 0 for m in metrics)  # ratio 1: nothing clipped
    assert all(abs(m["ppo/approx_kl"]) < 1e-6 for m in metrics)


TRUE_KL_PER_TOKEN = ppo_module.kl_per_token


def _kl_with_the_wrong_sign(*args: Any, **kwargs: Any) -> torch.Tensor:
    return -TRUE_KL_PER_TOKEN(*args, **kwargs)


@pytest.mark.parametrize("variant", ["kl sign flipped", "reward on the first token", "whitened advantages"])
@pytest.mark.slow
def test_the_special_case_test_rejects_departures(enumerable_model_dir: Path, tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch, variant: str) -> None:
    """Power check: two seeded bugs and one documented departure from the special case are rejected."""
    changes: dict[str, Any] = {}
    if variant == "kl sign flipped":
        monkeypatch.setattr(ppo_module, "kl_per_token", _kl_with_the_wrong_sign)
    elif variant == "reward on the first token":
        monkeypatch.setattr(ppo_module.PPOTrainer, "token_scores", lambda self, batch, scores, raw: torch.nn.functional
                            .pad(scores[:, None], (0, batch.completion_mask.shape[1] - 1)))
    else:
        changes["whiten_advantages"] = True
    grads, gradient, _ = _special_case_gradients(enumerable_model_dir, tmp_path, **changes)
    t2, rank, p_value = projected_hotelling(grads, gradient)
    assert p_value < 1e-6, f"{variant}: not rejected (T^2 = {t2:.1f} on {rank} dof, p = {p_value:.2g})"


# --------------------------------------------------------------------------------- runs on the tiny model
@pytest.mark.slow
def test_short_ppo_run_raises_the_reward(make_trainer) -> None:
    """Vowel fraction (the toy reward) of the last 5 steps' samples above the first 5's by 3 standard errors."""
    trainer = make_trainer(algo="ppo", steps=20, learning_rate=1e-2, batch_size=16, generation_batch_size=16,
                           micro_batch_size=16, samples_per_prompt=4, max_new_tokens=6, ppo_epochs=2)
    assert trainer.train()["status"] == "finished"
    samples = read_jsonl(trainer.run_dir / "samples.jsonl")
    first = [vowel_fraction(s["completion"]) for s in samples if s["step"] <= 5]
    last = [vowel_fraction(s["completion"]) for s in samples if s["step"] > 15]
    stderr = (statistics.variance(first) / len(first) + statistics.variance(last) / len(last)) ** 0.5
    assert statistics.mean(last) - statistics.mean(first) > 3 * stderr, (statistics.mean(first),
                                                                          statistics.mean(last), stderr)


@pytest.mark.slow
def test_ppo_run_directory_has_the_shared_metrics_and_its_own(make_trainer) -> None:
    trainer = make_trainer(algo="ppo", steps=2, lora_r=4, ppo_minibatches=2, micro_batch_size=2, target_kl=0.01)
    assert trainer.train()["status"] == "finished"
    run = trainer.run_dir
    metrics = read_jsonl(run / "metrics.jsonl")
    for m in metrics:
        missing = [k for k in (*REQUIRED_METRICS, *PPO_METRICS, "score/reward", "time/values") if k not in m]
        assert not missing, f"metrics.jsonl lacks {missing}"
    # the adaptive controller moved beta by Ziegler et al.'s rule, from the first step's KL (target 0.01, horizon 1e4)
    error = min(max(metrics[0]["kl_pi_a"] / 0.01 - 1, -0.2), 0.2)
    assert metrics[0]["ppo/kl_coef"] == pytest.approx(0.1) and error != 0
    assert metrics[1]["ppo/kl_coef"] == pytest.approx(0.1 * (1 + error * 8 / 10000), rel=1e-9)
    samples = read_jsonl(run / "samples.jsonl")
    assert {"prompt", "completion", "scores", "log_pi", "log_a", "log_p", "pseudo_reward"} <= set(samples[0])
    assert json.loads((run / "config.json").read_text())["config"]["algo"] == "ppo"
    assert (run / "final" / "value_head.safetensors").is_file()
    state = json.loads((run / "checkpoints" / "step-2" / "state.json").read_text())
    assert {"log_z", "kl_controller", "reward_moments"} <= set(state)
    from safetensors.torch import load_file

    saved = load_file(str(run / "checkpoints" / "step-2" / "trainable.safetensors"))
    assert any(k.startswith("value_head.") for k in saved) and any("lora_" in k for k in saved)


@pytest.mark.slow
def test_ppo_resume_reproduces_the_uninterrupted_run(tiny_model_dir: Path, tmp_path: Path) -> None:
    """Value head, adaptive KL controller, reward normaliser and optimizer states survive a resume exactly."""
    settings = dict(algo="ppo", lora_r=4, ppo_minibatches=2, ppo_epochs=2, target_kl=0.01, normalize_rewards=True,
                    save_every=2)
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
    assert resumed.kl_controller.value == pytest.approx(reference.kl_controller.value, rel=1e-12)


def test_old_values_from_the_sampling_pass_equal_a_forward_pass(make_trainer) -> None:
    """The value head read from sampling's hidden states (no second pass) is the value of a full forward pass."""
    trainer = make_trainer(algo="ppo", steps=1, lora_r=4, batch_size=8, generation_batch_size=4, micro_batch_size=3,
                           max_new_tokens=7)
    assert trainer.record_hidden
    with torch.no_grad():
        torch.nn.init.normal_(trainer.extra_modules["value_head"].linear.weight, std=1.0)
    batch = trainer.sample(0)
    assert batch.final_hidden is not None and batch.final_hidden.shape[:2] == batch.completion_ids.shape
    from_sampling = trainer.old_values(batch)
    from_forward = trainer.old_values(dataclasses.replace(batch, final_hidden=None))
    assert float(from_forward.abs().max()) > 0.1
    torch.testing.assert_close(from_sampling, from_forward, atol=1e-4, rtol=1e-4)
    assert bool((from_sampling[batch.completion_mask == 0] == 0).all())


@pytest.mark.slow
def test_ppo_with_a_separate_value_model(make_trainer, tiny_model_dir: Path) -> None:
    trainer = make_trainer(algo="ppo", steps=1, lora_r=4, critic="value_model", value_model=str(tiny_model_dir))
    assert trainer.train()["status"] == "finished"
    assert (trainer.run_dir / "final" / "value_model.safetensors").is_file()
    assert "ppo/value_loss" in read_jsonl(trainer.run_dir / "metrics.jsonl")[0]


# --------------------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize(("settings", "message"), [
    (dict(algo="dpg"), r"--algo must be one of fdpg, ppo"),
    (dict(algo="ppo", divergence="fkl"), r"reverse-KL objective.*--divergence 'fkl'"),
    (dict(algo="ppo", temperature=0.7), r"samples from pi itself"),
    (dict(algo="ppo", batch_size=8, samples_per_prompt=4, ppo_minibatches=3), r"--ppo_minibatches \(3\) must divide"),
    (dict(algo="ppo", critic="value_model"), r"--critic value_model needs --value_model"),
    (dict(algo="ppo", kl_estimator="k4"), r"--kl_estimator must be one of k1, k2, k3"),
    (dict(algo="ppo", dual_clip=0.5), r"--dual_clip 0.5 is out of range"),
])
def test_bad_ppo_settings_are_refused_with_the_reason(settings: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        TrainConfig(**settings)


@pytest.mark.parametrize("target", [binary_constraint("b"), exponential_family({"b": 1.0})], ids=["binary", "expfam"])
def test_a_target_without_a_scalar_reward_is_refused_unless_a_feature_is_named(target) -> None:
    with pytest.raises(ValueError, match=r"scalar reward.*--algo fdpg.*--reward_feature"):
        ppo_module.reward_target(target, None, 0.1)
    named = ppo_module.reward_target(target.as_conditional(), "b", 0.1)
    assert named.describe() == rl_with_kl("b", 0.1).as_conditional().describe()


def test_cli_refuses_a_constraint_task_before_loading_any_model(tmp_path: Path) -> None:
    from fdpg.cli import build_trainer as cli_build_trainer

    config = TrainConfig(algo="ppo", task="lexical", model=str(tmp_path / "no-such-model"), progress=False)
    with pytest.raises(ValueError, match=r"scalar reward"):
        cli_build_trainer(config)  # a model load would fail with another error


def test_a_value_model_with_another_tokenizer_is_refused(make_trainer, enumerable_model_dir: Path) -> None:
    with pytest.raises(ValueError, match=r"--value_model .* another tokenizer"):
        make_trainer(algo="ppo", critic="value_model", value_model=str(enumerable_model_dir))



@pytest.mark.parametrize("micro_batch_size", [8, 3], ids=["one_micro_batch", "three_micro_batches"])
def test_ppo_ptx_adds_the_coefficient_times_the_lm_loss_gradient(make_trainer, tmp_path, monkeypatch,
                                                                 micro_batch_size: int) -> None:
    r"""PPO-ptx: one step's gradient with ``--ptx_coef G`` minus the same step's without it is exactly
    :math:`G\nabla\mathcal L_{LM}` of the pretraining pieces drawn for the minibatch (transformers' causal-LM loss,
    recomputed here: one token mean over the whole minibatch), and ``ppo/ptx_loss`` is that loss; also when the
    minibatch runs in several micro-batches of unequal token counts (each normalised by its own count instead
    gives another gradient: issue 34)."""
    text = tmp_path / "pretraining.jsonl"
    text.write_text("".join(json.dumps({"text": t}) + "\n" for t in (
        "the quick brown fox jumps over the lazy dog", "a stitch in time saves nine", "all that glitters is not gold",
        "where there is smoke there is fire", "many hands make light work", "the early bird catches the worm",
        "actions speak louder than words", "better late than never", "look before you leap")))

    def step_gradient(**overrides):
        trainer = make_trainer(algo="ppo", steps=1, ppo_epochs=1, critic="none", output_dir=tmp_path / str(overrides),
                               micro_batch_size=micro_batch_size, **overrides)
        grads = {}

        def capture():
            grads.update({k: p.grad.detach().clone() for k, p in trainer._trainable().items()})
            trainer.optimizer.zero_grad(set_to_none=True)
            return None

        monkeypatch.setattr(trainer, "optimizer_step", capture)
        return trainer, trainer.train_step(0), grads

    coef = 0.7
    _, _, plain = step_gradient()
    trainer, metrics, mixed = step_gradient(ptx_data=str(text), ptx_coef=coef, ptx_length=8)
    index = trainer.ptx_batches.step(0)[trainer.ptx_slice()]
    assert len(index) == trainer.config.batch_size  # as many pieces as the minibatch has sequences
    rows = [trainer.ptx.prompt_ids[i] + trainer.ptx.completion_ids[i] for i in index]
    width = max(map(len, rows))
    pad = trainer.policy.tokenizer.pad_token_id
    input_ids = torch.tensor([r + [pad] * (width - len(r)) for r in rows])
    attention = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
    labels = input_ids.masked_fill(attention == 0, -100)
    labels[:, 0] = -100  # the BOS before each piece carries no loss
    lm_loss = trainer.model(input_ids=input_ids, attention_mask=attention, labels=labels).loss
    params = trainer._trainable()
    expected = torch.autograd.grad(coef * lm_loss, list(params.values()))
    assert metrics["ppo/ptx_loss"] == pytest.approx(float(lm_loss), abs=1e-5)
    for (name, got), want in zip(mixed.items(), expected):
        torch.testing.assert_close(got - plain[name], want, rtol=1e-4, atol=1e-6, msg=name)
    assert max(float(g.abs().max()) for g in expected) > 1e-6


@pytest.mark.slow
def test_the_critic_initialised_from_a_reward_model_reads_its_logit_of_each_prefix(tiny_model_dir, make_trainer,
                                                                                  tmp_path) -> None:
    r"""``--critic reward_model:RUN`` (InstructGPT's value initialisation): before any update
    :math:`V(s_t)` is the reward model's logit of the prefix :math:`(c, y_{<t})`, read from its own
    sequence-classification forward on the same token ids; PPO then trains with it."""
    from fdpg.algorithms.reward_model import RewardModel
    from fdpg.commands.reward_model import cmd_reward_model
    from fdpg.critic import ValueModel
    from fdpg.sampling import SampleBatch

    rows = [{"prompt": p, "responses": [p + " good", p + " bad", p + " so so"]} for p in
            ("hello", "the cat", "my day", "a b", "one two", "x y z", "tea", "sun")]
    data = tmp_path / "rankings.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    run = tmp_path / "rm"
    assert cmd_reward_model(["train", "--data", str(data), "--model", str(tiny_model_dir), "--batch_size", "4",
                             "--steps", "2", "--progress", "false", "--output_dir", str(run)]) == 0
    reward_model = RewardModel.load(run)
    trainer = make_trainer(algo="ppo", steps=1, critic=f"reward_model:{run}")
    value = trainer.extra_modules["value_model"]
    assert isinstance(value, ValueModel)
    tokenizer = trainer.policy.tokenizer
    prompt_ids = [tokenizer("hello")["input_ids"], tokenizer("the cat")["input_ids"]]
    completions = [tokenizer(" sat on a mat", add_special_tokens=False)["input_ids"],
                   tokenizer(" ran", add_special_tokens=False)["input_ids"]]
    batch = SampleBatch.from_token_rows(["hello", "the cat"], prompt_ids, completions, ["", ""],
                                        tokenizer.pad_token_id)
    with torch.no_grad():
        values = value(batch)
        for j, (p, c) in enumerate(zip(prompt_ids, completions)):
            for t in range(len(c)):
                ids = torch.tensor([p + c[:t]])
                logit = reward_model.model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits[0, 0]
                assert float(values[j, t]) == pytest.approx(float(logit), abs=1e-5), (j, t)
    assert float(values.abs().max()) > 0  # not a zero-initialised head
    metrics = trainer.train_step(0)
    assert metrics["ppo/value_loss"] is not None
