r"""Verdicts on a frontier: do two arms differ in reward at matched KL by more than their combined standard error?

Each arm (a divergence, PPO, DPO, Best-of-n) is one or more points :math:`(k_i \pm s_{k_i}, r_i \pm s_{r_i})` of
evaluated :math:`KL(\pi\|a)` and reward, and every arm starts at the base model :math:`(0, r_0 \pm s_{r_0})`. Two
arms rarely sit at the same KL, so an arm's reward at a KL :math:`k` it did not reach exactly is read off its own
curve, interpolated (never extrapolated) between its bracketing points, the base included, linearly in
:math:`\sqrt{k}`:

.. math::  \hat r_A(k) = r_{lo} + (r_{hi} - r_{lo})\,\frac{\sqrt{k} - \sqrt{k_{lo}}}{\sqrt{k_{hi}} - \sqrt{k_{lo}}}.

Why :math:`\sqrt{k}`: near the base model the reward gained by the best policy at a KL budget :math:`k` grows
like :math:`\sqrt{2k\,\mathrm{Var}_a(r)}` (the KL-regularised optimum :math:`a\,e^{r/\beta}` at large
:math:`\beta`; Best-of-n's curve has the same shape), so a straight line in :math:`\sqrt k` is the natural
chord; ``scale="linear"`` interpolates in :math:`k` instead (a chord of a concave curve: it under-reads the arm
between its points), a check that the verdict does not hang on the choice.

A pair :math:`(A, B)` is compared at :math:`k^* = \min(\max_i k_{A,i}, \max_i k_{B,i})`, the largest KL both
arms reached: :math:`d = \hat r_A(k^*) - \hat r_B(k^*)`. Its standard error is the delta method over every
measured mean the two readings depend on (the points' rewards and KLs, the base reward counted once though both
arms use it; :math:`k^*`, the place of the comparison, held fixed), independent errors assumed:
:math:`s_d^2 = \sum_j (\partial d/\partial \theta_j)^2 s_{\theta_j}^2`, the gradient taken by autograd in float64.
The pair *differs* when :math:`|d| > z\,s_d` (``z = 2`` by default, a two-sided 5% test for each pair; with many
pairs some will cross by chance, so the table also gives :math:`d / s_d` for the reader's own threshold), and
is a *tie* otherwise: a tie is an answer when :math:`s_d` is small against the rewards the arms gained.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import pandas as pd
import torch

SCALES = ("sqrt", "linear")


@dataclass(frozen=True)
class Point:
    """One evaluated point of an arm: KL and reward, each with its standard error."""

    kl: float
    reward: float
    kl_se: float = 0.0
    reward_se: float = 0.0

    def __post_init__(self) -> None:
        for name in ("kl", "reward", "kl_se", "reward_se"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"Point.{name} must be a finite number, got {value!r}")
        if self.kl_se < 0 or self.reward_se < 0:
            raise ValueError(f"standard errors must be >= 0, got kl_se={self.kl_se}, reward_se={self.reward_se}")
        if self.kl < 0:
            raise ValueError(f"Point.kl is a KL divergence, >= 0; got {self.kl} (a negative sample estimate: use the "
                             f"exact per-token KL, kl_pi_a_exact)")


@dataclass(frozen=True)
class Comparison:
    """Arms ``a`` and ``b`` at the matched KL ``kl``: their rewards there, the difference ``a - b`` with its
    standard error, ``z = difference / se`` and the ``verdict`` (``"a > b"``, ``"a < b"`` or ``"tie"``)."""

    a: str
    b: str
    kl: float
    reward_a: float
    reward_b: float
    difference: float
    se: float
    z: float
    verdict: str


def _interpolate(kls: torch.Tensor, rewards: torch.Tensor, k: float, scale: str) -> torch.Tensor:
    """The arm's reward at ``k`` on the chord between its bracketing points (sorted by KL, base first)."""
    transform = torch.sqrt if scale == "sqrt" else (lambda t: t)
    order = torch.argsort(kls.detach())
    kls, rewards = kls[order], rewards[order]
    top = float(kls[-1].detach())
    if k > top + 1e-12:
        raise ValueError(f"KL {k} is beyond the arm's largest KL {top}: never extrapolated")
    hi = int(torch.searchsorted(kls.detach(), torch.tensor(k, dtype=kls.dtype)).clamp(1, len(kls) - 1))
    lo = hi - 1
    x, x_lo, x_hi = transform(torch.tensor(k, dtype=kls.dtype)), transform(kls[lo]), transform(kls[hi])
    if float((x_hi - x_lo).detach()) == 0.0:
        return rewards[hi]
    return rewards[lo] + (rewards[hi] - rewards[lo]) * (x - x_lo) / (x_hi - x_lo)


