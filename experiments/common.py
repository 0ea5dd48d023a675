"""What every experiment script shares: its stages (``fdpg`` commands) run once each, resumably, with logs and times.

An experiment is a list of :class:`Stage` s, each one ``fdpg`` command (a sweep, Best-of-n, a report). Running
the script again skips the stages that finished (a stage's ``done`` test, e.g. the sweep's manifest says every
cell finished) and lets ``fdpg sweep`` resume the interrupted cells from their checkpoints. Every stage's output
goes to ``OUT/logs/STAGE.log``; the wall time of each stage, summed over the sessions that worked on it, goes
to ``OUT/timings.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

#: The tiny model of ``--smoke`` runs is given by the caller (the test suite builds one); nothing is downloaded.
SMOKE_STEPS = 1


@dataclass
class Stage:
    """One ``fdpg`` command of an experiment: ``name`` (its log's name), the command's arguments after ``fdpg``, and
    ``done(out)``, whether its results are already there (then it is skipped)."""

    name: str
    argv: list[str]
    done: Callable[[Path], bool] = field(default=lambda out: False)


def sweep_finished(directory: Path) -> bool:
    """Every cell of the sweep in ``directory`` finished (its ``sweep.json`` says so)."""
    try:
        cells = json.loads((directory / "sweep.json").read_text())["cells"]
    except (OSError, ValueError, KeyError):
        return False
    values = cells.values() if isinstance(cells, dict) else cells
    return bool(values) and all(c.get("status") == "finished" for c in values)


def flags(settings: dict[str, Any]) -> list[str]:
    """``{"beta": 0.1, "lora_r": 8}`` -> ``["--beta", "0.1", "--lora_r", "8"]`` (booleans as true/false)."""
    out: list[str] = []
    for name, value in settings.items():
        out += [f"--{name}", ("true" if value else "false") if isinstance(value, bool) else str(value)]
    return out


def fdpg_command(argv: Sequence[str]) -> list[str]:
    """The ``fdpg`` command line of ``argv`` with this interpreter (the environment the script runs in)."""
    return [sys.executable, "-m", "fdpg.cli", *argv]


def load_timings(out: Path) -> dict[str, float]:
    try:
        return {k: float(v) for k, v in json.loads((out / "timings.json").read_text()).items()}
    except (OSError, ValueError, AttributeError):
        return {}


def run_stages(stages: Sequence[Stage], out: Path, dry_run: bool = False) -> dict[str, float]:
    """Run each stage that is not done, in order; a failed stage stops the experiment with its log's name.

    Returns the wall time of every stage so far (seconds, summed over sessions), also written to
    ``OUT/timings.json``."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "logs").mkdir(exist_ok=True)
    timings = load_timings(out)
    for stage in stages:
        command = fdpg_command(stage.argv)
        if stage.done(out):
            print(f"[experiment] {stage.name}: done, skipped", flush=True)
            continue
        print(f"[experiment] {stage.name}: {shlex.join(['fdpg', *stage.argv])}", flush=True)
        if dry_run:
            continue
        log = out / "logs" / f"{stage.name}.log"
        started = time.perf_counter()
        with open(log, "a", encoding="utf-8") as fh:
            code = subprocess.call(command, stdout=fh, stderr=subprocess.STDOUT, env={**os.environ})
        timings[stage.name] = timings.get(stage.name, 0.0) + time.perf_counter() - started
        (out / "timings.json").write_text(json.dumps(timings, indent=1) + "\n")
        if code != 0:
            raise SystemExit(f"[experiment] stage {stage.name!r} failed (exit {code}); see {log}. Run the same "
                             f"command again to resume it.")
        print(f"[experiment] {stage.name}: finished in {timings[stage.name]:.0f} s", flush=True)
    return timings


def experiment_parser(description: str, default_out: str) -> argparse.ArgumentParser:
    """The options every experiment script takes."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--out", default=default_out, help="where the runs and results go (default %(default)s)")
    parser.add_argument("--workers", type=int, default=2, help="sweep workers (one thread each on 2 cores)")
    parser.add_argument("--smoke", metavar="MODEL", default=None,
                        help="a 1-step version of every stage on MODEL (a tiny local model): the test suite's check")
    parser.add_argument("--dry_run", action="store_true", help="print the stages' commands, run nothing")
    parser.add_argument("--plugins", type=_load_plugins, default=None,
                        help="your modules or .py files (comma-separated), imported here and by every stage (they "
                             "reach the stages through FDPG_PLUGINS; see fdpg.plugins)")
    return parser


def _load_plugins(text: str) -> list[str]:
    """``--plugins``: import them now (a plugin that fails stops the script before any stage starts)."""
    from fdpg.plugins import PluginError, load_plugins

    try:
        return load_plugins(text)
    except PluginError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc
