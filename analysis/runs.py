"""Reading run directories (``config.json``, ``metrics.jsonl``, ``samples.jsonl``) into pandas."""

from __future__ import annotations

import glob
import hashlib
import json
from collections.abc import Iterable
from pathlib import Path

import pandas as pd

#: Settings copied from ``config.json`` onto every metrics row (the usual grouping variables), ``method``:
#: the algorithm and, for f-DPG, its divergence (``f-DPG rkl``, ``PPO``), one label per curve of a frontier plot,
#: and ``setting_id`` (:func:`setting_id`): runs with equal ids differ at most in the seed.
SETTING_COLUMNS = ("task", "algo", "divergence", "method", "beta", "model", "lora_r", "learning_rate",
                   "batch_size", "seed", "setting_id")
#: Config keys that do not change what a run computes (the seed, where it writes, how often it logs or saves):
#: left out of ``setting_id``. A copy of fdpg.config's resumable fields minus ``steps`` (analysis reads files and
#: imports nothing of the trainer); a key missing here only keeps runs apart, it never pools different runs.
NOT_A_SETTING = frozenset({"seed", "output_dir", "resume", "report_to", "save_every", "log_samples_every", "progress",
                           "exact_kl_every"})
#: How ``method`` names the algorithms of ``algo`` (f-DPG is labelled with its divergence).
ALGORITHM_LABELS = {"fdpg": "f-DPG", "ppo": "PPO", "dpo": "DPO"}


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


def _read_jsonl(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    rows = []
    lines = path.read_text(encoding="utf-8").splitlines()
    for number, line in enumerate(lines, start=1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as exc:
                if number == len(lines):  # a torn last line of a killed run: keep what is whole
                    break
                raise ValueError(f"{path}:{number} is not valid JSON: {exc}") from exc
    return rows


def run_config(run_dir: str | Path) -> dict:
    """The ``config`` section of a run's ``config.json``."""
    path = Path(run_dir) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{run_dir} is not a run directory (no config.json)")
    return json.loads(path.read_text())["config"]


def load_run(run_dir: str | Path) -> pd.DataFrame:
    """One row per logged step: every metric, plus ``run`` (the directory name) and the main settings."""
    run_dir = Path(run_dir)
    config = run_config(run_dir)
    frame = pd.DataFrame(_read_jsonl(run_dir / "metrics.jsonl"))
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


def load_samples(run_dir: str | Path) -> pd.DataFrame:
    """One row per logged sample; the per-feature scores become ``score/<name>`` columns."""
    rows = _read_jsonl(Path(run_dir) / "samples.jsonl")
    frame = pd.DataFrame(rows)
    if "scores" in frame:
        scores = pd.json_normalize(frame.pop("scores").tolist()).add_prefix("score/")
        frame = pd.concat([frame, scores], axis=1)
    return frame
