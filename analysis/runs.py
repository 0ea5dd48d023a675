"""Reading run directories (``config.json``, ``metrics.jsonl``, ``samples.jsonl``) into pandas.

A crashed run may end its JSON-lines files with a half-written line: it is dropped (and, with ``notes=``, said
so). :func:`scan_runs` checks paths before anything is loaded and says, for each thing it leaves out, why: not
a run directory, an unreadable ``config.json``, no step logged, a line of ``metrics.jsonl`` that is not JSON.
"""

from __future__ import annotations

import glob
import hashlib
import json
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

#: Settings copied from ``config.json`` onto every metrics row (the usual grouping variables), ``method``:
#: the algorithm and, for f-DPG, its divergence (``f-DPG rkl``, ``PPO``), one label per curve of a frontier plot,
#: and ``setting_id`` (:func:`setting_id`): runs with equal ids differ at most in the seed. ``kl_pi_a_source`` is
#: ``analytic`` where a run's KL(pi||a) is a closed form rather than an estimate from samples (Best-of-n,
#: :mod:`fdpg.bon`), empty otherwise.
SETTING_COLUMNS = ("task", "algo", "divergence", "method", "beta", "model", "lora_r", "learning_rate",
                   "batch_size", "seed", "kl_pi_a_source", "setting_id")
#: Config keys that do not change what a run computes (the seed, where it writes, how often it logs or saves):
#: left out of ``setting_id``. A copy of fdpg.config's resumable fields minus ``steps`` (analysis reads files and
#: imports nothing of the trainer); a key missing here only keeps runs apart, it never pools different runs.
NOT_A_SETTING = frozenset({"seed", "output_dir", "resume", "report_to", "save_every", "log_samples_every", "progress",
                           "exact_kl_every"})
#: How ``method`` names the algorithms of ``algo`` (f-DPG is labelled with its divergence). ``bon``: Best-of-n
#: sampling from the base model (:mod:`fdpg.bon`), a reference point beside the trained policies.
ALGORITHM_LABELS = {"fdpg": "f-DPG", "ppo": "PPO", "dpo": "DPO", "sft": "SFT", "raft": "RAFT", "bon": "Best-of-n"}
#: Algorithms whose "runs" are not trained (one logged row, no training curve): left out of training curves.
UNTRAINED_ALGOS = frozenset({"bon"})


def method_label(config: dict) -> str:
    """``f-DPG <divergence>`` for f-DPG runs (and runs made before ``algo`` existed), ``DPO`` for DPO with reverse KL
    and ``f-DPO <divergence>`` with another, else the algorithm's name."""
    algo = config.get("algo") or "fdpg"
    if algo == "fdpg":
        return f"f-DPG {config.get('divergence')}"
    if algo == "dpo" and config.get("divergence", "rkl") not in ("rkl", "alpha:1"):
        return f"f-DPO {config.get('divergence')}"
    return ALGORITHM_LABELS.get(algo, algo)


def setting_id(config: dict) -> str:
    """A short digest of every setting of ``config`` but the seed and bookkeeping (:data:`NOT_A_SETTING`): runs with
    the same id are repetitions of one experiment over seeds, the ones :func:`analysis.pareto.seed_points` pools."""
    kept = {k: v for k, v in config.items() if k not in NOT_A_SETTING}
    text = json.dumps(kept, sort_keys=True, default=str)
    return hashlib.sha1(text.encode()).hexdigest()[:10]


def read_jsonl(path: str | Path, notes: list[str] | None = None) -> list[dict]:
    """The records of a JSON-lines file (``[]`` when it does not exist).

    A last line that is not valid JSON is the half-written record of a run that was killed while writing: it is
    dropped, and a sentence saying so is appended to ``notes`` (when given). Any other line that is not JSON (or
    not an object) raises ``ValueError`` naming the file and line: that is damage, not a crash.
    """
    path = Path(path)
    if not path.is_file():
        return []
    rows = []
    lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    last = max((i for i, line in enumerate(lines, start=1) if line.strip()), default=0)
    for number, line in enumerate(lines, start=1):
        if line.strip():
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                if number == last:  # a torn last line of a killed run: keep what is whole
                    if notes is not None:
                        notes.append(f"{path.name}: dropped its half-written last line {number} (a crashed run?)")
                    break
                raise ValueError(f"{path}:{number} is not valid JSON: {exc}") from exc
            if not isinstance(row, dict):
                raise ValueError(f"{path}:{number} is not a JSON object: {line[:60]!r}")
            rows.append(row)
    return rows


