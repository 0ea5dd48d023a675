"""analysis: run directories (written by fdpg's RunLog) -> pandas -> Pareto frontier -> plots."""

from __future__ import annotations

import pandas as pd
import pytest

from analysis import final_points, load_run, load_runs, load_samples, pareto_frontier, plot_pareto, plot_training_curves
from fdpg.run_log import RunLog


def make_run(root, name, divergence, beta, rewards, kls):
    log = RunLog.create(root / name, {"task": "sentiment", "divergence": divergence, "beta": beta, "seed": 0})
    for step, (r, kl) in enumerate(zip(rewards, kls), start=1):
        log.metrics.write({"step": step, "score/reward": r, "kl_pi_a": kl, "d_f": float("inf")})
    log.samples.write({"step": 1, "prompt": "p", "completion": "c", "scores": {"reward": rewards[0]}})
    log.close()
    return log.dir


@pytest.fixture
def runs(tmp_path):
    make_run(tmp_path, "a", "rkl", 0.1, [0.1, 0.5, 0.7], [0.0, 1.0, 2.0])
    make_run(tmp_path, "b", "fkl", 0.1, [0.1, 0.2, 0.4], [0.0, 0.5, 1.0])
    make_run(tmp_path, "c", "js", 0.1, [0.1, 0.2, 0.3], [0.0, 1.5, 3.0])  # dominated by a and b
    return tmp_path


def test_load_run_has_settings_and_metrics(runs) -> None:
    frame = load_run(runs / "a")
    assert list(frame["step"]) == [1, 2, 3]
    assert (frame["divergence"] == "rkl").all() and (frame["run"] == "a").all()
    assert frame["d_f"].isna().all()  # non-finite values are logged as null


def test_load_runs_from_a_directory_and_a_glob(runs) -> None:
    assert set(load_runs(runs)["run"]) == {"a", "b", "c"}
    assert set(load_runs(str(runs / "[ab]"))["run"]) == {"a", "b"}
    with pytest.raises(FileNotFoundError):
        load_runs(runs / "nothing-*")


def test_torn_last_line_is_ignored(runs) -> None:
    with open(runs / "a" / "metrics.jsonl", "a") as fh:
        fh.write('{"step": 4, "score/rew')
    assert load_run(runs / "a")["step"].max() == 3


def test_final_points_average_the_last_steps(runs) -> None:
    points = final_points(load_runs(runs), last=2).set_index("run")
    assert points.loc["a", "score/reward"] == pytest.approx(0.6)
    assert points.loc["b", "kl_pi_a"] == pytest.approx(0.75)
    assert points.loc["a", "final_step"] == 3


def test_pareto_frontier_drops_dominated_points(runs) -> None:
    points = final_points(load_runs(runs), last=1)
    front = pareto_frontier(points, x="kl_pi_a", y="score/reward")
    assert list(front["run"]) == ["b", "a"]  # c has more KL and less reward than a: dominated
    lonely = pd.DataFrame({"kl_pi_a": [1.0], "score/reward": [0.5]})
    assert len(pareto_frontier(lonely)) == 1
    with pytest.raises(KeyError, match="nope"):
        pareto_frontier(points, x="nope")


def test_samples_scores_become_columns(runs) -> None:
    samples = load_samples(runs / "a")
    assert samples.loc[0, "score/reward"] == pytest.approx(0.1)


def test_plots_are_written(runs, tmp_path) -> None:
    metrics = load_runs(runs)
    plot_pareto(final_points(metrics, last=1), path=tmp_path / "pareto.png")
    plot_training_curves(metrics, path=tmp_path / "curves.png")
    assert (tmp_path / "pareto.png").stat().st_size > 1000
    assert (tmp_path / "curves.png").stat().st_size > 1000


def test_fdpg_analyze_writes_the_report(runs, tmp_path, capsys) -> None:
    from fdpg.cli import main

    assert main(["analyze", str(runs), "--out", str(tmp_path / "report"), "--last", "1"]) == 0
    out = capsys.readouterr().out
    assert "Pareto frontier" in out and "b, a" in out
    assert {p.name for p in (tmp_path / "report").iterdir()} == {"points.csv", "pareto.png", "curves.png"}


def test_runs_of_every_algorithm_share_one_frontier(tmp_path) -> None:
    """An f-DPG and a PPO run land in one points table, labelled by method, with the shared axes."""
    make_run(tmp_path, "fdpg-rkl", "rkl", 0.1, [0.1, 0.3], [0.01, 0.2])
    ppo = RunLog.create(tmp_path / "ppo", {"task": "sentiment", "algo": "ppo", "divergence": "rkl", "beta": 0.1,
                                           "seed": 0})
    for step, (reward, kl) in enumerate(zip([0.2, 0.5], [0.05, 0.4]), start=1):
        ppo.metrics.write({"step": step, "score/reward": reward, "kl_pi_a": kl, "ppo/clip_fraction": 0.1})
    ppo.close()
    points = final_points(load_runs(tmp_path), last=1).set_index("run")
    assert points.loc["fdpg-rkl", "method"] == "f-DPG rkl" and points.loc["ppo", "method"] == "PPO"
    assert points.loc["fdpg-rkl", "algo"] == "fdpg"  # a run made before --algo existed is f-DPG
    assert points.loc["ppo", "kl_pi_a"] == pytest.approx(0.4)
    assert points.loc["ppo", "score/reward"] == pytest.approx(0.5)
