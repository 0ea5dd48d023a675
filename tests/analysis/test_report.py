"""Reports (analysis.report, ``fdpg report``): figures, a self-contained HTML file and Markdown from tiny real runs,
one table row per cell, bad inputs skipped with their reasons; the frontier's points (``frontier_points``); a torn
last line of a crashed run."""

from __future__ import annotations

import base64
import json
import math
import re
import sys
from html import escape as html_escape
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import analysis
from analysis import build_report, final_table, frontier_points, plot_pseudo_rewards, read_jsonl, scan_runs
from fdpg.run_log import RunLog

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "fdpg"))  # fdpg_testing: tiny trainers

from fdpg_testing import PROMPTS, build_trainer, toy_scorer  # noqa: E402

DIVERGENCES = ("rkl", "fkl")
SEEDS = (0, 1)


@pytest.fixture(scope="module")
def sweep(tiny_model_dir, tmp_path_factory) -> Path:
    """A tiny sweep: f-DPG with two divergences x two seeds (2 steps each, no final evaluation), and best-of-1, 2, 4
    of the base model beside them."""
    from fdpg.bon import load_base_policy, run_best_of_n, write_bon_runs
    from fdpg.engine import feature_means
    from objectives import rl_with_kl
    from tasks import TaskSpec

    root = tmp_path_factory.mktemp("sweep")
    for divergence in DIVERGENCES:
        for seed in SEEDS:
            trainer = build_trainer(tiny_model_dir, root / f"{divergence}-s{seed}", divergence=divergence, seed=seed,
                                    steps=2, eval_samples=0)
            assert trainer.train()["status"] == "finished"
    spec = TaskSpec(prompts=PROMPTS, scorer=toy_scorer, target=rl_with_kl("reward", 0.1), metrics=feature_means)
    results = run_best_of_n(load_base_policy(str(tiny_model_dir)), spec, [2, 4], prompts=16, max_new_tokens=10,
                            seed=0, reward="reward", progress=False)
    write_bon_runs(root, results, {"task": "toy", "model": str(tiny_model_dir), "seed": 0, "max_new_tokens": 10})
    return root


@pytest.fixture(scope="module")
def report(sweep, tmp_path_factory):
    return build_report(sweep, tmp_path_factory.mktemp("report"), quiet=True)


@pytest.mark.slow
def test_the_report_writes_figures_html_and_markdown(report) -> None:
    names = {p.name for p in report.figures}
    assert names == {"pareto-toy.png", "curves-toy.png", "diversity-toy.png", "pseudo_rewards.png"}
    for path in report.figures:
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 5000
    assert not report.skipped and not report.notes and len(report.runs) == 7
    markdown = report.markdown.read_text()
    for name in names:
        assert f"]({name})" in markdown
    assert (report.out / "points.csv").is_file() and (report.out / "final_metrics.csv").is_file()


@pytest.mark.slow
def test_the_html_is_self_contained_with_every_figure_embedded(report) -> None:
    text = report.html.read_text()
    images = re.findall(r'<img [^>]*src="([^"]+)"', text)
    assert len(images) == len(report.figures)
    embedded = {base64.b64decode(src.removeprefix("data:image/png;base64,")) for src in images
                if src.startswith("data:image/png;base64,")}
    assert embedded == {p.read_bytes() for p in report.figures}  # every figure, byte for byte, nothing linked
    assert not re.search(r'(src|href)="(?!data:)', text)  # no file, no network: opens offline
    for word in ("Best-of-n", "f-DPG rkl", "f-DPG fkl", "base a", "Pseudo-rewards", "Samples"):
        assert word in text


@pytest.mark.slow
def test_the_final_table_has_one_row_per_cell_with_the_spread_over_seeds(report, sweep) -> None:
    table = pd.read_csv(report.out / "final_metrics.csv")
    # 2 divergences (2 seeds each), best-of-1/2/4, the base model
    assert len(table) == 6
    assert sorted(table["method"]) == ["Best-of-n"] * 3 + ["base a", "f-DPG fkl", "f-DPG rkl"]
    fdpg = table[table["method"].str.startswith("f-DPG")].set_index("method")
    assert (fdpg["n_seeds"] == 2).all()
    points = analysis.final_points(analysis.load_runs(sweep), last=5).set_index("run")
    for divergence in DIVERGENCES:
        values = [points.loc[f"{divergence}-s{s}", "score/reward"] for s in SEEDS]
        assert fdpg.loc[f"f-DPG {divergence}", "score/reward"] == pytest.approx(np.mean(values))
        assert fdpg.loc[f"f-DPG {divergence}", "score/reward_std"] == pytest.approx(np.std(values, ddof=1))
    bon = table[table["method"] == "Best-of-n"].sort_values("bon_n")
    assert bon["bon_n"].tolist() == [1, 2, 4]
    assert bon["kl_pi_a_exact"].tolist() == pytest.approx([0.0, math.log(2) - 0.5, math.log(4) - 0.75])
    assert (bon["kl_pi_a_source"] == "analytic").all()
    # the same table, formatted, in both documents: one line per cell
    markdown = report.markdown.read_text()
    assert len(re.findall(r"^\| (Best-of-n|f-DPG \w+|base a) \| toy \|", markdown, flags=re.M)) == 6
    assert " ± " in markdown


