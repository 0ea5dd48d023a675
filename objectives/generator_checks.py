r"""Validation of user-supplied f-divergence generators and the limit :math:`f'(\infty)`.

A valid generator is convex with :math:`f(1) = 0`; we check it numerically on the grid
:math:`t = e^{s}`, :math:`s \in [-10, 10]` (201 points, float64), and report the first failing t.
"""

from __future__ import annotations

import math
from typing import Protocol

import torch

from objectives.errors import InvalidGeneratorError


class Divergence(Protocol):
    """What is checked of a divergence (:class:`objectives.divergences.Divergence`): its f and f' of ``log t``."""

    def _f(self, log_t: torch.Tensor) -> torch.Tensor: ...

    def _f_prime(self, log_t: torch.Tensor) -> torch.Tensor: ...

GRID_LOG_T = torch.linspace(-10.0, 10.0, 201, dtype=torch.float64)
F_AT_ONE_TOL = 1e-6
CONVEXITY_RTOL = 1e-7


def validate_generator(div: Divergence, name: str) -> None:
    """Raise :class:`InvalidGeneratorError` unless ``div``'s f is finite, convex and vanishes at 1."""
    try:
        f_one = float(div._f(torch.zeros(1, dtype=torch.float64)))
        f_vals = div._f(GRID_LOG_T).detach()
        fp_vals = div._f_prime(GRID_LOG_T).detach()
    except Exception as exc:  # the user's function failed: say so, with the cause attached
        raise InvalidGeneratorError(
            f"generator {name!r} could not be evaluated on float64 tensors t in [e^-10, e^10]: {exc}. "
            "Write f with torch operations that accept a tensor t"
        ) from exc
    if f_vals.shape != GRID_LOG_T.shape:
        raise InvalidGeneratorError(
            f"generator {name!r} must act elementwise: f(t) for t of shape {tuple(GRID_LOG_T.shape)} "
            f"returned shape {tuple(f_vals.shape)}"
        )
    if not math.isfinite(f_one) or abs(f_one) > F_AT_ONE_TOL:
        raise InvalidGeneratorError(
            f"generator {name!r} fails f(1) = 0: f(1) = {f_one!r}. Subtract f(1) from your f"
        )
    for label, vals in (("f", f_vals), ("f'", fp_vals)):
        bad = ~torch.isfinite(vals)
        if bool(bad.any()):
            t_bad = math.exp(float(GRID_LOG_T[bad][0]))
            raise InvalidGeneratorError(
                f"generator {name!r} fails finiteness: {label}(t) is not finite at t = {t_bad:.6g}"
            )
    steps = fp_vals[1:] - fp_vals[:-1]
    tol = CONVEXITY_RTOL * (1.0 + fp_vals[1:].abs())
    bad = steps < -tol
    if bool(bad.any()):
        i = int(torch.nonzero(bad)[0])
        t_bad = math.exp(float(GRID_LOG_T[i + 1]))
        raise InvalidGeneratorError(
            f"generator {name!r} fails convexity: f' decreases near t = {t_bad:.6g} "
            f"(f'({math.exp(float(GRID_LOG_T[i])):.6g}) = {float(fp_vals[i]):.6g} > "
            f"f'({t_bad:.6g}) = {float(fp_vals[i + 1]):.6g}); an f-divergence generator must be convex"
        )


def limit_f_prime_at_infinity(div: Divergence) -> float:
    r""":math:`\lim_{t\to\infty} f'(t)`, from f' at :math:`t = e^{20}, e^{30}, e^{40}`.

    Convergence (successive values agreeing to 1e-6 relative) gives the last value; a still
    increasing f' (convex f has non-decreasing f') gives ``math.inf``.
    """
    log_ts = torch.tensor([20.0, 30.0, 40.0], dtype=torch.float64)
    vals = [float(v) for v in div._f_prime(log_ts)]
    if not all(math.isfinite(v) for v in vals):
        return math.inf
    if abs(vals[2] - vals[1]) <= 1e-6 * (1.0 + abs(vals[2])):
        return vals[2]
    return math.inf
