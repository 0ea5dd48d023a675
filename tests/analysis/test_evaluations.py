"""Frontier points from the final evaluations (eval.json) of runs, with the base model as the origin."""

from __future__ import annotations

import json

import pytest

from analysis import base_points, evaluated_points, final_points, load_evaluations, load_runs
from fdpg.run_log import RunLog


def evaluated_run(root, name: str, divergence: str, reward: float, kl: float, base_reward: float = 0.1):
    """A run directory whose training steps say one thing and whose eval.json another."""
    log = RunLog.create(root / name, {"task": "sentiment", "divergence": divergence, "beta": 0.1, "seed": 0,
                                      "model": "m"})
    for step in (1, 2):
        log.metrics.write({"step": step, "score/reward": 9.0, "kl_pi_a": -1.0})  # noisy training numbers
    log.close()
    policy = {"n": 64, "score/reward": reward, "score/reward_se": 0.02, "kl_pi_a": kl, "kl_pi_a_se": 0.01,
              "kl_pi_a_exact": kl, "kl_pi_a_exact_se": 0.005, "examples": []}
    base = {"n": 64, "score/reward": base_reward, "score/reward_se": 0.02, "kl_pi_a": 0.0, "kl_pi_a_exact": 0.0}
    (log.dir / "eval.json").write_text(json.dumps({"n": 64, "max_new_tokens": 8, "policy": policy, "base": base}))
    return log.dir


def test_evaluated_points_replace_the_training_numbers_and_say_so(tmp_path) -> None:
    evaluated_run(tmp_path, "rkl", "rkl", 0.4, 0.3)
    evaluated_run(tmp_path, "fkl", "fkl", 0.3, 0.1)
    log = RunLog.create(tmp_path / "no-eval", {"task": "sentiment", "divergence": "js", "beta": 0.1, "seed": 0})
    log.metrics.write({"step": 1, "score/reward": 0.2, "kl_pi_a": 0.05})
    log.close()
    points = evaluated_points(final_points(load_runs(tmp_path), last=2), load_evaluations(tmp_path), last=2)
    points = points.set_index("run")
    assert points.loc["rkl", "score/reward"] == 0.4 and points.loc["rkl", "kl_pi_a_exact_se"] == 0.005
    assert points.loc["rkl", "source"] == "eval (n=64)" and points.loc["no-eval", "source"] == "train (last 2 steps)"
    assert points.loc["no-eval", "score/reward"] == 0.2
    base = base_points(tmp_path)
    assert len(base) == 1  # one base model, one task: one origin
    assert base.loc[0, "method"] == "base a" and base.loc[0, "kl_pi_a_exact"] == 0
    assert base.loc[0, "score/reward"] == 0.1


@pytest.mark.slow
def test_fdpg_analyze_draws_the_frontier_through_the_evaluated_points(tmp_path, capsys) -> None:
    from fdpg.cli import main

    evaluated_run(tmp_path / "runs", "rkl", "rkl", 0.4, 0.3)
    evaluated_run(tmp_path / "runs", "fkl", "fkl", 0.3, 0.1)
    assert main(["analyze", str(tmp_path / "runs"), "--out", str(tmp_path / "report"), "--last", "2"]) == 0
    out = capsys.readouterr().out
    assert "eval (n=64)" in out and "base a" in out
    front = out.split("Pareto frontier")[1].splitlines()[0]
    assert "base (sentiment)" in front and "fkl" in front and "rkl" in front  # the training numbers would differ
    with pytest.raises(ValueError, match="none of these runs has an eval"):
        from fdpg.cli import cmd_analyze

        log = RunLog.create(tmp_path / "plain" / "r", {"task": "sentiment", "divergence": "js", "seed": 0})
        log.metrics.write({"step": 1, "score/reward": 0.2, "kl_pi_a": 0.05})
        log.close()
        cmd_analyze([str(tmp_path / "plain"), "--out", str(tmp_path / "r2"), "--source", "eval"])