@pytest.mark.slow
def test_samples_of_the_first_and_last_step_of_each_cell(report) -> None:
    text = report.markdown.read_text()
    samples = text.split("## Samples", 1)[1]
    assert samples.count("### ") == 5  # one per cell with samples: 2 divergences (the first seed), 3 best-of-n
    assert re.search(r"^\| 1 \| ", samples, flags=re.M) and re.search(r"^\| 2 \| ", samples, flags=re.M)


def test_pseudo_rewards_are_minus_f_prime_from_objectives() -> None:
    import matplotlib.pyplot as plt

    fig = plot_pseudo_rewards(["rkl", "fkl", "tv"], t_range=(0.1, 10.0))
    lines = {line.get_label().split()[0]: line for line in fig.axes[0].get_lines()
             if not line.get_label().startswith("_")}
    t = lines["rkl"].get_xdata()
    assert lines["rkl"].get_ydata() == pytest.approx(-np.log(t) - 1.0)  # f(t) = t log t
    assert lines["fkl"].get_ydata() == pytest.approx(1.0 / t)            # f(t) = -log t
    away = np.abs(np.log(t)) > 1e-9  # sign(0) at t = 1 depends on the grid's rounding
    assert lines["tv"].get_ydata()[away] == pytest.approx(-np.sign(t - 1)[away] / 2)  # f(t) = |t - 1| / 2
    assert "−∞" in lines["rkl"].get_label() and "= 0)" in lines["fkl"].get_label()
    plt.close(fig)


def write_run(root: Path, name: str, rows: list[dict] | None, config: dict | None = None, torn: str | None = None):
    log = RunLog.create(root / name, config or {"task": "toy", "divergence": "rkl", "seed": 0, "label": name})
    for row in rows or []:
        log.metrics.write(row)
    log.close()
    if torn is not None:
        with open(log.dir / "metrics.jsonl", "a") as fh:
            fh.write(torn)
    if rows is None:
        (log.dir / "metrics.jsonl").unlink(missing_ok=True)
    return log.dir


def steps(n: int, reward: float = 0.1) -> list[dict]:
    return [{"step": i, "score/reward": reward + 0.01 * i, "kl_pi_a": 0.1 * i} for i in range(1, n + 1)]


@pytest.fixture
def messy(tmp_path) -> Path:
    root = tmp_path / "messy"
    write_run(root, "good", steps(4))
    write_run(root, "crashed", steps(3, 0.3), torn='{"step": 4, "score/rew')   # killed mid-line
    write_run(root, "no-steps", None)                                          # config.json only
    (write_run(root, "empty", []) / "metrics.jsonl").write_text("\n")           # metrics.jsonl with nothing
    damaged = write_run(root, "damaged", steps(3))
    lines = (damaged / "metrics.jsonl").read_text().splitlines()
    (damaged / "metrics.jsonl").write_text("\n".join([lines[0], "{oops", *lines[1:]]) + "\n")
    broken = root / "broken-config"
    broken.mkdir()
    (broken / "config.json").write_text('{"config": {"task": ')
    (root / "notes").mkdir()                                                  # not a run
    write_run(root, "good.failed-1", steps(2))                                # moved aside by fdpg sweep
    bad_eval = write_run(root, "bad-eval", steps(2, 0.2))
    (bad_eval / "eval.json").write_text("{not json")
    return root


@pytest.mark.slow
def test_bad_inputs_are_skipped_with_their_reasons(messy, tmp_path, capsys) -> None:
    from fdpg.commands.report import cmd_report

    out = tmp_path / "out"
    assert cmd_report([str(messy), str(tmp_path / "nowhere"), str(messy / "good"), "--out", str(out)]) == 0
    captured = capsys.readouterr()
    assert "3 runs, 7 skipped" in captured.out
    skipped = dict(re.findall(r"^\[fdpg report\] skipped .*/([^/:]+): (.*)$", captured.err, flags=re.M))
    assert set(skipped) == {"no-steps", "empty", "damaged", "broken-config", "notes", "nowhere", "good.failed-1"}
    assert "moved aside" in skipped["good.failed-1"]
    assert "no metrics.jsonl" in skipped["no-steps"] and "holds no step" in skipped["empty"]
    assert "metrics.jsonl:2 is not valid JSON" in skipped["damaged"]
    assert "config.json is not valid JSON" in skipped["broken-config"]
    assert "not a run directory" in skipped["notes"] and "does not exist" in skipped["nowhere"]
    notes = re.findall(r"^\[fdpg report\] note: (.*)$", captured.err, flags=re.M)
    assert any("crashed" in n and "half-written last line 4" in n for n in notes)
    assert any("bad-eval" in n and "eval.json ignored" in n for n in notes)
    html = (out / "report.html").read_text()
    assert all(html_escape(why) in html for why in skipped.values()) and "half-written last line 4" in html
    table = pd.read_csv(out / "final_metrics.csv").set_index("run")
    assert sorted(table.index) == ["bad-eval", "crashed", "good"]  # "good" once, though named twice
    assert table.loc["crashed", "score/reward"] == pytest.approx(np.mean([0.31, 0.32, 0.33]))  # what was whole
    assert table.loc["bad-eval", "source"].startswith("train")  # its broken eval.json ignored


