"""Sweeps: one ``fdpg train`` run per cell of a grid of settings, resumable, in parallel processes or as commands.

::

    fdpg sweep --grid "divergence=rkl,fkl,tv,js beta=0.05,0.1 seed=0,1" --output_dir sweeps/NAME [train flags]
    fdpg sweep --grid_file grid.yaml --output_dir sweeps/NAME --workers 2
    fdpg sweep ... --print_commands > cells.txt        one command per cell, for a cluster's array jobs

The grid is ``NAME=V1,V2,...`` items separated by spaces (or a YAML/JSON mapping of names to lists); every
name is a ``fdpg train`` setting, ``algo`` included, so f-DPG, PPO and DPO cells share a sweep. The cells are
the grid's product; each runs in ``SWEEP/NAME=V1_NAME=V2...`` (values made safe for paths), with the
sweep's other flags. ``SWEEP/sweep.json`` (the manifest) records the grid, the flags and each cell's status
(``pending``, ``running``, ``finished``, ``interrupted``, ``failed``), its run directory, exit code and wall
time; each cell's output goes to ``SWEEP/logs/CELL.log``.

Run it again and the finished cells are skipped, interrupted ones (a checkpoint but no finished summary)
continue from their checkpoint (``fdpg train --resume``, which takes the cell's saved settings), failed ones
are reported and retried with ``--retry_failed`` (a failed cell without a checkpoint is moved aside to
``CELL.failed-N`` first: a run directory is never overwritten).

Workers: ``--workers N`` runs N cells at once, each process with ``--threads`` torch threads (default: the
cores divided between the workers, at least 1), set through ``OMP_NUM_THREADS``/``MKL_NUM_THREADS``, so that
the workers' threads together never exceed the cores (oversubscribed torch threads spin and run many times
slower). The default is one single-threaded worker per core: measured on 2 cores, two 4-step cells took 62 s as
two 1-thread workers and 84 s one after the other with 2 threads (a 2-thread step is far from twice as fast).
On a cluster, ``--print_commands`` prints one self-contained command per cell; for several GPUs or
nodes per cell, prefix a cell's command with ``accelerate launch --num_processes K -m fdpg.cli``.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import re
import shlex
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

MANIFEST = "sweep.json"
STATUSES = ("pending", "running", "finished", "interrupted", "failed")


# ---------------------------------------------------------------------------------------------- the grid
def parse_grid(text: str) -> dict[str, list[str]]:
    """``"divergence=rkl,js beta=0.1"`` -> ``{"divergence": ["rkl", "js"], "beta": ["0.1"]}`` (values as given)."""
    grid: dict[str, list[str]] = {}
    for item in text.split():
        name, sep, values = item.partition("=")
        name = name.strip().lstrip("-").replace("-", "_")
        if not sep or not name or not values:
            raise ValueError(f"--grid items are NAME=V1,V2,... separated by spaces, got {item!r} in {text!r}")
        if name in grid:
            raise ValueError(f"--grid names {name!r} twice")
        grid[name] = [v for v in values.split(",") if v != ""]
        if not grid[name]:
            raise ValueError(f"--grid {name!r} has no values")
    return grid


def load_grid_file(path: str | Path) -> dict[str, list[str]]:
    """A YAML or JSON mapping of setting names to a value or a list of values."""
    from fdpg.config import read_mapping_file

    data = read_mapping_file(path, "--grid_file")
    if not data:
        raise ValueError(f"--grid_file {str(path)!r} must hold a mapping of setting names to lists of values")
    return {str(k).replace("-", "_"): [_as_flag_value(v) for v in (vs if isinstance(vs, list) else [vs])]
            for k, vs in data.items()}


def _as_flag_value(value: Any) -> str:
    return ("true" if value else "false") if isinstance(value, bool) else str(value)


def check_grid(grid: Mapping[str, Sequence[str]], flags: Sequence[str]) -> None:
    """Every grid name is a ``fdpg train`` setting, and no setting is both on the grid and a fixed flag."""
    import dataclasses

    from fdpg.config import TrainConfig

    names = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(grid) - names)
    if unknown:
        raise ValueError(f"--grid names {unknown} are not settings of `fdpg train` (see `fdpg train --help`)")
    for reserved in ("output_dir", "resume"):
        if reserved in grid:
            raise ValueError(f"--grid cannot vary {reserved}: the sweep sets it per cell")
    fixed = {f.lstrip("-").split("=")[0].replace("-", "_") for f in flags if f.startswith("--")}
    both = sorted(set(grid) & fixed)
    if both:
        raise ValueError(f"{both} are both on the grid and given as flags; keep one")
    if {"output_dir", "resume"} & fixed:
        raise ValueError("give the sweep's directory with --output_dir of `fdpg sweep`; cells are resumed by the sweep")


def grid_cells(grid: Mapping[str, Sequence[str]]) -> list[dict[str, str]]:
    """The product of the grid, in the order of its names and values."""
    names = list(grid)
    return [dict(zip(names, values)) for values in itertools.product(*(grid[n] for n in names))]


def cell_name(cell: Mapping[str, str]) -> str:
    """``divergence=rkl_beta=0.1`` (characters other than letters, digits, ``.``, ``-``, ``=`` and ``:`` become
    ``-``)."""
    return "_".join(f"{k}={re.sub(r'[^A-Za-z0-9.=:-]', '-', str(v))}" for k, v in cell.items())


# ---------------------------------------------------------------------------------------------- cells
@dataclass
class Cell:
    """One cell of the sweep and where it stands."""

    name: str
    settings: dict[str, str]
    status: str = "pending"
    run_dir: str | None = None
    returncode: int | None = None
    wall_time_s: float | None = None
    attempts: int = 0
    log: str | None = None
    error: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def cell_state(run_dir: Path) -> str:
    """``finished``, ``interrupted`` (a checkpoint to continue from), ``failed`` (a run directory without a
    checkpoint and not finished) or ``pending`` (no run yet)."""
    if not (run_dir / "config.json").is_file():
        return "pending"
    try:
        status = json.loads((run_dir / "summary.json").read_text()).get("status")
    except (OSError, ValueError):
        status = None  # killed before it could write its summary
    if status == "finished":
        return "finished"
    has_checkpoint = (run_dir / "checkpoints").is_dir() and any((run_dir / "checkpoints").iterdir())
    return "interrupted" if has_checkpoint else "failed"


def train_command(cell: Cell, run_dir: Path, flags: Sequence[str], resume: bool,
                  python: str = sys.executable) -> list[str]:
    """The ``fdpg train`` command of a cell: a new run, or a resumed one (the run's saved settings apply)."""
    base = [python, "-m", "fdpg.cli", "train"]
    if resume:
        return [*base, "--resume", str(run_dir), *_steps_flag(flags)]
    settings = [arg for k, v in cell.settings.items() for arg in (f"--{k}", v)]
    return [*base, *flags, *settings, "--output_dir", str(run_dir)]


def _steps_flag(flags: Sequence[str]) -> list[str]:
    """The sweep's ``--steps`` (which may have been raised since the cell started), for a resumed cell."""
    for i, flag in enumerate(flags):
        if flag == "--steps" and i + 1 < len(flags):
            return ["--steps", flags[i + 1]]
        if flag.startswith("--steps="):
            return [flag]
    return []


def thread_split(workers: int, cores: int | None = None) -> int:
    """Torch threads per worker so that all workers together use at most the cores (at least 1 each)."""
    cores = cores or os.cpu_count() or 1
    if workers < 1:
        raise ValueError(f"--workers must be a positive integer, got {workers}")
    return max(1, cores // workers)


Runner = Callable[[list[str], Path, dict[str, str]], int]


def run_process(command: list[str], log_path: Path, env: dict[str, str]) -> int:
    """Run ``command`` with its output in ``log_path``; its exit code."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "a", encoding="utf-8") as log:
        log.write(f"$ {shlex.join(command)}\n")
        log.flush()
        return subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, env=env).returncode


@dataclass
class Sweep:
    """A sweep directory: its grid, its fixed flags and its cells (see the module docstring)."""

    directory: Path
    grid: dict[str, list[str]]
    flags: list[str]
    cells: list[Cell] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @classmethod
    def open(cls, directory: str | Path, grid: dict[str, list[str]], flags: Sequence[str]) -> Sweep:
        """The sweep in ``directory``: its recorded cells' history kept, a changed grid refused."""
        directory = Path(directory)
        sweep = cls(directory, dict(grid), list(flags))
        manifest = directory / MANIFEST
        previous: dict[str, dict] = {}
        if manifest.is_file():
            recorded = json.loads(manifest.read_text())
            same = recorded.get("grid") == sweep.grid and recorded.get("flags") == sweep.flags
            if not same and not _only_steps_changed(recorded, sweep):
                raise ValueError(f"{directory} holds a sweep with another grid or other flags (grid "
                                 f"{recorded.get('grid')}, flags {recorded.get('flags')}); use a new --output_dir, "
                                 "or the same grid and flags to continue it (only --steps may change)")
            previous = {c["name"]: c for c in recorded.get("cells", [])}
        for settings in grid_cells(grid):
            name = cell_name(settings)
            cell = Cell(name, settings, **{k: v for k, v in previous.get(name, {}).items()
                                           if k not in ("name", "settings")})
            sweep.cells.append(cell)
        return sweep

    def run_dir(self, cell: Cell) -> Path:
        return self.directory / cell.name

    def refresh(self) -> None:
        """Each cell's status from its run directory (what is on disk is the truth)."""
        for cell in self.cells:
            state = cell_state(self.run_dir(cell))
            if not (state == "pending" and cell.status == "failed"):  # a recorded failure stays one
                cell.status = state
            if state != "pending":
                cell.run_dir = str(self.run_dir(cell))

    def write_manifest(self) -> None:
        with self._lock:
            self.directory.mkdir(parents=True, exist_ok=True)
            data = {"grid": self.grid, "flags": self.flags,
                    "counts": {s: sum(c.status == s for c in self.cells) for s in STATUSES},
                    "cells": [c.as_dict() for c in self.cells]}
            tmp = self.directory / f".{MANIFEST}.tmp"
            tmp.write_text(json.dumps(data, indent=2))
            os.replace(tmp, self.directory / MANIFEST)

    def todo(self, retry_failed: bool) -> list[Cell]:
        """Cells to run now: pending and interrupted ones, and failed ones when asked."""
        return [c for c in self.cells if c.status in ("pending", "interrupted", "running")
                or (retry_failed and c.status == "failed")]

    def command(self, cell: Cell) -> list[str]:
        run_dir = self.run_dir(cell)
        return train_command(cell, run_dir, self.flags, resume=cell_state(run_dir) == "interrupted")

    def run_cell(self, cell: Cell, runner: Runner, threads: int) -> Cell:
        run_dir = self.run_dir(cell)
        if cell_state(run_dir) == "failed":  # nothing to resume: keep the failed run aside, start again
            n = 1
            while run_dir.with_name(f"{run_dir.name}.failed-{n}").exists():
                n += 1
            run_dir.rename(run_dir.with_name(f"{run_dir.name}.failed-{n}"))
        command = self.command(cell)
        env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
               "TOKENIZERS_PARALLELISM": "false"}
        log = self.directory / "logs" / f"{cell.name}.log"
        cell.status, cell.log, cell.attempts = "running", str(log), cell.attempts + 1
        self.write_manifest()
        started = time.perf_counter()
        try:
            cell.returncode = runner(command, log, env)
        except Exception as exc:  # the runner itself failed (not the cell's run)
            cell.returncode, cell.error = -1, f"{type(exc).__name__}: {exc}"
        cell.wall_time_s = time.perf_counter() - started
        state = cell_state(run_dir)
        cell.status = state if state != "pending" else "failed"
        cell.run_dir = str(run_dir) if run_dir.exists() else None
        if cell.status == "failed" and cell.error is None:
            cell.error = f"exit code {cell.returncode}; see {log}"
        self.write_manifest()
        return cell


def _only_steps_changed(recorded: Mapping[str, Any], sweep: Sweep) -> bool:
    def without_steps(flags: Sequence[str]) -> list[str]:
        out, skip = [], False
        for f in flags:
            if skip:
                skip = False
                continue
            if f == "--steps":
                skip = True
                continue
            if not f.startswith("--steps="):
                out.append(f)
        return out

    return recorded.get("grid") == sweep.grid and without_steps(recorded.get("flags", [])) == without_steps(sweep.flags)


def run_sweep(sweep: Sweep, workers: int = 1, threads: int | None = None, retry_failed: bool = False,
              runner: Runner = run_process, progress: bool = True) -> Sweep:
    """Run the cells still to do, ``workers`` at a time, each with ``threads`` torch threads."""
    from tqdm.auto import tqdm

    threads = threads or thread_split(workers)
    sweep.refresh()
    todo = sweep.todo(retry_failed)
    sweep.write_manifest()
    done = len(sweep.cells) - len(todo)
    bar = tqdm(total=len(sweep.cells), initial=done, desc="sweep", unit="cell", disable=not progress)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        for cell in pool.map(lambda c: sweep.run_cell(c, runner, threads), todo):
            bar.set_postfix_str(f"{cell.name}: {cell.status}", refresh=False)
            bar.update(1)
    bar.close()
    return sweep


# ---------------------------------------------------------------------------------------------- the command
def cmd_sweep(argv: Sequence[str]) -> int:
    """``fdpg sweep --grid "NAME=V1,V2 ..." --output_dir DIR [train flags]``: one run per cell (module docstring)."""
    parser = argparse.ArgumentParser(prog="fdpg sweep", description=__doc__.splitlines()[0],
                                     epilog="Any other flag is passed to every cell's `fdpg train`.")
    parser.add_argument("--grid", default=None, help='e.g. "divergence=rkl,fkl,tv,js beta=0.05,0.1 seed=0,1,2"')
    parser.add_argument("--grid_file", "--grid-file", default=None, help="the grid as a YAML/JSON mapping")
    parser.add_argument("--output_dir", "--output-dir", required=True, help="the sweep directory")
    parser.add_argument("--workers", type=int, default=None,
                        help="cells run at once (separate processes); default: one single-threaded worker per core "
                             "(on 2 cores two 1-thread cells took 62 s against 84 s one after the other with 2 "
                             "threads each)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads per worker (default: the cores divided between the workers)")
    parser.add_argument("--retry_failed", "--retry-failed", action="store_true", help="run failed cells again")
    parser.add_argument("--print_commands", "--print-commands", action="store_true",
                        help="print one command per cell still to do (for array jobs) and run nothing")
    parser.add_argument("--progress", default="true", choices=["true", "false"])
    args, flags = parser.parse_known_args(list(argv))
    if (args.grid is None) == (args.grid_file is None):
        raise ValueError("give the grid with --grid \"NAME=V1,V2 ...\" or --grid_file FILE (one of them)")
    grid = parse_grid(args.grid) if args.grid else load_grid_file(args.grid_file)
    check_grid(grid, flags)
    sweep = Sweep.open(args.output_dir, grid, flags)
    if args.print_commands:
        sweep.refresh()
        threads = args.threads or 1
        for cell in sweep.todo(args.retry_failed):
            print(f"OMP_NUM_THREADS={threads} MKL_NUM_THREADS={threads} {shlex.join(sweep.command(cell))}")
        return 0
    if args.workers is None:
        args.workers = max(1, min(len(sweep.cells), (os.cpu_count() or 1) // (args.threads or 1)))
    threads = args.threads or thread_split(args.workers)
    print(f"[fdpg] sweep {args.output_dir}: {len(sweep.cells)} cells, {args.workers} worker(s) x {threads} "
          f"thread(s)", file=sys.stderr, flush=True)
    run_sweep(sweep, args.workers, threads, args.retry_failed, progress=args.progress == "true")
    counts = {s: sum(c.status == s for c in sweep.cells) for s in STATUSES}
    print(f"[fdpg] sweep {args.output_dir}: " + ", ".join(f"{n} {s}" for s, n in counts.items() if n))
    for cell in sweep.cells:
        if cell.status != "finished":
            print(f"  {cell.name}: {cell.status}" + (f" ({cell.error})" if cell.error else ""))
    return 0 if counts["finished"] == len(sweep.cells) else 1
