r"""Pareto frontiers: alignment score against divergence from the base model, with their uncertainty.

A run's point is the mean of its last few logged steps with a standard error (``final_points``); runs that
differ only in the seed are pooled into one point per setting (``seed_points``); a point is on the frontier
when no other point has both a higher (or equal) score and a lower (or equal) divergence, one of them
strictly (``pareto_frontier``) — the trade-off curves of Go et al. (2023, Fig. 2).

Every metric ``m`` of a points table comes with ``m_se``, its standard error, and every row says what it rests
on: ``n_steps`` (logged steps behind it) and ``n_runs`` (runs behind it).
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from analysis.runs import SETTING_COLUMNS

#: Columns of a points table that describe the point rather than measure the policy (never averaged as metrics).
BOOKKEEPING_COLUMNS = ("final_step", "n_steps", "n_runs")
#: Columns that tell repetitions of one setting apart; ``seed_points`` pools over them.
REPLICATE_COLUMNS = ("seed", "run")


def _metric_columns(frame: pd.DataFrame, exclude: tuple[str, ...]) -> tuple[list[str], set[str]]:
    """The numeric metrics of ``frame``, and those among them that are the standard error of another (``m_se``)."""
    numeric = [c for c in frame.select_dtypes("number").columns if c not in exclude]
    errors = {c for c in numeric if c.endswith("_se") and c.removesuffix("_se") in numeric}
    return [c for c in numeric if c not in errors], errors


def final_points(metrics: pd.DataFrame, last: int = 5) -> pd.DataFrame:
    r"""One row per run: every numeric metric ``m`` averaged over the run's ``last`` logged steps, its standard
    error ``m_se``, the settings, ``final_step``, ``n_steps`` (steps in that window) and ``n_runs`` (1).

    The estimator of ``m_se``: the sample standard deviation (ddof=1) of ``m`` over the steps of the window where
    ``m`` is logged, divided by :math:`\sqrt{k}`, k those steps. It treats the steps as independent draws around
    the point (each step scores a fresh batch); on a curve still moving within the window it also counts that
    drift, and it does not correct for the correlation of consecutive steps. NaN where ``m`` is logged once.

    Where the run logs a per-step standard error ``m_se`` beside ``m`` (``kl_pi_a_exact_se``: the standard error
    of the step's batch mean), ``m_se`` is instead the standard error of the mean of the k batch means,
    :math:`\sqrt{\sum_i se_i^2} / k`: defined from one logged step (the exact KL is logged every few steps), and
    the mean of the logged ``m_se`` is not reported (the column keeps one meaning: the point's standard error).
    """
    if last < 1:
        raise ValueError(f"last must be a positive number of steps, got {last}")
    tail = metrics.sort_values("step", kind="stable").groupby("run", sort=False).tail(last)
    names, logged_errors = _metric_columns(tail, ("step", *SETTING_COLUMNS, *BOOKKEEPING_COLUMNS))
    grouped = tail.groupby("run", sort=False)
    means = grouped[names].mean()
    counts = grouped[names].count()
    errors = grouped[names].std(ddof=1) / np.sqrt(counts)
    for error in logged_errors:
        name = error.removesuffix("_se")
        squares = (tail[error] ** 2).groupby(tail["run"], sort=False)
        errors[name] = np.sqrt(squares.sum(min_count=1)) / squares.count()
    columns = {}
    for name in names:
        columns[name] = means[name]
        columns[f"{name}_se"] = errors[name]
    settings = grouped[[c for c in SETTING_COLUMNS if c in tail]].first()
    steps = grouped["step"].max().rename("final_step")
    size = grouped.size()
    bookkeeping = pd.DataFrame({"n_steps": size, "n_runs": pd.Series(1, index=size.index)})
    return pd.concat([settings, steps, bookkeeping, pd.DataFrame(columns)], axis=1).reset_index()


def seed_points(points: pd.DataFrame) -> pd.DataFrame:
    r"""One row per setting: the points (``final_points``) of runs that differ only in the seed, pooled.

    Runs are grouped by every setting column present except ``seed`` and ``run`` (a table without a ``seed``
    column is returned as it is: nothing says which of its rows repeat one setting) (``setting_id`` among them, a
    digest of the whole config but the seed and bookkeeping: runs that differ in a setting outside the columns
    stay apart). A group of one run is returned unchanged, its ``m_se`` over its last steps. A group of n > 1
    runs becomes one point: ``m`` is the mean of the runs' ``m`` (over those where it is logged) and ``m_se`` the
    standard error over seeds, the sample standard deviation (ddof=1) of the runs' ``m`` divided by
    :math:`\sqrt{n}`. That seed-to-seed spread already contains each run's within-run noise, so the runs' own
    ``m_se`` are not added in. ``n_runs`` is n, ``n_steps`` the steps of all its runs, ``final_step`` the
    smallest (no run of the point is shorter), ``run`` and ``seed`` the runs' values joined by ``+``.
    """
    out = points.copy()
    if "n_runs" not in out:
        out["n_runs"] = 1
    keys = [c for c in SETTING_COLUMNS if c in out and c not in REPLICATE_COLUMNS]
    if "seed" not in out or not keys or len(out) < 2:  # without seeds nothing says which rows are repetitions
        return out.reset_index(drop=True)
    names, _ = _metric_columns(out, (*SETTING_COLUMNS, *BOOKKEEPING_COLUMNS))
    columns = list(out.columns) + [f"{n}_se" for n in names if f"{n}_se" not in out]
    rows = []
    for _, group in out.groupby(keys, dropna=False, sort=False):
        row = group.iloc[0].to_dict()
        if len(group) > 1:
            for name in names:
                values = group[name].dropna()
                row[name] = values.mean() if len(values) else np.nan
                row[f"{name}_se"] = values.std(ddof=1) / np.sqrt(len(values)) if len(values) > 1 else np.nan
            for column in REPLICATE_COLUMNS:
                if column in group:
                    row[column] = "+".join(str(v) for v in group[column])
            row["n_runs"] = int(group["n_runs"].sum())
            if "n_steps" in group:
                row["n_steps"] = int(group["n_steps"].sum())
            if "final_step" in group:
                row["final_step"] = group["final_step"].min()
        rows.append(row)
    return pd.DataFrame.from_records(rows, columns=columns)


def pareto_frontier(points: pd.DataFrame, x: str = "kl_pi_a", y: str = "score/reward",
                    maximize_y: bool = True, minimize_x: bool = True) -> pd.DataFrame:
    """The non-dominated rows of ``points`` (low ``x``, high ``y`` by default), sorted by ``x``."""
    for column in (x, y):
        if column not in points:
            raise KeyError(f"column {column!r} not in the points; available: {sorted(points.columns)}")
    data = points.dropna(subset=[x, y])
    xs = data[x].to_numpy() * (1 if minimize_x else -1)
    ys = data[y].to_numpy() * (1 if maximize_y else -1)
    keep = np.ones(len(data), dtype=bool)  # an array, not a list: data[[]] would select no columns
    for i in range(len(data)):
        keep[i] = not ((xs <= xs[i]) & (ys >= ys[i]) & ((xs < xs[i]) | (ys > ys[i]))).any()
    return data[keep].sort_values(x)
