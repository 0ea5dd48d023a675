"""Fixtures of the task tests: one torch thread, and a 2-step f-DPG run of a task spec on the tiny model."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch


@pytest.fixture(scope="session", autouse=True)
def _one_torch_thread() -> Iterator[None]:
    """One intra-op thread: tiny models gain nothing from more on a busy 2-core machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def small_config(model_dir: Path | str, output_dir: Path | str, **overrides: Any):
    """A 2-step TrainConfig: batch 8 = 2 prompts x 4 samples, 12 new tokens."""
    from fdpg.config import TrainConfig

    settings: dict[str, Any] = dict(
        model=str(model_dir), task="test", divergence="fkl", beta=0.1, steps=2, batch_size=8,
        samples_per_prompt=4, generation_batch_size=8, micro_batch_size=8, max_new_tokens=12,
        learning_rate=1e-3, seed=0, output_dir=str(output_dir), save_every=10, progress=False, eval_samples=0,
    )
    settings.update(overrides)
    return TrainConfig(**settings)


@pytest.fixture
def smoke_run(tiny_model_dir: Path, tmp_path: Path) -> Callable[..., list[dict[str, Any]]]:
    """``smoke_run(spec, **config) -> metrics``: FDPGTrainer on the tiny Llama toward ``spec`` for 2 steps."""
    from fdpg.algorithms.f_dpg import FDPGTrainer
    from fdpg.policy import Policy

    def run(spec, **overrides: Any) -> list[dict[str, Any]]:
        config = small_config(tiny_model_dir, tmp_path / "run", **overrides)
        torch.manual_seed(0)
        policy = Policy.from_pretrained(str(tiny_model_dir))
        trainer = FDPGTrainer(config, policy, spec.target, spec.scorer, spec.prompts, spec.metrics)
        summary = trainer.train()
        assert summary["status"] == "finished", summary
        lines = (trainer.run_dir / "metrics.jsonl").read_text().splitlines()
        metrics = [json.loads(line) for line in lines if line.strip()]
        assert [m["step"] for m in metrics] == [1, 2]
        return metrics

    return run
