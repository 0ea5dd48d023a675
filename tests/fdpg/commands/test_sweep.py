"""``fdpg sweep``: grid parsing and naming, skip / resume / retry of cells, the worker thread split, and a real
sweep of two cells on the tiny model in two single-threaded processes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from fdpg_testing import read_jsonl

from fdpg.commands.sweep import (
    Sweep,
    cell_name,
    check_grid,
    cmd_sweep,
    grid_cells,
    load_grid_file,
    parse_grid,
    run_sweep,
    thread_split,
)


def test_grid_parsing_and_cell_names(tmp_path):
    grid = parse_grid("divergence=rkl,js beta=0.05,0.1 seed=0")
    assert grid == {"divergence": ["rkl", "js"], "beta": ["0.05", "0.1"], "seed": ["0"]}
    cells = grid_cells(grid)
    assert len(cells) == 4 and cells[1] == {"divergence": "rkl", "beta": "0.1", "seed": "0"}
    assert cell_name(cells[1]) == "divergence=rkl_beta=0.1_seed=0"
    assert cell_name({"divergence": "alpha:0.5", "prompts_file": "a/b c.txt"}) == \
        "divergence=alpha:0.5_prompts_file=a-b-c.txt"
    (tmp_path / "g.yaml").write_text("divergence: [rkl, fkl]\nbeta: 0.1\noff_policy: [true, false]\n")
    assert load_grid_file(tmp_path / "g.yaml") == {"divergence": ["rkl", "fkl"], "beta": ["0.1"],
                                                   "off_policy": ["true", "false"]}
    for bad, needle in (("divergence", "NAME=V1,V2"), ("beta=0.1 beta=0.2", "twice"), ("beta=,", "no values")):
        with pytest.raises(ValueError, match=needle):
            parse_grid(bad)
    with pytest.raises(ValueError, match=r"\['lr'\] are not settings"):
        check_grid({"lr": ["1"]}, [])
    with pytest.raises(ValueError, match="both on the grid and given as flags"):
        check_grid({"beta": ["1"]}, ["--beta", "0.2"])
    with pytest.raises(ValueError, match="cannot vary output_dir"):
        check_grid({"output_dir": ["x"]}, [])


def test_threads_are_divided_between_workers():
    assert thread_split(1, cores=2) == 2 and thread_split(2, cores=2) == 1 and thread_split(3, cores=2) == 1
    assert thread_split(2, cores=16) == 8
    with pytest.raises(ValueError, match="--workers"):
        thread_split(0)


def fake_run(directory: Path, status: str | None, checkpoint: bool) -> None:
    """What a cell's `fdpg train` leaves behind: config, maybe a checkpoint, maybe a summary."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps({"config": {}}))
    if checkpoint:
        (directory / "checkpoints" / "step-1").mkdir(parents=True, exist_ok=True)
    if status:
        (directory / "summary.json").write_text(json.dumps({"status": status}))


