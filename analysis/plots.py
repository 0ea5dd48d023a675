"""Plots of runs: Pareto fronts and training curves, saved as PNG/PDF when given a path.

Colours: one palette per report. :func:`hue_palette` gives each value of the grouping column (``method`` by
default: ``f-DPG rkl``, ``PPO``) one colour, in sorted order; pass the same dict as ``palette=`` to every figure
and a method has one colour everywhere, in its points, error bars, frontier line, curves, bands and legend entry.
Axis labels come from :func:`metric_label` (``kl_pi_a`` -> ``KL(π‖a)``).
"""

from __future__ import annotations

import numbers
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files, not windows: works on headless machines and in CI
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import seaborn as sns  # noqa: E402

from analysis.pareto import REPLICATE_COLUMNS, pareto_frontier, seed_points  # noqa: E402
from analysis.runs import SETTING_COLUMNS  # noqa: E402

#: Plain-words axis labels of the metrics every algorithm logs; ``score/<name>`` becomes ``<name>`` (see
#: :func:`metric_label`).
METRIC_LABELS = {
    "kl_pi_a": "KL(π‖a)",
    "kl_pi_a_exact": "KL(π‖a), exact per token",
    "kl_p_pi": "KL(p‖π)",
    "d_f": "D_f(π‖p)",
    "entropy": "entropy (nats)",
    "entropy_exact": "entropy (nats), exact per token",
    "score/reward": "reward",
    "log_z": "log Z",
}
#: Marker of the i-th value of a palette (the same value keeps its marker wherever the palette is shared).
MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*", "<", ">")
#: Grouping columns under which every run is its own group (no pooling over seeds).
PER_RUN = REPLICATE_COLUMNS
#: The label of rows whose grouping value is missing.
MISSING = "n/a"


def metric_label(name: str) -> str:
    """The axis label of a metric in plain words: ``KL(π‖a)`` for ``kl_pi_a``, ``toxicity score`` for
    ``score/toxicity_score``, the name itself for anything unknown."""
    if name in METRIC_LABELS:
        return METRIC_LABELS[name]
    if name.startswith("score/"):
        return name.removeprefix("score/").replace("_", " ")
    return name


def _sort_key(value) -> tuple:
    if isinstance(value, numbers.Number) and not isinstance(value, bool):
        return (0, float(value), "")
    return (1, 0.0, str(value))


def _hue_values(frame: pd.DataFrame, hue: str | None) -> pd.Series:
    """The grouping value of every row (``None`` for all rows when there is no such column; missing -> "n/a")."""
    if hue is None or hue not in frame:
        return pd.Series([None] * len(frame), index=frame.index, dtype=object)
    values = frame[hue].astype(object)
    return values.where(values.notna(), MISSING)


def hue_palette(values: Iterable, palette: str | Sequence | None = None) -> dict:
    """One colour (an RGB tuple) per distinct value, keyed in sorted order: the hue order of every figure.

    Sorted rather than in order of appearance, so the same runs get the same colours whatever order they were
    loaded in, in every figure and report. ``palette``: a seaborn palette name or a list of colours (default
    ``colorblind`` up to 10 values, ``husl`` beyond). Missing values are keyed ``"n/a"``.
    """
    distinct = {MISSING if pd.isna(v) else v for v in values}
    keys = sorted(distinct, key=_sort_key)
    if palette is None:
        palette = "colorblind" if len(keys) <= 10 else "husl"
    colours = sns.color_palette(palette, n_colors=max(len(keys), 1))
    return {key: tuple(float(c) for c in colour) for key, colour in zip(keys, colours)}


def _resolve_palette(values: pd.Series, palette: Mapping | None) -> dict:
    if palette is None:
        return hue_palette(values) if values.notna().any() else {None: sns.color_palette("colorblind")[0]}
    palette = dict(palette)
    missing = [v for v in pd.unique(values) if v not in palette]
    if missing and not (len(missing) == 1 and missing[0] is None):
        raise KeyError(f"the palette has no colour for {missing}: build it with hue_palette() over all the values")
    if missing:  # no grouping column: one group, the palette's first colour
        palette[None] = next(iter(palette.values()), sns.color_palette("colorblind")[0])
    return palette


def _groups(frame: pd.DataFrame, hue: str | None, palette: dict) -> list[tuple[object, pd.DataFrame]]:
    """(value, rows) of each group present, in the palette's order."""
    values = _hue_values(frame, hue)
    return [(key, frame[values == key] if key is not None else frame)
            for key in palette if (values == key).any() or (key is None and values.isna().all() and len(frame))]


def _marker(palette: dict, key) -> str:
    return MARKERS[list(palette).index(key) % len(MARKERS)]


