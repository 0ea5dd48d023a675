"""analysis.plots: what the figures draw, read back from the matplotlib artists, not only that a file appears."""

from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import pytest
from matplotlib.collections import LineCollection, PathCollection, PolyCollection
from matplotlib.colors import to_rgb

from analysis import hue_palette, metric_label, plot_pareto, plot_training_curves, smooth


def rgb(colour) -> tuple[float, ...]:
    return tuple(round(c, 6) for c in to_rgb(colour))


def key(x, y) -> tuple[float, float]:
    return round(float(x), 9), round(float(y), 9)


def scatter_colours(ax) -> dict[tuple[float, float], tuple[float, ...]]:
    """(x, y) of every drawn point -> its face colour."""
    out = {}
    for collection in ax.collections:
        if isinstance(collection, PathCollection):
            faces = collection.get_facecolors()
            for i, (x, y) in enumerate(collection.get_offsets()):
                out[key(x, y)] = rgb(faces[i % len(faces)])
    return out


def drawn_lines(ax):
    return [line for line in ax.lines if line.get_linestyle() not in ("None", "none", "", " ")]


@pytest.fixture(autouse=True)
def close_figures():
    yield
    plt.close("all")


@pytest.fixture
def points() -> pd.DataFrame:
    """Three methods whose order of appearance (rkl, PPO, fkl) is not their sorted order (PPO, fkl, rkl)."""
    rows = [("f-DPG rkl", 0.2, 0.30), ("PPO", 0.4, 0.35), ("f-DPG fkl", 0.1, 0.10), ("f-DPG rkl", 0.9, 0.60),
            ("PPO", 1.5, 0.70), ("f-DPG fkl", 0.6, 0.25), ("f-DPG rkl", 1.2, 0.40)]  # the last is dominated
    frame = pd.DataFrame(rows, columns=["method", "kl_pi_a", "score/reward"])
    frame.insert(1, "beta", [0.1 * (i + 1) for i in range(len(frame))])
    frame.insert(0, "run", [f"r{i}" for i in range(len(frame))])
    return frame


def test_each_frontier_line_has_its_own_groups_colour(points) -> None:
    """The bug of issue 16: seaborn coloured the points in order of appearance, matplotlib the lines in sorted order."""
    fig = plot_pareto(points, x="kl_pi_a", y="score/reward", hue="method")
    ax = fig.axes[0]
    colours = scatter_colours(ax)
    by_method = {m: {colours[key(x, y)] for x, y in zip(g["kl_pi_a"], g["score/reward"])}
                 for m, g in points.groupby("method")}
    assert all(len(c) == 1 for c in by_method.values()), by_method  # one colour per method's points
    assert len({next(iter(c)) for c in by_method.values()}) == 3  # and three different colours
    lines = drawn_lines(ax)
    assert len(lines) == 3
    for line in lines:
        vertices = list(zip(line.get_xdata(), line.get_ydata()))
        assert len(vertices) >= 2
        for x, y in vertices:  # every vertex of a frontier is one of its group's points, in the same colour
            assert colours[key(x, y)] == rgb(line.get_color())


