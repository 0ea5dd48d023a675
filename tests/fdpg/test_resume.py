"""Checkpoints and resumption: an interrupted run, resumed, reproduces the uninterrupted one."""

from __future__ import annotations

import json
import os
import shutil
import signal
from pathlib import Path

import pytest
from fdpg_testing import (
    assert_same_metrics,
    assert_same_state,
    build_trainer,
    read_jsonl,
    toy_scorer,
    trainable_state,
)

from fdpg.checkpoint import checkpoint_dirs

STEPS = 4


class ScorerError(RuntimeError):
    pass


SIGNALS = {"sigterm": signal.SIGTERM, "sigint": signal.SIGINT}


class FlakyScorer:
    """The toy scorer, with an action (``raise``, or send a signal: ``sigterm``, ``sigint``) on its ``at``-th call."""

    def __init__(self, at: int, action: str) -> None:
        self.at, self.action, self.calls = at, action, 0

    def __call__(self, completions: list[str], prompts: list[str]):
        self.calls += 1
        if self.calls == self.at:
            if self.action == "raise":
                raise ScorerError("the scorer's server went away")
            os.kill(os.getpid(), SIGNALS[self.action])
        return toy_scorer(completions, prompts)


@pytest.fixture(scope="module", params=[0, 4], ids=["full", "lora"])
def reference_run(request, tiny_model_dir: Path, tmp_path_factory) -> dict:
    """An uninterrupted 4-step run: its metrics and final trainable parameters."""
    lora_r = request.param
    trainer = build_trainer(tiny_model_dir, tmp_path_factory.mktemp("reference") / "run", steps=STEPS,
                            lora_r=lora_r)
    assert trainer.train()["status"] == "finished"
    return {"lora_r": lora_r, "metrics": read_jsonl(trainer.run_dir / "metrics.jsonl"),
            "params": trainable_state(trainer)}


def _resume(tiny_model_dir: Path, run_dir: Path, lora_r: int, **overrides):
    trainer = build_trainer(tiny_model_dir, run_dir.parent / "ignored", resume=str(run_dir), steps=STEPS,
                            lora_r=lora_r, **overrides)
    summary = trainer.train()
    assert summary["status"] == "finished" and summary["steps_completed"] == STEPS
    assert trainer.run_dir == run_dir
    assert not (run_dir.parent / "ignored").exists()  # output_dir is not used when resuming
    return trainer


def _assert_reproduces(reference: dict, run_dir: Path, trainer) -> None:
    metrics = read_jsonl(run_dir / "metrics.jsonl")
    assert [m["step"] for m in metrics] == list(range(1, STEPS + 1))
    for got, want in zip(metrics, reference["metrics"]):
        assert_same_metrics(got, want)
    assert_same_state(trainable_state(trainer), reference["params"])
    samples = read_jsonl(run_dir / "samples.jsonl")
    assert [s["step"] for s in samples] == [s for s in range(1, STEPS + 1) for _ in range(8)]
    assert json.loads((run_dir / "summary.json").read_text())["status"] == "finished"


@pytest.mark.slow
def test_stop_and_resume_reproduces_uninterrupted_run(reference_run, tiny_model_dir: Path, tmp_path: Path) -> None:
    lora_r = reference_run["lora_r"]
    first = build_trainer(tiny_model_dir, tmp_path / "run", steps=2, lora_r=lora_r)
    assert first.train()["status"] == "finished"
    run_dir = first.run_dir
    assert [p.name for p in checkpoint_dirs(run_dir)] == ["step-2"]
    for got, want in zip(read_jsonl(run_dir / "metrics.jsonl"), reference_run["metrics"][:2]):
        assert_same_metrics(got, want)
    trainer = _resume(tiny_model_dir, run_dir, lora_r)
    _assert_reproduces(reference_run, run_dir, trainer)