def plot_pareto(points: pd.DataFrame, x: str = "kl_pi_a", y: str = "score/reward", hue: str = "method",
                path: str | Path | None = None, title: str | None = None, palette: Mapping | None = None,
                seeds: bool = True, errorbars: bool = True):
    """One point per setting with ±1 standard-error bars in ``x`` and ``y``, and the Pareto frontier of each
    ``hue`` group drawn through the points' means, all of a group in its palette colour.

    ``points``: ``final_points`` (or ``seed_points``). With ``seeds``, runs that differ only in the seed are first
    pooled by :func:`analysis.pareto.seed_points` (bars over seeds; a lone run's bars are over its last steps),
    unless ``hue`` is ``run`` or ``seed``. The bars read the ``<x>_se`` and ``<y>_se`` columns. ``palette``: from
    :func:`hue_palette`, shared with the report's other figures (default: built from these points).
    """
    data = seed_points(points) if seeds and hue not in PER_RUN else points
    values = _hue_values(data, hue)
    palette = _resolve_palette(values, palette)
    fig, ax = plt.subplots(figsize=(6.4, 4.6))
    drew_bars = False
    for key, group in _groups(data, hue, palette):
        colour = palette[key]
        label = str(key) if key is not None else None
        ax.scatter(group[x], group[y], color=colour, marker=_marker(palette, key), s=60, edgecolors="white",
                   linewidths=0.6, label=label, zorder=3)
        errors = {axis: np.nan_to_num(group[f"{c}_se"].to_numpy(dtype=float)) if f"{c}_se" in group else None
                  for axis, c in (("xerr", x), ("yerr", y))}
        if errorbars and any(e is not None and e.any() for e in errors.values()):
            ax.errorbar(group[x], group[y], fmt="none", ecolor=colour, elinewidth=1.0, alpha=0.8, zorder=2,
                        **errors)
            drew_bars = True
        front = pareto_frontier(group, x=x, y=y)
        ax.plot(front[x], front[y], color=colour, alpha=0.7, linewidth=1.4, zorder=1)
    ax.set_xlabel(metric_label(x))
    ax.set_ylabel(metric_label(y))
    ax.set_title(title or "alignment against divergence from the base model")
    if hue in data:
        ax.legend(title=f"{hue}" + ("  (bars: ±1 s.e.)" if drew_bars else ""), fontsize=8, title_fontsize=8)
    fig.tight_layout()
    if path is not None:
        fig.savefig(path, dpi=130)
    return fig


def smooth(steps: Sequence[float], values: Sequence[float], smoothing: float = 0.8) -> np.ndarray:
    r"""Exponential moving average over the steps, debiased:
    :math:`s_t = \sum_{i \le t} w^{t - i} x_i / \sum_{i \le t} w^{t - i}` with :math:`w` = ``smoothing`` and
    :math:`t - i` counted in steps, so a metric logged every few steps (``kl_pi_a_exact``) is smoothed over the
    same span of training as one logged every step. ``smoothing=0`` returns the values.

    Why an EMA: it is causal (the curve at step t uses steps up to t only, so it never shows a trend before it
    happens and its last value is what the run has reached), defined from the first step (no window edge to drop),
    and the smoothing TensorBoard and W&B users read. The default 0.8 divides white batch noise's standard
    deviation by 3 (variance ratio (1 - w)/(1 + w) = 1/9) at a lag of w/(1 - w) = 4 steps, a tenth of the
    40-step demo: a 16-sample batch's noise no longer hides the trend, and the trend is not delayed much.
    """
    if not 0 <= smoothing < 1:
        raise ValueError(f"smoothing must be in [0, 1), got {smoothing}")
    steps = np.asarray(steps, dtype=float)
    values = np.asarray(values, dtype=float)
    out = np.empty_like(values)
    numerator = denominator = 0.0
    for i, (step, value) in enumerate(zip(steps, values)):
        decay = smoothing ** (step - steps[i - 1]) if i else 0.0
        numerator = decay * numerator + value
        denominator = decay * denominator + 1.0
        out[i] = numerator / denominator
    return out


def _units(metrics: pd.DataFrame, hue: str | None) -> list[str]:
    """The columns whose values make one curve: the hue and every setting but the seed (runs of one curve differ
    only in the seed); the run itself when grouping by run or seed."""
    if hue in PER_RUN or not any(c in metrics for c in SETTING_COLUMNS if c not in REPLICATE_COLUMNS):
        return ["run"]
    return [c for c in SETTING_COLUMNS if c in metrics and c not in REPLICATE_COLUMNS]