def test_a_shared_palette_colours_points_lines_legend_and_curves_alike(points) -> None:
    palette = hue_palette(["f-DPG tv", *points["method"]])  # a method that is in another figure of the report only
    assert list(palette) == ["PPO", "f-DPG fkl", "f-DPG rkl", "f-DPG tv"]  # sorted: independent of loading order
    assert hue_palette(reversed(list(palette))) == palette
    fig = plot_pareto(points, hue="method", palette=palette)
    ax = fig.axes[0]
    colours = scatter_colours(ax)
    for method, group in points.groupby("method"):
        assert {colours[key(x, y)] for x, y in zip(group["kl_pi_a"], group["score/reward"])} == {rgb(palette[method])}
    assert {rgb(line.get_color()) for line in drawn_lines(ax)} == {rgb(palette[m]) for m in points["method"]}
    legend = ax.get_legend()
    for text, handle in zip(legend.get_texts(), legend.legend_handles):
        assert rgb(handle.get_facecolor()[0]) == rgb(palette[text.get_text()])
    assert sorted(t.get_text() for t in legend.get_texts()) == sorted(points["method"].unique())

    metrics = pd.DataFrame({"run": ["a"] * 3 + ["b"] * 3, "method": ["PPO"] * 3 + ["f-DPG tv"] * 3,
                            "step": [1, 2, 3] * 2, "score/reward": [0.1, 0.2, 0.3, 0.3, 0.2, 0.1]})
    curves = plot_training_curves(metrics, columns=["score/reward"], hue="method", palette=palette)
    drawn = {rgb(line.get_color()) for line in curves.axes[0].lines}
    assert drawn == {rgb(palette["PPO"]), rgb(palette["f-DPG tv"])}
    with pytest.raises(KeyError, match="no colour"):
        plot_pareto(points, hue="method", palette={"PPO": "red"})


def test_error_bars_are_the_standard_errors_in_the_groups_colour(points) -> None:
    points = points.assign(**{"kl_pi_a_se": np.linspace(0.01, 0.07, len(points)),
                              "score/reward_se": np.linspace(0.02, 0.08, len(points))})
    palette = hue_palette(points["method"])
    ax = plot_pareto(points, hue="method", palette=palette).axes[0]
    expected = {}
    for row in points.to_dict("records"):
        colour, at = rgb(palette[row["method"]]), key(row["kl_pi_a"], row["score/reward"])
        expected[(at, "x")] = (round(row["kl_pi_a_se"], 9), colour)
        expected[(at, "y")] = (round(row["score/reward_se"], 9), colour)
    drawn = {}
    for collection in ax.collections:
        if isinstance(collection, LineCollection):
            colours = collection.get_colors()
            for i, ((x0, y0), (x1, y1)) in enumerate(collection.get_segments()):
                axis = "x" if y0 == y1 else "y"
                drawn[(key((x0 + x1) / 2, (y0 + y1) / 2), axis)] = (round(abs(x1 - x0 + y1 - y0) / 2, 9),
                                                                    rgb(colours[i % len(colours)]))
    assert drawn == expected


def test_seeds_are_pooled_and_the_frontier_runs_through_their_means() -> None:
    rows = [("f-DPG rkl", 0.1, 0, 0.2, 0.30), ("f-DPG rkl", 0.1, 1, 0.4, 0.50),   # one setting, two seeds
            ("f-DPG rkl", 0.05, 0, 1.0, 0.70), ("f-DPG rkl", 0.05, 1, 1.2, 0.90)]
    points = pd.DataFrame(rows, columns=["method", "beta", "seed", "kl_pi_a", "score/reward"])
    points.insert(0, "run", [f"r{i}" for i in range(len(points))])
    ax = plot_pareto(points, hue="method").axes[0]
    assert set(scatter_colours(ax)) == {key(0.3, 0.4), key(1.1, 0.8)}
    (line,) = drawn_lines(ax)
    assert [key(x, y) for x, y in zip(line.get_xdata(), line.get_ydata())] == [key(0.3, 0.4), key(1.1, 0.8)]
    bars = [c for c in ax.collections if isinstance(c, LineCollection)]
    halves = sorted(round(float(np.abs(np.diff(s, axis=0)).sum()) / 2, 9) for c in bars for s in c.get_segments())
    assert halves == [0.1] * 4  # std over the two seeds / sqrt(2) = |difference| / 2, in x and y
    per_run = plot_pareto(points, hue="method", seeds=False).axes[0]
    assert len(scatter_colours(per_run)) == 4


