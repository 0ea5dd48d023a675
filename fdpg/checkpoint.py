"""Resumable checkpoints: ``RUN/checkpoints/step-N/``.

Each holds the trained parameters (``trainable.safetensors``: the LoRA adapter, or every weight
when fully fine-tuning), the off-policy proposal if any (``proposal.safetensors``), the optimizer
and scheduler states (``optimizer.pt``/``scheduler.pt``, plain tensors and numbers, loaded with
``weights_only=True``), and ``state.json`` (step, log Z estimator, baseline, anything else the
trainer keeps). A checkpoint is written into a hidden temporary directory and renamed into place,
so a crash while saving never leaves a half-written one; the newest ``keep`` are kept. Sampling is
seeded by (seed, step, chunk), so a resumed run reproduces an uninterrupted one.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

STEP_DIR = re.compile(r"^step-(\d+)$")


@dataclass
class Checkpoint:
    """A loaded checkpoint."""

    step: int
    trainable: dict[str, torch.Tensor]
    proposal: dict[str, torch.Tensor] | None
    optimizer: dict[str, Any]
    scheduler: dict[str, Any]
    state: dict[str, Any]


def checkpoint_dirs(run_dir: Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := STEP_DIR.match(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found)]


def _contiguous(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}


def save_checkpoint(
    run_dir: Path,
    step: int,
    trainable: dict[str, torch.Tensor],
    optimizer: dict[str, Any],
    scheduler: dict[str, Any],
    state: dict[str, Any],
    proposal: dict[str, torch.Tensor] | None = None,
    keep: int = 2,
) -> Path:
    """Write ``checkpoints/step-{step}`` atomically and prune all but the newest ``keep``."""
    root = Path(run_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step}"
    tmp = root / f".tmp-step-{step}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    save_file(_contiguous(trainable), str(tmp / "trainable.safetensors"))
    if proposal is not None:
        save_file(_contiguous(proposal), str(tmp / "proposal.safetensors"))
    torch.save(optimizer, tmp / "optimizer.pt")
    torch.save(scheduler, tmp / "scheduler.pt")
    (tmp / "state.json").write_text(json.dumps({"step": step, **state}, indent=1))
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    for old in checkpoint_dirs(run_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def load_checkpoint(path: Path) -> Checkpoint:
    """Read a checkpoint directory written by :func:`save_checkpoint`."""
    path = Path(path)
    state = json.loads((path / "state.json").read_text())
    proposal_file = path / "proposal.safetensors"
    return Checkpoint(
        step=int(state.pop("step")),
        trainable=load_file(str(path / "trainable.safetensors")),
        proposal=load_file(str(proposal_file)) if proposal_file.exists() else None,
        optimizer=torch.load(path / "optimizer.pt", weights_only=True),
        scheduler=torch.load(path / "scheduler.pt", weights_only=True),
        state=state,
    )


def latest_checkpoint(run_dir: Path) -> Path | None:
    dirs = checkpoint_dirs(run_dir)
    return dirs[-1] if dirs else None