@pytest.mark.slow
def test_failing_scorer_leaves_a_resumable_run(reference_run, tiny_model_dir: Path, tmp_path: Path) -> None:
    lora_r = reference_run["lora_r"]
    trainer = build_trainer(tiny_model_dir, tmp_path / "run", steps=STEPS, lora_r=lora_r,
                            scorer=FlakyScorer(at=3, action="raise"))
    with pytest.raises(ScorerError, match="went away"):
        trainer.train()
    run_dir = trainer.run_dir
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "failed" and "ScorerError" in summary["error"]
    assert summary["steps_completed"] == 2
    assert [m["step"] for m in read_jsonl(run_dir / "metrics.jsonl")] == [1, 2]
    assert [p.name for p in checkpoint_dirs(run_dir)] == ["step-2"]  # saved although save_every=10
    assert not (run_dir / "final").exists()

    resumed = _resume(tiny_model_dir, run_dir, lora_r)
    _assert_reproduces(reference_run, run_dir, resumed)


@pytest.mark.slow
def test_sigterm_finishes_the_step_saves_and_resumes(reference_run, tiny_model_dir: Path, tmp_path: Path) -> None:
    lora_r = reference_run["lora_r"]
    trainer = build_trainer(tiny_model_dir, tmp_path / "run", steps=STEPS, lora_r=lora_r,
                            scorer=FlakyScorer(at=2, action="sigterm"))
    previous = signal.getsignal(signal.SIGTERM)
    summary = trainer.train()
    assert signal.getsignal(signal.SIGTERM) is previous  # the trainer's handler is removed again
    run_dir = trainer.run_dir
    assert summary["status"] == "interrupted" and "SIGTERM" in summary["error"]
    assert summary["steps_completed"] == 2
    saved = json.loads((run_dir / "summary.json").read_text())
    assert saved["status"] == "interrupted"
    assert [m["step"] for m in read_jsonl(run_dir / "metrics.jsonl")] == [1, 2]
    assert [p.name for p in checkpoint_dirs(run_dir)] == ["step-2"]

    resumed = _resume(tiny_model_dir, run_dir, lora_r)
    _assert_reproduces(reference_run, run_dir, resumed)


@pytest.mark.slow
def test_sigint_finishes_the_step_saves_and_resumes(reference_run, tiny_model_dir: Path, tmp_path: Path) -> None:
    """Ctrl-C (SIGINT) as SIGTERM: the step in progress completes, is checkpointed, and the run resumes."""
    def outside_the_trainer(signum, frame):
        raise AssertionError("SIGINT reached the handler that was installed before the trainer's")

    # Python's default handler would raise KeyboardInterrupt and end the pytest session if the trainer did not
    # take SIGINT over: a handler that fails the test instead
    previous = signal.signal(signal.SIGINT, outside_the_trainer)
    try:
        lora_r = reference_run["lora_r"]
        trainer = build_trainer(tiny_model_dir, tmp_path / "run", steps=STEPS, lora_r=lora_r,
                                scorer=FlakyScorer(at=2, action="sigint"))
        summary = trainer.train()
        assert signal.getsignal(signal.SIGINT) is outside_the_trainer  # the trainer's handler is removed again
    finally:
        signal.signal(signal.SIGINT, previous)
    run_dir = trainer.run_dir
    assert summary["status"] == "interrupted" and "SIGINT" in summary["error"]
    assert summary["steps_completed"] == 2
    saved = json.loads((run_dir / "summary.json").read_text())
    assert saved["status"] == "interrupted" and saved["steps_completed"] == 2
    assert [m["step"] for m in read_jsonl(run_dir / "metrics.jsonl")] == [1, 2]
    assert [p.name for p in checkpoint_dirs(run_dir)] == ["step-2"]
    assert not (run_dir / "final").exists()

    resumed = _resume(tiny_model_dir, run_dir, lora_r)
    _assert_reproduces(reference_run, run_dir, resumed)