def test_a_report_of_nothing_still_says_why(tmp_path, capsys) -> None:
    from fdpg.commands.report import cmd_report

    (tmp_path / "empty").mkdir()
    assert cmd_report([str(tmp_path / "empty"), "--out", str(tmp_path / "out")]) == 2
    assert "no run could be loaded" in capsys.readouterr().err
    assert "holds no run directory" in (tmp_path / "out" / "report.html").read_text()
    assert (tmp_path / "out" / "report.md").is_file()


@pytest.mark.slow
def test_frontier_points_sources(sweep) -> None:
    dirs = scan_runs(sweep).dirs
    auto = frontier_points(dirs)
    assert set(auto["method"]) == {"f-DPG rkl", "f-DPG fkl", "Best-of-n", "base a"}
    assert set(auto.loc[auto["method"].str.startswith("f-DPG"), "source"]) == {"train (last 5 steps)"}
    evaluated = frontier_points(dirs, source="eval")
    assert set(evaluated["method"]) == {"Best-of-n", "base a"}  # only Best-of-n has an eval.json here
    train = frontier_points(dirs, source="train", last=2)
    assert "base a" not in set(train["method"]) and set(train["source"]) == {"train (last 2 steps)"}
    assert (train.loc[train["method"].str.startswith("f-DPG"), "n_steps"] == 2).all()
    assert analysis.frontier_axes(auto) == ("kl_pi_a_exact", "score/reward", None)  # logged at step 1 (of 2)
    train = frontier_points(dirs, source="train", last=1)
    x, y, note = analysis.frontier_axes(train, last=1)  # not in the last step of the trained runs
    assert (x, y) == ("kl_pi_a", "score/reward") and "kl_pi_a_exact not logged in the last 1 steps of" in note
    with pytest.raises(ValueError, match="eval.json"):
        frontier_points([d for d in dirs if not d.name.startswith("bon")], source="eval")


def test_final_table_mean_and_std_over_seeds() -> None:
    points = pd.DataFrame({
        "run": ["a", "b", "c"], "method": ["f-DPG rkl"] * 3, "task": "t", "setting_id": ["x", "x", "y"],
        "seed": [0, 1, 0], "score/reward": [0.4, 0.6, 0.9], "score/reward_se": [0.01, 0.02, 0.03], "n_runs": 1})
    table = final_table(points).set_index("run")
    assert list(table.index) == ["a+b", "c"]  # runs that differ only in the seed: one cell
    assert table.loc["a+b", "n_seeds"] == 2 and table.loc["a+b", "score/reward"] == pytest.approx(0.5)
    assert table.loc["a+b", "score/reward_std"] == pytest.approx(np.std([0.4, 0.6], ddof=1))
    assert math.isnan(table.loc["c", "score/reward_std"]) and table.loc["c", "score/reward_se"] == 0.03
    shown = analysis.formatted_table(final_table(points), ["score/reward"])
    assert shown["reward"].tolist() == ["0.5 ± 0.1414", "0.9 (s.e. 0.03)"]


def test_a_torn_last_line_is_dropped_and_said(tmp_path) -> None:
    path = tmp_path / "metrics.jsonl"
    path.write_text(json.dumps({"step": 1}) + "\n" + json.dumps({"step": 2}) + '\n{"step": 3, "x"')
    notes: list[str] = []
    assert read_jsonl(path, notes) == [{"step": 1}, {"step": 2}]
    assert notes == ["metrics.jsonl: dropped its half-written last line 3 (a crashed run?)"]
    path.write_text(json.dumps({"step": 1}) + '\n{"step": 2, "x"\n\n')  # trailing blank lines: still the last
    assert read_jsonl(path) == [{"step": 1}]
    path.write_text('{"step": 1, "x"\n' + json.dumps({"step": 2}) + "\n")  # damage in the middle is an error
    with pytest.raises(ValueError, match="metrics.jsonl:1 is not valid JSON"):
        read_jsonl(path)
    path.write_text("[1, 2]\n")
    with pytest.raises(ValueError, match="not a JSON object"):
        read_jsonl(path)
