"""Small tensor helpers shared by the objectives modules (validation and precision)."""

from __future__ import annotations

import torch

from objectives.errors import ScoreError


def as_tensor(x: torch.Tensor | float | list, name: str) -> torch.Tensor:
    """Return ``x`` as a floating tensor, raising :class:`ScoreError` that names ``name`` otherwise."""
    if isinstance(x, torch.Tensor):
        t = x
    else:
        try:
            t = torch.as_tensor(x, dtype=torch.float64)
        except (TypeError, ValueError) as exc:
            raise ScoreError(f"{name} must be numbers (a tensor or a list of floats), got {x!r:.80}") from exc
    if not (t.is_floating_point()):
        if t.dtype == torch.bool or not t.is_complex():
            t = t.to(torch.float64)
        else:
            raise ScoreError(f"{name} must be real numbers, got dtype {t.dtype}")
    return t


def check_no_nan(t: torch.Tensor, name: str) -> None:
    """Raise :class:`ScoreError` naming ``name`` and the first offending index if ``t`` has a NaN."""
    nan = torch.isnan(t)
    if bool(nan.any()):
        idx = tuple(int(i) for i in torch.nonzero(nan)[0].tolist())
        raise ScoreError(
            f"{name} contains NaN ({int(nan.sum())} of {t.numel()} values, first at index {idx}); "
            "check the scorer or model that produced it"
        )


def broadcast_pair(a: torch.Tensor, b: torch.Tensor, name_a: str, name_b: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Broadcast two tensors, raising :class:`ScoreError` with both shapes when they cannot be."""
    try:
        shape = torch.broadcast_shapes(a.shape, b.shape)
    except RuntimeError as exc:
        raise ScoreError(
            f"{name_a} has shape {tuple(a.shape)} and {name_b} has shape {tuple(b.shape)}, which do not "
            "broadcast; pass one value per sample for both"
        ) from exc
    return a.expand(shape), b.expand(shape)


def wide_dtype(t: torch.Tensor) -> torch.dtype:
    """The dtype used for internal arithmetic: float64, except where the device has none (MPS)."""
    return torch.float32 if t.device.type == "mps" else torch.float64