def test_finished_cells_are_skipped_interrupted_resumed_failed_retried_on_request(tmp_path):
    grid = parse_grid("divergence=rkl,js,fkl")
    calls: list[list[str]] = []
    threads: list[str] = []
    outcome = {"rkl": ("finished", True, 0), "js": ("interrupted", True, 130), "fkl": (None, False, 2)}

    def runner(command, log, env):
        calls.append(command)
        threads.append((env["OMP_NUM_THREADS"], env["MKL_NUM_THREADS"]))
        name = command[command.index("--output_dir") + 1] if "--output_dir" in command else \
            command[command.index("--resume") + 1]
        divergence = Path(name).name.split("=")[1]
        status, checkpoint, code = outcome[divergence]
        if code != 2:
            fake_run(Path(name), status, checkpoint)
        return code

    sweep = run_sweep(Sweep.open(tmp_path / "s", grid, ["--steps", "3"]), workers=2, threads=1, runner=runner,
                      progress=False)
    assert [c.status for c in sweep.cells] == ["finished", "interrupted", "failed"]
    manifest = json.loads((tmp_path / "s" / "sweep.json").read_text())
    assert manifest["counts"]["finished"] == 1 and manifest["cells"][2]["error"].startswith("exit code 2")
    assert all("--resume" not in c for c in calls) and all(c[c.index("--steps") + 1] == "3" for c in calls)
    assert threads == [("1", "1")] * 3

    calls.clear()
    outcome["js"] = ("finished", True, 0)
    sweep = run_sweep(Sweep.open(tmp_path / "s", grid, ["--steps", "5"]), runner=runner, progress=False)
    assert len(calls) == 1 and "--resume" in calls[0] and calls[0][-2:] == ["--steps", "5"]  # js resumed, longer
    assert [c.status for c in sweep.cells] == ["finished", "finished", "failed"]  # fkl not retried unasked

    calls.clear()
    outcome["fkl"] = ("finished", True, 0)
    sweep = run_sweep(Sweep.open(tmp_path / "s", grid, ["--steps", "5"]), runner=runner, retry_failed=True,
                      progress=False)
    assert len(calls) == 1 and "--divergence" in calls[0] and calls[0][calls[0].index("--divergence") + 1] == "fkl"
    assert [c.status for c in sweep.cells] == ["finished"] * 3 and sweep.cells[2].attempts == 2
    with pytest.raises(ValueError, match="another grid or other flags"):
        Sweep.open(tmp_path / "s", grid, ["--steps", "5", "--beta", "0.2"])


def test_a_failed_cell_without_checkpoint_is_moved_aside_not_overwritten(tmp_path):
    grid = parse_grid("seed=0")
    fake_run(tmp_path / "s" / "seed=0", "failed", checkpoint=False)
    seen = []
    sweep = run_sweep(Sweep.open(tmp_path / "s", grid, []), retry_failed=True, progress=False,
                      runner=lambda command, log, env: seen.append(command) or fake_run(Path(command[-1]), "finished",
                                                                                         True) or 0)
    assert sweep.cells[0].status == "finished" and (tmp_path / "s" / "seed=0.failed-1" / "config.json").is_file()


def test_print_commands(tmp_path, capsys):
    code = cmd_sweep(["--grid", "divergence=rkl,js", "--output_dir", str(tmp_path / "s"), "--print_commands",
                      "--steps", "2", "--threads", "1"])
    lines = capsys.readouterr().out.strip().splitlines()
    assert code == 0 and len(lines) == 2
    assert lines[0].startswith("OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 ") and "-m fdpg.cli train --steps 2 " in lines[0]
    assert "--divergence js" in lines[1] and f"--output_dir {tmp_path / 's' / 'divergence=js'}" in lines[1]


@pytest.mark.slow
def test_a_real_sweep_of_two_cells_in_two_processes(tiny_model_dir, tmp_path, capsys):
    flags = ["--model", str(tiny_model_dir), "--task", "sentiment", "--steps", "1", "--batch_size", "4",
             "--samples_per_prompt", "2", "--max_new_tokens", "4", "--eval_samples", "0", "--progress", "false"]
    code = cmd_sweep(["--grid", "divergence=rkl,js", "--output_dir", str(tmp_path / "s"), "--workers", "2",
                      "--progress", "false", *flags])
    assert code == 0, capsys.readouterr()
    for divergence in ("rkl", "js"):
        run = tmp_path / "s" / f"divergence={divergence}"
        assert json.loads((run / "config.json").read_text())["config"]["divergence"] == divergence
        assert len(read_jsonl(run / "metrics.jsonl")) == 1
    log = (tmp_path / "s" / "logs" / "divergence=js.log").read_text()
    assert "finished after 1/1 steps" in log
    assert cmd_sweep(["--grid", "divergence=rkl,js", "--output_dir", str(tmp_path / "s"), "--progress", "false",
                      *flags]) == 0  # everything finished: nothing runs again
    assert log == (tmp_path / "s" / "logs" / "divergence=js.log").read_text()
