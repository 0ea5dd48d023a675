"""--report_to: a tracker that is not installed fails at start with its install command; tensorboard's files are
written inside the run directory and hold the same scalars as metrics.jsonl."""

from __future__ import annotations

from pathlib import Path

import pytest
from fdpg_testing import build_trainer, read_jsonl

import fdpg.engine as engine


@pytest.mark.slow
def test_tensorboard_scalars_equal_metrics_jsonl(tiny_model_dir: Path, tmp_path: Path) -> None:
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    trainer = build_trainer(tiny_model_dir, tmp_path / "run", steps=2, report_to="tensorboard")
    assert trainer.train()["status"] == "finished"
    run = trainer.run_dir
    assert run == tmp_path / "run"  # the tracker did not take the run's name
    events = list((run / "trackers").rglob("events.out.tfevents.*"))
    assert events, f"no events file under {run / 'trackers'}"
    accumulator = EventAccumulator(str(events[0].parent))
    accumulator.Reload()
    metrics = read_jsonl(run / "metrics.jsonl")
    for name in ("score/reward", "kl_pi_a", "d_f", "entropy"):
        logged = [(e.step, e.value) for e in accumulator.Scalars(name)]
        assert logged == [(m["step"], pytest.approx(m[name], rel=1e-6, abs=1e-7)) for m in metrics], name


def test_a_tracker_that_is_not_installed_fails_at_start(monkeypatch: pytest.MonkeyPatch, tiny_model_dir: Path,
                                                        tmp_path: Path) -> None:
    import accelerate.tracking

    monkeypatch.setattr(accelerate.tracking, "get_available_trackers", lambda: [])
    with pytest.raises(ImportError, match=r"tensorboard package is not installed; pip install \"fdpg\[trackers\]\""):
        build_trainer(tiny_model_dir, tmp_path / "run", report_to="tensorboard")
    with pytest.raises(ValueError, match=r"--report_to 'tensorbord' is not a tracker"):
        engine.requested_trackers("tensorbord")
    assert engine.requested_trackers("none") == []
