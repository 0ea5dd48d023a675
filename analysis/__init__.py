"""Logged runs -> pandas -> Pareto frontiers, plots and reports. Reads run directories only, never the trainer.

>>> from analysis import load_runs, final_points, seed_points, pareto_frontier, plot_pareto, hue_palette
>>> metrics = load_runs("runs/*")                     # one row per (run, step), settings as columns
>>> points = final_points(metrics, last=5)            # one row per run: mean and standard error of its last 5 steps
>>> points = evaluated_points(points, load_evaluations("runs/*"))  # eval.json's numbers where a run has them
>>> pooled = seed_points(points)                      # runs that differ only in the seed: one point, s.e. over seeds
>>> front = pareto_frontier(pooled, x="kl_pi_a", y="score/reward")
>>> palette = hue_palette(points["method"])           # one colour per method, shared by every figure
>>> plot_pareto(points, x="kl_pi_a", y="score/reward", hue="method", palette=palette, path="pareto.png")
>>> plot_training_curves(metrics, hue="method", palette=palette, path="curves.png")

All of it at once, for directories of runs that may hold broken ones (skipped with their reasons):

>>> scan = scan_runs(["sweep/", "runs/bon"])          # loadable run directories, and what was skipped and why
>>> points = frontier_points(scan.dirs)               # what `fdpg analyze` draws: eval.json first, the base model
>>> build_report(scan.dirs, out="report")             # report.html (self-contained), report.md, figures, tables
"""

from analysis.evaluations import base_points, evaluated_points, load_evaluations
from analysis.pareto import final_points, pareto_frontier, seed_points
from analysis.plots import (
    hue_palette,
    metric_label,
    plot_pareto,
    plot_pseudo_rewards,
    plot_training_curves,
    smooth,
)
from analysis.report import (
    build_report,
    final_table,
    formatted_table,
    frontier_axes,
    frontier_points,
    sample_excerpts,
    training_metrics,
)
from analysis.runs import RunScan, check_run, load_run, load_runs, load_samples, read_jsonl, run_dirs, scan_runs

__all__ = ["RunScan", "base_points", "build_report", "check_run", "evaluated_points", "final_points", "final_table",
           "formatted_table", "frontier_axes", "frontier_points", "hue_palette", "load_evaluations", "load_run",
           "load_runs", "load_samples", "metric_label", "pareto_frontier", "plot_pareto", "plot_pseudo_rewards",
           "plot_training_curves", "read_jsonl", "run_dirs", "sample_excerpts", "scan_runs", "seed_points", "smooth",
           "training_metrics"]