def compare_arms(arms: Mapping[str, Sequence[Point]], base: Point, z: float = 2.0, scale: str = "sqrt"
                 ) -> list[Comparison]:
    r"""Every pair of ``arms`` (name -> its points) compared at matched KL (module docstring), in the order given.

    ``base`` is the base model's point (its KL is 0 by definition; only its reward and reward s.e. are used)."""
    if scale not in SCALES:
        raise ValueError(f"scale must be one of {SCALES}, got {scale!r}")
    if z <= 0:
        raise ValueError(f"z must be positive, got {z}")
    for name, points in arms.items():
        if not points:
            raise ValueError(f"arm {name!r} has no points")
        if max(p.kl for p in points) <= 0:
            raise ValueError(f"arm {name!r} never left the base model (KL 0): nothing to compare")
    out = []
    for a, b in itertools.combinations(list(arms), 2):
        k = min(max(p.kl for p in arms[a]), max(p.kl for p in arms[b]))
        # every measured mean the difference depends on, and its standard error
        theta = [base.reward]
        se = [base.reward_se]
        index = {}
        for name in (a, b):
            index[name] = len(theta)
            for p in arms[name]:
                theta += [p.kl, p.reward]
                se += [p.kl_se, p.reward_se]
        values = torch.tensor(theta, dtype=torch.float64, requires_grad=True)

        def reading(name: str, values=values, index=index, k=k) -> torch.Tensor:
            n, start = len(arms[name]), index[name]
            kls = torch.cat([torch.zeros(1, dtype=torch.float64), values[start:start + 2 * n:2]])
            rewards = torch.cat([values[:1], values[start + 1:start + 2 * n:2]])
            return _interpolate(kls, rewards, k, scale)

        reward_a, reward_b = reading(a), reading(b)
        difference = reward_a - reward_b
        (gradient,) = torch.autograd.grad(difference, values)
        s = float((gradient ** 2 * torch.tensor(se, dtype=torch.float64) ** 2).sum().sqrt())
        d = float(difference.detach())
        ratio = d / s if s > 0 else (math.inf if d > 0 else -math.inf if d < 0 else 0.0)
        verdict = "tie" if abs(ratio) <= z else (f"{a} > {b}" if d > 0 else f"{a} < {b}")
        out.append(Comparison(a, b, k, float(reward_a.detach()), float(reward_b.detach()), d, s, ratio, verdict))
    return out


@dataclass(frozen=True)
class SqrtFit:
    r"""An arm's one-parameter frontier :math:`r(k) = r_0 + c\sqrt{k}` fitted through its runs' points (the base
    model's reward :math:`r_0` fixed): ``c`` with its standard error ``se``, the larger of ``se_eval`` (the points'
    own evaluation errors, propagated) and ``se_residual`` (their scatter around the curve, training noise
    included; NaN from one point), ``n`` points."""

    name: str
    c: float
    se: float
    se_eval: float
    se_residual: float
    n: int


def fit_sqrt_curve(name: str, points: Sequence[Point], base: Point) -> SqrtFit:
    r"""Least squares of :math:`r_i - r_0 = c\sqrt{k_i}` over an arm's points (every run of every seed: seeds that
    land at different KLs lie along the arm's curve, so their spread along it is not counted as noise):
    :math:`\hat c = \sum_i \sqrt{k_i}(r_i - r_0) / \sum_i k_i`. ``se_eval``: the delta method over the points'
    rewards and KLs; ``se_residual``: :math:`s/\sqrt{\sum_i k_i}`, :math:`s^2` the residuals' sum of squares over
    :math:`n - 1`."""
    ks = torch.tensor([p.kl for p in points], dtype=torch.float64)
    if float(ks.sum()) <= 0:
        raise ValueError(f"arm {name!r} never left the base model (KL 0): no curve to fit")
    values = torch.tensor([v for p in points for v in (p.kl, p.reward)], dtype=torch.float64, requires_grad=True)
    k, r = values[0::2], values[1::2]
    c = (k.sqrt() * (r - base.reward)).sum() / k.sum()
    (gradient,) = torch.autograd.grad(c, values)
    se = torch.tensor([v for p in points for v in (p.kl_se, p.reward_se)], dtype=torch.float64)
    se_eval = float((gradient ** 2 * se ** 2).sum().sqrt())
    c = float(c.detach())
    n = len(points)
    if n > 1:
        residuals = (r.detach() - base.reward) - c * ks.sqrt()
        se_residual = float(((residuals ** 2).sum() / (n - 1) / ks.sum()).sqrt())
    else:
        se_residual = float("nan")
    return SqrtFit(name, c, max(se_eval, se_residual) if n > 1 else se_eval, se_eval, se_residual, n)