_read_jsonl = read_jsonl  # the name it had


def run_config(run_dir: str | Path) -> dict:
    """The ``config`` section of a run's ``config.json``."""
    path = Path(run_dir) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{run_dir} is not a run directory (no config.json)")
    return json.loads(path.read_text())["config"]


def load_run(run_dir: str | Path, notes: list[str] | None = None) -> pd.DataFrame:
    """One row per logged step: every metric, plus ``run`` (the directory name) and the main settings.
    ``notes``: a list to which what was dropped is appended (a half-written last line, :func:`read_jsonl`)."""
    run_dir = Path(run_dir)
    config = run_config(run_dir)
    frame = pd.DataFrame(read_jsonl(run_dir / "metrics.jsonl", notes))
    frame.insert(0, "run", run_dir.name)
    config = {**config, "algo": config.get("algo") or "fdpg"}  # runs made before --algo existed are f-DPG
    settings = {**config, "method": method_label(config), "setting_id": setting_id(config)}
    for key in SETTING_COLUMNS:
        frame[key] = settings.get(key)
    return frame


def run_dirs(paths: str | Path | Iterable[str | Path]) -> list[Path]:
    """The run directories (with a ``config.json``) a glob pattern, a directory holding runs, a run directory or a
    list of run directories names."""
    if isinstance(paths, (str, Path)):
        text = str(paths)
        if any(ch in text for ch in "*?["):
            candidates = [Path(p) for p in sorted(glob.glob(text))]
        elif (Path(text) / "config.json").is_file():
            candidates = [Path(text)]
        else:
            candidates = sorted(p for p in Path(text).iterdir() if p.is_dir())
    else:
        candidates = [Path(p) for p in paths]
    runs = [p for p in candidates if (p / "config.json").is_file()]
    if not runs:
        raise FileNotFoundError(f"no run directory (with config.json) found in {paths!r}")
    return runs


def load_runs(paths: str | Path | Iterable[str | Path]) -> pd.DataFrame:
    """Metrics of several runs (a glob pattern, a directory holding runs, or a list of run directories)."""
    return pd.concat([load_run(p) for p in run_dirs(paths)], ignore_index=True)


def load_samples(run_dir: str | Path, notes: list[str] | None = None) -> pd.DataFrame:
    """One row per logged sample; the per-feature scores become ``score/<name>`` columns. ``notes``: as in
    :func:`load_run`."""
    rows = read_jsonl(Path(run_dir) / "samples.jsonl", notes)
    frame = pd.DataFrame(rows)
    if "scores" in frame:
        scores = pd.json_normalize(frame.pop("scores").tolist()).add_prefix("score/")
        frame = pd.concat([frame, scores], axis=1)
    return frame


@dataclass
class RunScan:
    """What :func:`scan_runs` found: the run directories that can be loaded (``dirs``), the paths it left out with
    the reason (``skipped``: ``(path, reason)``) and remarks on runs it kept (``notes``: ``(path, remark)``, e.g. a
    dropped half-written last line)."""

    dirs: list[Path] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)
    notes: list[tuple[str, str]] = field(default_factory=list)

    def messages(self) -> list[str]:
        """One line per skipped path and per note, for a person."""
        return ([f"skipped {path}: {reason}" for path, reason in self.skipped]
                + [f"note {path}: {remark}" for path, remark in self.notes])


#: The name ``fdpg sweep`` gives a failed cell's run directory it moves aside before running the cell again.
MOVED_ASIDE = re.compile(r"\.failed-\d+$")