@pytest.mark.parametrize("reference_run", [0], indirect=True, ids=["full"])
@pytest.mark.slow
def test_logs_after_the_last_checkpoint_are_redone(reference_run, tiny_model_dir: Path, tmp_path: Path) -> None:
    """A run killed after logging step 3 but before checkpointing it resumes from step 2 and logs 3 once."""
    trainer = build_trainer(tiny_model_dir, tmp_path / "run", steps=3, save_every=2)
    trainer.train()
    run_dir = trainer.run_dir
    assert [p.name for p in checkpoint_dirs(run_dir)] == ["step-2", "step-3"]
    shutil.rmtree(run_dir / "checkpoints" / "step-3")  # as if killed while saving step 3
    resumed = _resume(tiny_model_dir, run_dir, 0, save_every=2)
    _assert_reproduces(reference_run, run_dir, resumed)


@pytest.mark.parametrize("reference_run", [0], indirect=True, ids=["full"])
@pytest.mark.slow
def test_failing_task_metrics_leave_a_consistent_checkpoint(
    reference_run, tiny_model_dir: Path, tmp_path: Path
) -> None:
    """The task's metrics function fails in step 3: the checkpoint 'step-2' saved after the failure holds
    the weights after step 2 (not weights already updated by step 3), so resuming reproduces the run."""
    calls = {"n": 0}

    def metrics_fn(features):
        calls["n"] += 1
        if calls["n"] == 3:
            raise ScorerError("metrics failed")
        return {"score/reward": float(features["reward"].double().mean())}

    trainer = build_trainer(tiny_model_dir, tmp_path / "run", steps=STEPS)
    trainer.metrics_fn = metrics_fn
    with pytest.raises(ScorerError):
        trainer.train()
    run_dir = trainer.run_dir
    assert [p.name for p in checkpoint_dirs(run_dir)] == ["step-2"]
    resumed = build_trainer(tiny_model_dir, tmp_path / "x", resume=str(run_dir), steps=STEPS)
    resumed.metrics_fn = metrics_fn
    resumed.train()
    metrics = read_jsonl(run_dir / "metrics.jsonl")
    assert [m["step"] for m in metrics] == [1, 2, 3, 4]
    for got, want in zip(metrics, reference_run["metrics"]):
        assert_same_metrics(got, {k: v for k, v in want.items() if k != "score/b"})
    assert_same_state(trainable_state(resumed), reference_run["params"])


@pytest.mark.parametrize(("setting", "value"), [("divergence", "fkl"), ("beta", 0.5), ("batch_size", 4),
                                                ("lora_r", 2)])
def test_resume_with_incompatible_settings_names_them(tiny_model_dir: Path, tmp_path: Path, setting: str,
                                                      value) -> None:
    first = build_trainer(tiny_model_dir, tmp_path / "run", steps=1)
    first.train()
    overrides = {"lora_r": 0, setting: value}
    with pytest.raises(ValueError, match=rf"cannot resume .*{setting}: checkpoint .* vs now {value!r}"):
        build_trainer(tiny_model_dir, tmp_path / "x", resume=str(first.run_dir), steps=2,
                      **overrides).train()
    # the failed attempt changed nothing
    assert [m["step"] for m in read_jsonl(first.run_dir / "metrics.jsonl")] == [1]
    assert json.loads((first.run_dir / "summary.json").read_text())["status"] == "finished"


def test_resume_needs_a_run_with_a_checkpoint(tiny_model_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="not a run directory"):
        build_trainer(tiny_model_dir, tmp_path / "x", resume=str(tmp_path / "nothing-here")).train()
    run = build_trainer(tiny_model_dir, tmp_path / "run", steps=1)
    run.train()
    shutil.rmtree(run.run_dir / "checkpoints")
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        build_trainer(tiny_model_dir, tmp_path / "x", resume=str(run.run_dir), steps=2).train()
