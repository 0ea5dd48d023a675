"""Seaborn plots of runs: Pareto fronts and training curves, saved as PNG/PDF when given a path."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files, not windows: works on headless machines and in CI
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402
import seaborn as sns  # noqa: E402

from analysis.pareto import pareto_frontier  # noqa: E402


def plot_pareto(points: pd.DataFrame, x: str = "kl_pi_a", y: str = "score/reward", hue: str = "divergence",
                path: str | Path | None = None, title: str | None = None):
    """Scatter of runs (one point each) with the Pareto frontier of each ``hue`` group drawn as a line."""
    fig, ax = plt.subplots(figsize=(6, 4.5))
    sns.scatterplot(data=points, x=x, y=y, hue=hue if hue in points else None, style=hue if hue in points else None,
                    s=70, ax=ax)
    groups = points.groupby(hue) if hue in points else [(None, points)]
    for _, group in groups:
        front = pareto_frontier(group, x=x, y=y)
        ax.plot(front[x], front[y], alpha=0.6, linewidth=1.2)
    ax.set_xlabel("KL(π‖a)" if x == "kl_pi_a" else x)
    ax.set_ylabel(y.removeprefix("score/"))
    ax.set_title(title or "alignment against divergence from the base model")
    fig.tight_layout()
    if path is not None:
        fig.savefig(path, dpi=130)
    return fig


def plot_training_curves(metrics: pd.DataFrame, columns: Sequence[str] = ("score/reward", "kl_pi_a", "d_f"),
                         hue: str = "run", path: str | Path | None = None):
    """One panel per metric against the step, one line per ``hue`` value."""
    present = [c for c in columns if c in metrics]
    if not present:
        raise KeyError(f"none of {list(columns)} is in the metrics; available: {sorted(metrics.columns)}")
    fig, axes = plt.subplots(1, len(present), figsize=(4.2 * len(present), 3.6), squeeze=False)
    for ax, column in zip(axes[0], present):
        sns.lineplot(data=metrics, x="step", y=column, hue=hue if hue in metrics else None, ax=ax)
        ax.set_title(column)
    fig.tight_layout()
    if path is not None:
        fig.savefig(path, dpi=130)
    return fig