def _candidates(path: str | Path, scan: RunScan) -> list[Path]:
    """The directories a path names: itself when it is a run (or is not a directory), else its subdirectories;
    a glob pattern's matches."""
    text = str(path)
    if any(ch in text for ch in "*?["):
        matches = [Path(p) for p in sorted(glob.glob(text))]
        if not matches:
            scan.skipped.append((text, "the pattern matches nothing"))
        return [p for p in matches if p.is_dir() or p.exists()]
    path = Path(text)
    if not path.exists():
        scan.skipped.append((text, "does not exist"))
        return []
    if (path / "config.json").exists() or not path.is_dir():
        return [path]
    subdirectories = sorted(p for p in path.iterdir() if p.is_dir())
    if not any((p / "config.json").exists() for p in subdirectories):
        scan.skipped.append((text, "not a run directory (no config.json) and holds no run directory"))
        return []
    return subdirectories


def check_run(run_dir: str | Path) -> tuple[str | None, list[str]]:
    """``(reason, notes)``: why ``run_dir`` cannot be loaded (``None`` when it can) and remarks on what loading
    it drops. A run is loadable when its ``config.json`` is a JSON object with a ``config`` section and its
    ``metrics.jsonl`` holds at least one whole step (a half-written last line is dropped with a note)."""
    run_dir = Path(run_dir)
    notes: list[str] = []
    if not run_dir.is_dir():
        return "not a directory", notes
    config_path = run_dir / "config.json"
    if not config_path.is_file():
        return "not a run directory (no config.json)", notes
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))["config"]
        if not isinstance(config, dict):
            raise TypeError("its 'config' is not an object")
    except (ValueError, KeyError, TypeError) as exc:
        kind = "not valid JSON" if isinstance(exc, ValueError) else "not a run's config.json"
        return f"config.json is {kind} ({type(exc).__name__}: {exc})", notes
    if not (run_dir / "metrics.jsonl").is_file():
        return "no metrics.jsonl: the run logged no step (it failed or was stopped before its first step)", notes
    try:
        rows = read_jsonl(run_dir / "metrics.jsonl", notes)
    except (ValueError, OSError) as exc:
        return f"metrics.jsonl is damaged: {exc}", notes
    if not rows:
        return "metrics.jsonl holds no step (the run failed or was stopped before its first step)", notes
    if not any("step" in row for row in rows):
        return "metrics.jsonl has no 'step' in any line: not a run's metrics", notes
    return None, notes


def scan_runs(paths: str | Path | Iterable[str | Path]) -> RunScan:
    """The loadable run directories among ``paths`` (each a run directory, a directory holding runs, or a glob
    pattern; a list of them), each once, and what was left out and why (:class:`RunScan`). Never raises on bad
    input: a path that does not exist, a directory that is not a run, a broken ``config.json``, a run with no
    step, a damaged ``metrics.jsonl``, a second run of the same directory name or a failed attempt that
    ``fdpg sweep`` moved aside (``CELL.failed-N``) is skipped with its reason; a run whose last line is
    half-written (a crash) is kept with a note."""
    items = [paths] if isinstance(paths, (str, Path)) else list(paths)
    scan = RunScan()
    seen: set[Path] = set()
    names: dict[str, Path] = {}
    for item in items:
        for candidate in _candidates(item, scan):
            key = candidate.resolve()
            if key in seen:
                continue
            seen.add(key)
            reason, notes = check_run(candidate)
            if reason is None and MOVED_ASIDE.search(candidate.name):
                reason = ("a failed attempt that fdpg sweep moved aside (CELL.failed-N); its cell was run again in "
                          "CELL, so loading both would count one setting twice")
            if reason is None and candidate.name in names:
                reason = (f"its name is that of {names[candidate.name]}, loaded already (analysis tells runs apart "
                          "by their directory's name)")
            if reason is None:
                names[candidate.name] = candidate
                scan.dirs.append(candidate)
                scan.notes.extend((str(candidate), note) for note in notes)
            else:
                scan.skipped.append((str(candidate), reason))
    return scan
