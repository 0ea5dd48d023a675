"""Helpers of the engine tests (imported by the tests, their conftest and the distributed worker script).

The scorer is a plain string function, so every run is reproducible: ``reward`` is the fraction of
vowels in a completion (it varies across the random completions of the tiny models, so the gradient is
not zero), ``b`` is 1 when the completion contains an ``a`` (often 0: a binary target with zeros).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch

VOWELS = "aeiou"
PROMPTS = ["hello", "the cat sat on", "a", "my review:"]
#: Keys every line of metrics.jsonl must have (besides the task's ``score/...``).
REQUIRED_METRICS = (
    "step", "kl_pi_a", "kl_p_pi", "d_f", "log_z", "log_z_ess", "pseudo_reward_mean", "pseudo_reward_std",
    "entropy", "distinct_1", "distinct_2", "distinct_3", "tokens_per_s", "time/generate", "time/score",
    "time/reference", "time/backward", "time/optimizer",
)


def vowel_fraction(text: str) -> float:
    return sum(ch in VOWELS for ch in text) / max(len(text), 1)


def toy_scorer(completions: list[str], prompts: list[str]) -> dict[str, list[float]]:
    """``reward`` = fraction of vowels, ``b`` = contains an 'a' (0/1)."""
    return {"reward": [vowel_fraction(t) for t in completions], "b": [float("a" in t) for t in completions]}


def train_config(model_dir: Path | str, output_dir: Path | str, **overrides: Any):
    """A small, fast TrainConfig (batch 8 = 2 prompts x 4 samples, 10 new tokens, lr 1e-3)."""
    from fdpg.config import TrainConfig

    settings: dict[str, Any] = dict(
        model=str(model_dir), task="toy", divergence="rkl", beta=0.1, steps=3, batch_size=8,
        samples_per_prompt=4, generation_batch_size=8, micro_batch_size=8, max_new_tokens=10,
        learning_rate=1e-3, seed=0, output_dir=str(output_dir), save_every=10, progress=False, eval_samples=0,
    )
    settings.update(overrides)
    return TrainConfig(**settings)


def build_trainer(model_dir: Path | str, output_dir: Path | str, target=None, scorer=toy_scorer,
                  prompts=PROMPTS, **overrides: Any):
    """The online trainer of ``algo`` (f-DPG by default; PPO, GRPO, RAFT) on a freshly loaded
    model; ``target`` defaults to
    ``rl_with_kl('reward', beta)``."""
    from fdpg.algorithms import online_trainer_class
    from fdpg.policy import LoraSettings, Policy
    from objectives import rl_with_kl

    config = train_config(model_dir, output_dir, **overrides)
    lora = (LoraSettings(config.lora_r, config.lora_alpha, config.lora_dropout, config.lora_target_modules)
            if config.lora_r > 0 else None)
    torch.manual_seed(config.seed)  # the LoRA initialisation, as `fdpg train` does
    policy = Policy.from_pretrained(config.model, lora=lora)
    target = target if target is not None else rl_with_kl("reward", config.beta)
    return online_trainer_class(config.algo)(config, policy, target, scorer, prompts)


def run_cli(argv: list[str], capsys) -> tuple[int, str, str]:
    """``fdpg.cli.main(argv)``'s exit code (argparse errors raise SystemExit), stdout and stderr."""
    from fdpg.cli import main

    try:
        code = main(argv)
    except SystemExit as exc:
        code = exc.code
    out, err = capsys.readouterr()
    return code, out, err


def read_jsonl(path: Path | str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def assert_same_metrics(got: dict[str, Any], want: dict[str, Any], atol: float = 1e-6) -> None:
    """Every logged value equal (numbers within ``atol`` or relative 1e-6) except timings and throughput."""
    def compared(d: dict[str, Any]) -> set[str]:
        return {k for k in d if not k.startswith("time/") and k != "tokens_per_s"}

    assert compared(got) == compared(want), f"keys differ: {sorted(compared(got) ^ compared(want))}"
    for key in sorted(compared(want)):
        a, b = got[key], want[key]
        if isinstance(a, float) or isinstance(b, float):
            assert a is not None and b is not None, f"step {want.get('step')} {key}: {a!r} vs {b!r}"
            assert math.isclose(a, b, rel_tol=1e-6, abs_tol=atol), f"step {want.get('step')} {key}: {a!r} vs {b!r}"
        else:
            assert a == b, f"step {want.get('step')} {key}: {a!r} vs {b!r}"


def trainable_state(trainer) -> dict[str, torch.Tensor]:
    """A detached CPU copy of the trainer's trainable parameters."""
    return {k: v.detach().cpu().clone() for k, v in trainer._trainable().items()}


def assert_same_state(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor], atol: float = 1e-6) -> None:
    assert sorted(got) == sorted(want)
    for name in want:
        diff = float((got[name] - want[name]).abs().max())
        assert diff <= atol, f"parameter {name} differs by {diff:.3g}"


def nonzero_lora_policy(directory: Path, dropout: float = 0.0):
    """A LoRA (r=4, all linear layers) policy whose ``B`` is random, so that it differs from its reference."""
    from fdpg.policy import LoraSettings, Policy

    torch.manual_seed(0)
    policy = Policy.from_pretrained(str(directory), lora=LoraSettings(4, 8.0, dropout, "all-linear"))
    with torch.no_grad():
        for name, p in policy.model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    return policy


def vllm_test_generator():
    """A vLLM generator for the tests: eager (a 3 s start, no compilation), a 0.25 GiB KV cache."""
    from fdpg.config import TrainConfig
    from fdpg.generation import build_generator

    config = TrainConfig(generation="vllm", vllm_enforce_eager=True, vllm_kv_cache_gb=0.25)
    return build_generator("vllm", config.vllm_settings())
