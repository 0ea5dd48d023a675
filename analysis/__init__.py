"""Logged runs -> pandas -> Pareto frontiers and plots. Reads run directories only, never the trainer.

>>> from analysis import load_runs, final_points, seed_points, pareto_frontier, plot_pareto, hue_palette
>>> metrics = load_runs("runs/*")                     # one row per (run, step), settings as columns
>>> points = final_points(metrics, last=5)            # one row per run: mean and standard error of its last 5 steps
>>> points = evaluated_points(points, load_evaluations("runs/*"))  # eval.json's numbers where a run has them
>>> pooled = seed_points(points)                      # runs that differ only in the seed: one point, s.e. over seeds
>>> front = pareto_frontier(pooled, x="kl_pi_a", y="score/reward")
>>> palette = hue_palette(points["method"])           # one colour per method, shared by every figure
>>> plot_pareto(points, x="kl_pi_a", y="score/reward", hue="method", palette=palette, path="pareto.png")
>>> plot_training_curves(metrics, hue="method", palette=palette, path="curves.png")
"""

from analysis.evaluations import base_points, evaluated_points, load_evaluations
from analysis.pareto import final_points, pareto_frontier, seed_points
from analysis.plots import hue_palette, metric_label, plot_pareto, plot_training_curves, smooth
from analysis.runs import load_run, load_runs, load_samples, run_dirs

__all__ = ["base_points", "evaluated_points", "final_points", "hue_palette", "load_evaluations", "load_run",
           "load_runs", "load_samples", "metric_label", "pareto_frontier", "plot_pareto", "plot_training_curves",
           "run_dirs", "seed_points", "smooth"]
