"""The run directory: what a run writes, so that analysis never needs the trainer.

::

    RUN/
      config.json      every setting, library versions, git commit, command line
      metrics.jsonl    one JSON object per step (flushed and fsynced as it is written)
      samples.jsonl    prompt, completion, scores, log pi, log a, pseudo-reward per sample
      summary.json     final (or last) metrics, status (finished / interrupted / failed), wall time
      checkpoints/     resumable state, see fdpg.checkpoint
      final/           the trained adapter or model (save_pretrained, safetensors)

A new run never overwrites an old one: if ``output_dir`` already holds files, the run goes to the
first free ``output_dir-2``, ``output_dir-3``, ... and says so. Non-finite floats are written as
``null`` so every line is strict JSON.
"""

from __future__ import annotations

import json
import math
import os
import platform
import subprocess
import sys
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import IO, Any

PACKAGES = ("torch", "transformers", "accelerate", "peft", "datasets", "scipy", "fdpg")


def fresh_run_dir(output_dir: str | Path) -> Path:
    """``output_dir`` if it is absent or empty, else the first free ``output_dir-N`` (N >= 2)."""
    base = Path(output_dir)
    candidate, n = base, 1
    while candidate.exists() and any(candidate.iterdir()):
        n += 1
        candidate = base.with_name(f"{base.name}-{n}")
    candidate.mkdir(parents=True, exist_ok=True)
    return candidate


def environment_info() -> dict[str, Any]:
    """Library versions, Python, platform and the git commit of the working directory (if any)."""
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                                cwd=Path(__file__).resolve().parent).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        commit = None
    return {"versions": versions, "python": sys.version.split()[0], "platform": platform.platform(),
            "git_commit": commit, "argv": sys.argv, "started": datetime.now(timezone.utc).isoformat()}


def _clean(value: Any) -> Any:
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    if hasattr(value, "item") and callable(value.item):  # 0-d tensors / numpy scalars
        return _clean(value.item())
    return value


def dumps(obj: Any) -> str:
    """Strict JSON (non-finite floats as null)."""
    return json.dumps(_clean(obj), allow_nan=False, ensure_ascii=False)


class JsonlWriter:
    """Append-only JSON-lines file, flushed and fsynced after every record (nothing lost on a crash)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fh: IO[str] | None = None

    def write(self, record: dict[str, Any]) -> None:
        if self._fh is None:
            self._fh = open(self.path, "a", encoding="utf-8")
        self._fh.write(dumps(record) + "\n")
        self._fh.flush()
        os.fsync(self._fh.fileno())

    def write_many(self, records: list[dict[str, Any]]) -> None:
        if not records:
            return
        if self._fh is None:
            self._fh = open(self.path, "a", encoding="utf-8")
        self._fh.write("".join(dumps(r) + "\n" for r in records))
        self._fh.flush()
        os.fsync(self._fh.fileno())

    def truncate_after_step(self, step: int) -> None:
        """Drop records with ``step`` greater than ``step`` (used when resuming from a checkpoint)."""
        self.close()
        if not self.path.exists():
            return
        kept = [line for line in self.path.read_text(encoding="utf-8").splitlines()
                if line.strip() and json.loads(line).get("step", 0) <= step]
        self.path.write_text("".join(line + "\n" for line in kept), encoding="utf-8")

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None


class RunLog:
    """The files of one run directory (see the module docstring)."""

    def __init__(self, run_dir: Path) -> None:
        self.dir = Path(run_dir)
        self.metrics = JsonlWriter(self.dir / "metrics.jsonl")
        self.samples = JsonlWriter(self.dir / "samples.jsonl")

    @classmethod
    def create(cls, output_dir: str | Path, config: dict[str, Any]) -> RunLog:
        run_dir = fresh_run_dir(output_dir)
        if Path(output_dir) != run_dir:
            print(f"[fdpg] {output_dir} already holds a run; writing this one to {run_dir}", file=sys.stderr)
        log = cls(run_dir)
        log.write_json("config.json", {"config": config, "environment": environment_info()})
        return log

    @classmethod
    def open_existing(cls, run_dir: str | Path) -> RunLog:
        run_dir = Path(run_dir)
        if not (run_dir / "config.json").is_file():
            raise FileNotFoundError(f"--resume {str(run_dir)!r} is not a run directory (no config.json)")
        return cls(run_dir)

    def saved_config(self) -> dict[str, Any]:
        return json.loads((self.dir / "config.json").read_text())["config"]

    def write_json(self, name: str, obj: dict[str, Any]) -> None:
        tmp = self.dir / f".{name}.tmp"
        tmp.write_text(json.dumps(_clean(obj), indent=2, allow_nan=False, ensure_ascii=False), encoding="utf-8")
        os.replace(tmp, self.dir / name)

    def close(self) -> None:
        self.metrics.close()
        self.samples.close()
