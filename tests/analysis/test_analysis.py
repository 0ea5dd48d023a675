"""analysis: run directories (written by fdpg's RunLog) -> pandas -> Pareto frontier -> plots."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

import analysis
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
    assert pareto_frontier(lonely.assign(kl_pi_a=float("nan"))).empty  # a group that never logged its x axis
    with pytest.raises(KeyError, match="nope"):
        pareto_frontier(points, x="nope")


def test_samples_scores_become_columns(runs) -> None:
    samples = load_samples(runs / "a")
    assert samples.loc[0, "score/reward"] == pytest.approx(0.1)


@pytest.mark.slow
def test_plots_are_written(runs, tmp_path) -> None:
    metrics = load_runs(runs)
    plot_pareto(final_points(metrics, last=1), path=tmp_path / "pareto.png")
    plot_training_curves(metrics, path=tmp_path / "curves.png")
    assert (tmp_path / "pareto.png").stat().st_size > 1000
    assert (tmp_path / "curves.png").stat().st_size > 1000


@pytest.mark.slow
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
    for name, divergence in (("dpo", "rkl"), ("fdpo-js", "js")):  # DPO logs kl_pi_a only at its evaluations
        dpo = RunLog.create(tmp_path / name, {"task": "sentiment", "algo": "dpo", "divergence": divergence,
                                              "beta": 0.1, "seed": 0})
        dpo.metrics.write({"step": 1, "score/reward": 0.3, "kl_pi_a": 0.2, "loss": 0.6})
        dpo.metrics.write({"step": 2, "loss": 0.5})
        dpo.close()
    points = final_points(load_runs(tmp_path), last=2).set_index("run")
    assert points.loc["fdpg-rkl", "method"] == "f-DPG rkl" and points.loc["ppo", "method"] == "PPO"
    assert points.loc["dpo", "method"] == "DPO" and points.loc["fdpo-js", "method"] == "f-DPO js"
    assert points.loc["dpo", "kl_pi_a"] == pytest.approx(0.2)  # the steps without it are skipped, not zeros
    points = final_points(load_runs(tmp_path), last=1).set_index("run")
    assert points.loc["fdpg-rkl", "algo"] == "fdpg"  # a run made before --algo existed is f-DPG
    assert points.loc["ppo", "kl_pi_a"] == pytest.approx(0.4)
    assert points.loc["ppo", "score/reward"] == pytest.approx(0.5)


def write_run(root, name, config, rows):
    """A run directory with ``config`` (task sentiment, f-DPG rkl, beta 0.1, seed 0 unless given) and metric rows."""
    log = RunLog.create(root / name, {"task": "sentiment", "divergence": "rkl", "beta": 0.1, "seed": 0, **config})
    for step, row in enumerate(rows, start=1):
        log.metrics.write({"step": step, **row})
    log.close()
    return log.dir


def test_final_points_have_standard_errors_and_the_steps_behind_them(runs, tmp_path) -> None:
    points = final_points(load_runs(runs), last=2).set_index("run")
    assert points.loc["a", "score/reward_se"] == pytest.approx(np.std([0.5, 0.7], ddof=1) / np.sqrt(2))
    assert points.loc["b", "kl_pi_a_se"] == pytest.approx(np.std([0.5, 1.0], ddof=1) / np.sqrt(2))
    assert (points["n_steps"] == 2).all() and (points["n_runs"] == 1).all()
    assert points.loc["a", "final_step"] == 3
    assert final_points(load_runs(runs), last=1)["score/reward_se"].isna().all()  # one step: no spread to measure
    # a metric logged every other step with its own per-step standard error (kl_pi_a_exact, kl_pi_a_exact_se)
    rows = [{"score/reward": 0.1, "kl_pi_a_exact": 0.5, "kl_pi_a_exact_se": 0.3}, {"score/reward": 0.2},
            {"score/reward": 0.3, "kl_pi_a_exact": 0.7, "kl_pi_a_exact_se": 0.4}, {"score/reward": 0.4}]
    write_run(tmp_path, "sparse", {}, rows)
    sparse = final_points(load_run(tmp_path / "sparse"), last=4).iloc[0]
    assert sparse["kl_pi_a_exact"] == pytest.approx(0.6)
    assert sparse["kl_pi_a_exact_se"] == pytest.approx(np.sqrt(0.3**2 + 0.4**2) / 2)  # of the mean of two batches
    assert "kl_pi_a_exact_se_se" not in sparse
    one = final_points(load_run(tmp_path / "sparse"), last=2).iloc[0]  # the window holds one exact value
    assert one["kl_pi_a_exact"] == pytest.approx(0.7) and one["kl_pi_a_exact_se"] == pytest.approx(0.4)


def test_seed_points_pool_runs_that_differ_only_in_the_seed(tmp_path) -> None:
    seeds = (([0.1, 0.3], [1.0, 2.0]), ([0.5, 0.7], [1.0, 3.0]), ([0.2, 0.2], [1.0, 4.0]))
    for seed, (rewards, kls) in enumerate(seeds):
        write_run(tmp_path, f"rkl-s{seed}", {"seed": seed},
                  [{"score/reward": r, "kl_pi_a": kl} for r, kl in zip(rewards, kls)])
    # the same settings columns, but another baseline (a setting outside them): not a repetition of the three above
    write_run(tmp_path, "rkl-none", {"seed": 3, "baseline": "none"}, [{"score/reward": 0.9, "kl_pi_a": 0.5}] * 2)
    write_run(tmp_path, "fkl", {"divergence": "fkl"}, [{"score/reward": 0.4, "kl_pi_a": 0.2}, {"score/reward": 0.6,
                                                                                                "kl_pi_a": 0.4}])
    points = final_points(load_runs(tmp_path), last=1)
    pooled = analysis.seed_points(points).set_index("run")
    assert sorted(pooled.index) == ["fkl", "rkl-none", "rkl-s0+rkl-s1+rkl-s2"]
    row = pooled.loc["rkl-s0+rkl-s1+rkl-s2"]
    assert row["score/reward"] == pytest.approx(0.4) and row["kl_pi_a"] == pytest.approx(3.0)
    assert row["score/reward_se"] == pytest.approx(np.std([0.3, 0.7, 0.2], ddof=1) / np.sqrt(3))
    assert row["kl_pi_a_se"] == pytest.approx(np.std([2.0, 3.0, 4.0], ddof=1) / np.sqrt(3))
    assert (row["n_runs"], row["n_steps"], row["final_step"]) == (3, 3, 2)
    lone = points.set_index("run").loc["fkl"]
    assert pooled.loc["fkl", "n_runs"] == 1  # a run alone keeps its point and its standard error over its steps
    for column in ("score/reward", "kl_pi_a", "n_steps", "final_step"):
        assert pooled.loc["fkl", column] == lone[column]
    two = analysis.seed_points(final_points(load_runs(tmp_path), last=2)).set_index("run")
    assert two.loc["fkl", "score/reward_se"] == pytest.approx(0.1)  # std(0.4, 0.6) / sqrt(2)
    assert two.loc["rkl-s0+rkl-s1+rkl-s2", "n_steps"] == 6
    assert len(analysis.seed_points(points.drop(columns="seed"))) == len(points)  # no seeds: nothing to pool


@pytest.mark.slow
def test_fdpg_analyze_defaults_to_the_exact_kl_and_shares_one_palette(tmp_path, capsys, monkeypatch) -> None:
    from fdpg.cli import main

    for name, divergence, seed, shift in (("rkl-s0", "rkl", 0, 0.0), ("rkl-s1", "rkl", 1, 0.1), ("fkl", "fkl", 0, 0.2)):
        rows = [{"score/reward": 0.1 * s + shift, "kl_pi_a": 0.1 * s - 0.05, "kl_pi_a_exact": 0.1 * s + shift,
                 "kl_pi_a_exact_se": 0.01} for s in range(4)]
        write_run(tmp_path / "runs", name, {"divergence": divergence, "seed": seed}, rows)
    calls, save = {}, [True]

    def spy(name):
        real = getattr(analysis, name)

        def wrapper(*args, **kwargs):
            calls[name] = kwargs
            return real(*args, **{**kwargs, "path": kwargs["path"] if save[0] else None})  # PNGs are slow to write
        return wrapper
    monkeypatch.setattr(analysis, "plot_pareto", spy("plot_pareto"))
    monkeypatch.setattr(analysis, "plot_training_curves", spy("plot_training_curves"))
    report = tmp_path / "report"
    assert main(["analyze", str(tmp_path / "runs"), "--out", str(report), "--last", "2"]) == 0
    out = capsys.readouterr().out
    assert calls["plot_pareto"]["x"] == "kl_pi_a_exact"
    assert "Pareto frontier (kl_pi_a_exact low" in out
    for column in ("n_steps", "kl_pi_a_exact_se", "score/reward_se", "n_runs"):
        assert column in out
    assert "rkl-s0+rkl-s1" in out  # the two seeds of f-DPG rkl pooled into one point
    palette = calls["plot_pareto"]["palette"]
    assert calls["plot_training_curves"]["palette"] is palette and set(palette) == {"f-DPG rkl", "f-DPG fkl"}
    assert calls["plot_training_curves"]["hue"] == "method"
    assert {p.name for p in report.iterdir()} == {"points.csv", "seed_points.csv", "pareto.png", "curves.png"}
    assert len(pd.read_csv(report / "seed_points.csv")) == 2
    save[0] = False

    write_run(tmp_path / "runs", "old", {"divergence": "js"}, [{"score/reward": 0.2, "kl_pi_a": 0.3}])
    assert main(["analyze", str(tmp_path / "runs"), "--out", str(report), "--last", "2"]) == 0
    assert calls["plot_pareto"]["x"] == "kl_pi_a"  # one run without the exact KL: the estimate every run has
    assert "x axis: kl_pi_a" in capsys.readouterr().out
    assert main(["analyze", str(tmp_path / "runs"), "--out", str(report), "--x", "kl_pi_a_exact"]) == 0
    assert calls["plot_pareto"]["x"] == "kl_pi_a_exact"  # an explicit --x is kept