def compare_sqrt_fits(arms: Mapping[str, Sequence[Point]], base: Point, kl: float = 1.0, z: float = 2.0
                      ) -> tuple[list[SqrtFit], list[Comparison]]:
    r"""Every pair of arms compared on their fitted curves (:func:`fit_sqrt_curve`): at any matched KL :math:`k`
    the reward difference is :math:`(c_A - c_B)\sqrt{k}`, so the verdict does not depend on :math:`k`; the
    readings are given at ``kl``. The s.e. combines the two fits' and the base reward's (which enters both
    fits, with coefficients :math:`-\sum_i\sqrt{k_i}/\sum_i k_i`)."""
    fits = {name: fit_sqrt_curve(name, points, base) for name, points in arms.items()}

    def base_coefficient(points: Sequence[Point]) -> float:
        return -sum(math.sqrt(p.kl) for p in points) / sum(p.kl for p in points)

    out = []
    for a, b in itertools.combinations(list(arms), 2):
        fa, fb = fits[a], fits[b]
        root = math.sqrt(kl)
        d = (fa.c - fb.c) * root
        shared = (base_coefficient(arms[a]) - base_coefficient(arms[b])) * base.reward_se
        s = math.sqrt(fa.se ** 2 + fb.se ** 2 + shared ** 2) * root
        ratio = d / s if s > 0 else (math.inf if d > 0 else -math.inf if d < 0 else 0.0)
        verdict = "tie" if abs(ratio) <= z else (f"{a} > {b}" if d > 0 else f"{a} < {b}")
        out.append(Comparison(a, b, kl, base.reward + fa.c * root, base.reward + fb.c * root, d, s, ratio, verdict))
    return list(fits.values()), out


def comparisons_frame(comparisons: Sequence[Comparison]) -> pd.DataFrame:
    """The comparisons as a table, one row per pair."""
    return pd.DataFrame([vars(c) for c in comparisons])


def arms_from_points(points: pd.DataFrame, arm: str = "arm", x: str = "kl_pi_a_exact", y: str = "score/reward"
                     ) -> dict[str, list[Point]]:
    """``{arm: [Point, ...]}`` from a points table (one row per point, ``x``/``y`` with ``x_se``/``y_se``)."""
    missing = [c for c in (arm, x, y) if c not in points]
    if missing:
        raise KeyError(f"columns {missing} not in the points; available: {sorted(points.columns)}")
    arms: dict[str, list[Point]] = {}
    def se(row: pd.Series, column: str) -> float:
        value = row.get(f"{column}_se")
        return float(value) if value is not None and not pd.isna(value) else 0.0

    for _, row in points.iterrows():
        arms.setdefault(str(row[arm]), []).append(Point(max(float(row[x]), 0.0), float(row[y]), se(row, x),
                                                        se(row, y)))
    return arms


def pool_seeds(points: pd.DataFrame, keys: Sequence[str], metrics: Sequence[str]) -> pd.DataFrame:
    r"""One row per value of ``keys`` (an arm; its runs differ in the seed): each of ``metrics`` averaged over the
    runs, with ``n_runs`` and three standard errors.

    ``m_se_seeds``: the std over the runs (ddof=1) / :math:`\sqrt n`, training and evaluation noise together, but
    from 2 seeds itself very uncertain (one degree of freedom); ``m_se_eval``: the runs' own evaluation errors
    combined, :math:`\sqrt{\sum_i s_i^2}/n`, evaluation noise only; ``m_se``, the one the verdict uses: the larger
    of the two (of one run: its evaluation s.e.)."""
    import numpy as np

    keys = [k for k in keys if k in points]
    rows = []
    for key, group in points.groupby(keys, dropna=False, sort=False):
        row: dict[str, Any] = dict(zip(keys, key if isinstance(key, tuple) else (key,)))
        row["n_runs"] = len(group)
        for m in metrics:
            if m not in group:
                continue
            values = group[m].astype(float).dropna()
            n = len(values)
            seeds = float(values.std(ddof=1) / math.sqrt(n)) if n > 1 else float("nan")
            own = group.loc[values.index, f"{m}_se"].astype(float) if f"{m}_se" in group else None
            within = float(math.sqrt((own ** 2).sum()) / n) if own is not None and n else float("nan")
            row[m] = float(values.mean()) if n else float("nan")
            row[f"{m}_se_seeds"], row[f"{m}_se_eval"] = seeds, within
            row[f"{m}_se"] = float(np.nanmax([seeds, within])) if not (math.isnan(seeds) and math.isnan(within)) \
                else float("nan")
        rows.append(row)
    return pd.DataFrame(rows)


def near_frontier(arms: Mapping[str, Sequence[Point]], base: Point, name: str, z: float = 2.0,
                  scale: str = "sqrt") -> tuple[bool, list[Comparison]]:
    """Whether arm ``name`` is at or near the frontier: no other arm beats it at matched KL by more than ``z``
    combined standard errors. Returns the answer and the comparisons of ``name`` against each other arm."""
    if name not in arms:
        raise KeyError(f"arm {name!r} not among {sorted(arms)}")
    rows = [c for c in compare_arms(arms, base, z, scale) if name in (c.a, c.b)]
    beaten = [c for c in rows if c.verdict == (f"{c.a} < {c.b}" if c.a == name else f"{c.a} > {c.b}")]
    return not beaten, rows
