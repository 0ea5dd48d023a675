r"""Pareto frontiers: alignment score against divergence from the base model.

A run's point is the mean of its last few logged steps (``final_points``); a point is on the frontier
when no other point has both a higher (or equal) score and a lower (or equal) divergence, one of them
strictly (``pareto_frontier``) — the trade-off curves of Go et al. (2023, Fig. 2).
"""

from __future__ import annotations

import pandas as pd

from analysis.runs import SETTING_COLUMNS


def final_points(metrics: pd.DataFrame, last: int = 5) -> pd.DataFrame:
    """One row per run: the mean of every numeric metric over its ``last`` logged steps, plus settings."""
    if last < 1:
        raise ValueError(f"last must be a positive number of steps, got {last}")
    tail = metrics.sort_values("step").groupby("run", sort=False).tail(last)
    numeric = tail.select_dtypes("number").columns.difference(["step", *SETTING_COLUMNS])
    means = tail.groupby("run", sort=False)[list(numeric)].mean()
    settings = tail.groupby("run", sort=False)[[c for c in SETTING_COLUMNS if c in tail]].first()
    steps = tail.groupby("run", sort=False)["step"].max().rename("final_step")
    return pd.concat([settings, steps, means], axis=1).reset_index()


def pareto_frontier(points: pd.DataFrame, x: str = "kl_pi_a", y: str = "score/reward",
                    maximize_y: bool = True, minimize_x: bool = True) -> pd.DataFrame:
    """The non-dominated rows of ``points`` (low ``x``, high ``y`` by default), sorted by ``x``."""
    for column in (x, y):
        if column not in points:
            raise KeyError(f"column {column!r} not in the points; available: {sorted(points.columns)}")
    data = points.dropna(subset=[x, y])
    xs = data[x].to_numpy() * (1 if minimize_x else -1)
    ys = data[y].to_numpy() * (1 if maximize_y else -1)
    keep = []
    for i in range(len(data)):
        dominated = ((xs <= xs[i]) & (ys >= ys[i]) & ((xs < xs[i]) | (ys > ys[i]))).any()
        keep.append(not dominated)
    return data[keep].sort_values(x)
