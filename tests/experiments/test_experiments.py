"""The experiment scripts: every cell's settings parse as ``fdpg train`` settings, and a 1-step version of each
whole experiment runs on the tiny model to its verdict."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pandas as pd
import pytest

from experiments import fine_grained, frontier
from fdpg.cli import parse_train_args
from fdpg.commands.sweep import grid_cells, parse_grid
from tasks import get_task

EXPERIMENTS = {"frontier": frontier, "fine_grained": fine_grained}


def sweep_cells(stage) -> list[list[str]]:
    """The ``fdpg train`` arguments of every cell of a sweep stage."""
    argv = stage.argv
    grid = parse_grid(argv[argv.index("--grid") + 1])
    flags = argv[argv.index("--progress") + 2:]  # the train flags follow the sweep's own
    return [flags + [a for k, v in cell.items() for a in (f"--{k}", v)] for cell in grid_cells(grid)]


@pytest.mark.parametrize("name", list(EXPERIMENTS))
def test_every_cell_of_the_experiment_is_a_valid_run(name: str, tmp_path: Path) -> None:
    module = EXPERIMENTS[name]
    stages = module.stages(tmp_path)
    sweeps = [s for s in stages if s.argv[0] == "sweep"]
    assert sweeps and all(not s.done(tmp_path) for s in stages)
    names = []
    for stage in sweeps:
        for argv in sweep_cells(stage):
            config = parse_train_args([*argv, "--output_dir", str(tmp_path / "x")])
            get_task(config.task).build(config.beta, config.task_options(), None)  # its task options too
            assert config.eval_samples >= (1024 if name == "frontier" else 512)
            names.append((config.algo, config.divergence, config.task_args, config.seed))
    assert len(names) == len(set(names))  # no two cells alike
    if name == "frontier":
        assert {n[1] for n in names if n[0] == "fdpg"} == {"rkl", "fkl", "tv", "js", "alpha:0.5"}
        assert {n[0] for n in names} == {"fdpg", "ppo", "dpo"} and {n[3] for n in names} == {0, 1}
        assert any(s.argv[0] == "bon" and "16" in s.argv[s.argv.index("--n") + 1] for s in stages)
    else:
        assert {n[2] for n in names} == {"granularity=fine", "granularity=holistic"}
    # the sweeps' run directories are named apart (analysis tells runs apart by their directory's name)
    cell_names = [c for s in sweeps for c in map(str, grid_cells(parse_grid(s.argv[s.argv.index("--grid") + 1])))]
    assert len(cell_names) == len(set(cell_names))


@pytest.mark.slow
@pytest.mark.parametrize("name", list(EXPERIMENTS))
def test_a_one_step_version_runs_to_its_verdict(name: str, tiny_word_model_dir: Path, tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FDPG_EVAL_CACHE", str(tmp_path / "cache"))
    module = EXPERIMENTS[name]
    out = tmp_path / name
    assert module.main(["--smoke", str(tiny_word_model_dir), "--out", str(out)]) == 0
    results = out / "results"
    verdict = (results / "verdict.md").read_text()
    timings = json.loads((out / "timings.json").read_text())
    assert all(v > 0 for v in timings.values())
    if name == "frontier":
        table = pd.read_csv(results / "frontier.csv")
        assert {"base a", "f-DPG js", "f-DPG fkl", "PPO", "DPO", "Best-of-n"} <= set(table["method"])
        assert (results / "report" / "report.md").is_file() and "## Go et al.'s ordering" in verdict
        arms = table.loc[table["method"] != "base a", "method"].nunique()
        assert len(pd.read_csv(results / "comparisons.csv")) == arms * (arms - 1) // 2  # every pair once
    else:
        assert (results / "curves.png").is_file() and "Fine-grained against holistic" in verdict
    # run again: every run (sweep, Best-of-n) is done and skipped; the report and the results are written again
    def runs(t: dict[str, float]) -> dict[str, float]:
        return {k: v for k, v in t.items() if k != "report"}

    assert module.main(["--smoke", str(tiny_word_model_dir), "--out", str(out)]) == 0
    assert runs(json.loads((out / "timings.json").read_text())) == runs(timings)


def test_the_experiments_plugins_are_imported_before_any_stage_and_reach_the_stages(tmp_path: Path,
                                                                                    monkeypatch) -> None:
    """``--plugins``: imported while the script parses (a broken one stops it, naming the file), then in
    ``FDPG_PLUGINS`` for the stages' processes."""
    import fdpg.plugins as plugins
    from experiments.common import experiment_parser

    monkeypatch.setattr(plugins, "_loaded", {})
    monkeypatch.delenv(plugins.ENV_VAR, raising=False)
    good = tmp_path / "exp_plugin_ok.py"
    good.write_text("from objectives import ReverseKL, register_divergence\n"
                    "register_divergence('exp_rkl_copy', ReverseKL())\n")
    args = experiment_parser("x", str(tmp_path / "out")).parse_args(["--plugins", str(good)])
    assert args.plugins == [str(good.resolve())] and os.environ[plugins.ENV_VAR] == str(good.resolve())
    bad = tmp_path / "exp_plugin_bad.py"
    bad.write_text("raise RuntimeError('nope')\n")
    with pytest.raises(SystemExit):
        experiment_parser("x", str(tmp_path / "out")).parse_args(["--plugins", str(bad)])