def test_smooth_is_an_exponential_moving_average_over_steps() -> None:
    steps = np.array([1, 2, 5, 6, 10])
    values = np.array([1.0, 3.0, -2.0, 4.0, 0.5])
    w = 0.7
    weights = np.tril(w ** (steps[:, None] - steps[None, :]).astype(float))
    expected = weights @ values / weights.sum(axis=1)
    assert smooth(steps, values, w) == pytest.approx(expected)
    assert smooth(steps, values, 0.0) == pytest.approx(values)
    with pytest.raises(ValueError):
        smooth(steps, values, 1.0)


def test_training_curves_raw_faintly_smoothed_on_top_and_a_band_over_seeds() -> None:
    rng = np.random.default_rng(0)
    steps = np.arange(1, 11)
    runs = {("s0", "f-DPG rkl", 0): rng.normal(size=10), ("s1", "f-DPG rkl", 1): rng.normal(size=10),
            ("p", "PPO", 0): rng.normal(size=10)}
    metrics = pd.concat([pd.DataFrame({"run": run, "method": method, "beta": 0.1, "seed": seed, "step": steps,
                                       "score/reward": values}) for (run, method, seed), values in runs.items()])
    palette = hue_palette(metrics["method"])
    ax = plot_training_curves(metrics, columns=["score/reward"], palette=palette, smoothing=0.6).axes[0]
    raw = [line for line in ax.lines if line.get_alpha() is not None and line.get_alpha() < 0.5]
    smoothed = [line for line in ax.lines if line.get_alpha() is None or line.get_alpha() >= 0.5]
    assert sorted(tuple(np.round(line.get_ydata(), 9)) for line in raw) == sorted(
        tuple(np.round(v, 9)) for v in runs.values())
    assert all(line.get_alpha() == pytest.approx(0.25) for line in raw)
    by_colour = {rgb(line.get_color()): np.asarray(line.get_ydata()) for line in smoothed}
    assert len(smoothed) == 2 and set(by_colour) == {rgb(c) for c in palette.values()}
    assert by_colour[rgb(palette["PPO"])] == pytest.approx(smooth(steps, runs[("p", "PPO", 0)], 0.6))
    seeds = np.stack([smooth(steps, runs[k], 0.6) for k in runs if k[1] == "f-DPG rkl"])
    mean, se = seeds.mean(axis=0), seeds.std(axis=0, ddof=1) / np.sqrt(2)
    assert by_colour[rgb(palette["f-DPG rkl"])] == pytest.approx(mean)
    (band,) = [c for c in ax.collections if isinstance(c, PolyCollection)]
    assert rgb(band.get_facecolor()[0]) == rgb(palette["f-DPG rkl"])
    vertices = band.get_paths()[0].vertices
    for step, low, high in zip(steps, mean - se, mean + se):
        at = vertices[np.isclose(vertices[:, 0], step), 1]
        assert at.min() == pytest.approx(low) and at.max() == pytest.approx(high)


@pytest.mark.slow
def test_axes_are_labelled_in_plain_words(points) -> None:
    assert metric_label("kl_pi_a") == "KL(π‖a)"
    assert metric_label("kl_pi_a_exact") == "KL(π‖a), exact per token"
    assert metric_label("kl_p_pi") == "KL(p‖π)"
    assert metric_label("d_f") == "D_f(π‖p)"
    assert metric_label("entropy") == "entropy (nats)"
    assert metric_label("score/reward") == "reward"
    assert metric_label("score/toxicity_score") == "toxicity score"
    assert metric_label("grad_norm") == "grad_norm"
    ax = plot_pareto(points, x="kl_pi_a", y="score/reward", hue="method").axes[0]
    assert (ax.get_xlabel(), ax.get_ylabel()) == ("KL(π‖a)", "reward")
    metrics = points.assign(step=1, entropy=1.0)
    curves = plot_training_curves(metrics, columns=["score/reward", "kl_pi_a", "entropy", "not_logged"])
    assert [a.get_ylabel() for a in curves.axes] == ["reward", "KL(π‖a)", "entropy (nats)"]
