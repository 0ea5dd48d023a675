"""Logged runs -> pandas -> Pareto frontiers and plots. Reads run directories only, never the trainer.

>>> from analysis import load_runs, final_points, pareto_frontier, plot_pareto
>>> metrics = load_runs("runs/*")                     # one row per (run, step), settings as columns
>>> points = final_points(metrics, last=5)            # one row per run: mean of its last 5 steps
>>> front = pareto_frontier(points, x="kl_pi_a", y="score/reward")
>>> plot_pareto(points, x="kl_pi_a", y="score/reward", hue="divergence", path="pareto.png")
"""

from analysis.pareto import final_points, pareto_frontier
from analysis.plots import plot_pareto, plot_training_curves
from analysis.runs import load_run, load_runs, load_samples

__all__ = ["final_points", "load_run", "load_runs", "load_samples", "pareto_frontier", "plot_pareto",
           "plot_training_curves"]