def plot_training_curves(metrics: pd.DataFrame, columns: Sequence[str] = ("score/reward", "kl_pi_a", "d_f"),
                         hue: str = "method", path: str | Path | None = None, palette: Mapping | None = None,
                         smoothing: float = 0.8, raw_alpha: float = 0.25, x: str = "step"):
    """One panel per metric against the step (or a column ``x`` that grows with it, e.g. ``samples_seen``; the
    smoothing still counts steps): each run's raw values drawn faintly (``raw_alpha``), over them the
    :func:`smooth`-ed curve (EMA, ``smoothing``) of each setting, in its ``hue`` colour (``palette``, shared with
    the report's other figures). Where several runs differ only in the seed, the curve is the mean over seeds of
    their smoothed values with a band of ±1 standard error over seeds (std ddof=1 / sqrt(runs at that step)).
    Metrics that are missing or never logged are left out.
    """
    present = [c for c in columns if c in metrics and pd.to_numeric(metrics[c], errors="coerce").notna().any()]
    if not present:
        raise KeyError(f"none of {list(columns)} is in the metrics; available: {sorted(metrics.columns)}")
    values = _hue_values(metrics, hue)
    palette = _resolve_palette(values, palette)
    units = _units(metrics, hue)
    fig, axes = plt.subplots(1, len(present), figsize=(4.2 * len(present), 3.6), squeeze=False)
    for ax, column in zip(axes[0], present):
        for key, group in _groups(metrics, hue, palette):
            colour, labelled = palette[key], False
            for _, unit in group.groupby(units, dropna=False, sort=False):
                curves = []
                for _, run in unit.groupby("run", sort=False):
                    wanted = list(dict.fromkeys(["step", x, column]))
                    logged = run[wanted].apply(pd.to_numeric, errors="coerce").dropna().sort_values("step")
                    if logged.empty:
                        continue
                    ax.plot(logged[x], logged[column], color=colour, alpha=raw_alpha, linewidth=0.8)
                    # smoothed over steps (its span does not depend on x), drawn at x
                    curves.append(pd.Series(smooth(logged["step"], logged[column], smoothing),
                                            index=logged[x].to_numpy()))
                if not curves:
                    continue
                label = str(key) if key is not None and not labelled else "_nolegend_"
                labelled = True
                if len(curves) == 1:
                    ax.plot(curves[0].index, curves[0].to_numpy(), color=colour, linewidth=1.8, label=label)
                    continue
                stacked = pd.concat(curves, axis=1).sort_index()
                mean = stacked.mean(axis=1)
                se = stacked.std(axis=1, ddof=1) / np.sqrt(stacked.count(axis=1))
                ax.plot(mean.index, mean.to_numpy(), color=colour, linewidth=1.8, label=label)
                ax.fill_between(mean.index, mean - se, mean + se, color=colour, alpha=0.2, linewidth=0)
        ax.set_xlabel(x.replace("_", " "))
        ax.set_ylabel(metric_label(column))
    if hue in metrics:
        axes[0][0].legend(title=hue, fontsize=8, title_fontsize=8)
    fig.tight_layout()
    if path is not None:
        fig.savefig(path, dpi=130)
    return fig


def plot_pseudo_rewards(divergences: Iterable, path: str | Path | None = None,
                        t_range: tuple[float, float] = (1e-2, 1e2), ylim: tuple[float, float] = (-5.0, 5.0),
                        colours: Mapping | None = None, points: int = 401):
    r"""The pseudo-reward :math:`-f'(t)` of each divergence against :math:`t = \pi(x)/p(x)` on a log axis (Go et al.
    2023, Fig. 17): what f-DPG rewards a sample with, given how over- (t > 1) or under-represented (t < 1) it is
    in the policy relative to the target. Computed from :mod:`objectives` (``get_divergence(name).f_prime`` on a
    grid of :math:`\log t`), not read from runs; each legend entry gives :math:`-f'(\infty)`, the pseudo-reward of
    a sample the target excludes (``-inf`` for reverse KL). ``divergences``: names (``rkl``, ``alpha:0.5``) or
    :class:`objectives.Divergence` objects; ``colours``: name -> colour (default: the colorblind palette);
    values beyond ``ylim`` are clipped by the axes."""
    import torch

    from objectives import get_divergence

    items = [get_divergence(d) if isinstance(d, str) else d for d in divergences]
    if not items:
        raise ValueError("no divergence to draw")
    log_t = torch.linspace(np.log(t_range[0]), np.log(t_range[1]), points, dtype=torch.float64)
    t = torch.exp(log_t).numpy()
    fallback = sns.color_palette("colorblind", n_colors=max(len(items), 1))
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    for i, divergence in enumerate(items):
        reward = (-divergence.f_prime(log_t)).numpy()
        limit = -divergence.f_prime_inf + 0.0  # + 0.0: no "-0"
        shown = "−∞" if limit == -np.inf else "∞" if limit == np.inf else f"{limit:.3g}".replace("-", "−")
        colour = (colours or {}).get(divergence.name, fallback[i % len(fallback)])
        ax.plot(t, reward, color=colour, linewidth=1.8, label=f"{divergence.name}   (−f′(∞) = {shown})")
    ax.axvline(1.0, color="0.6", linewidth=0.8, linestyle=":")
    ax.axhline(0.0, color="0.6", linewidth=0.8, linestyle=":")
    ax.set_xscale("log")
    ax.set_ylim(*ylim)
    ax.set_xlabel("t = π(x) / p(x)")
    ax.set_ylabel("pseudo-reward −f′(t)")
    ax.set_title("pseudo-reward of each divergence (Go et al. 2023, Fig. 17)")
    ax.legend(fontsize=8, title="divergence", title_fontsize=8)
    fig.tight_layout()
    if path is not None:
        fig.savefig(path, dpi=130)
    return fig
