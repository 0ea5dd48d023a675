r"""Experiment 2: fine-grained against holistic rewards (Wu et al. 2023), with PPO and with f-DPG token credit.

::

    python -m experiments.fine_grained        # ~60 min on 2 cores; run it again to resume; results in results/

The task is ``fine_grained`` (:mod:`tasks.fine_grained`): :math:`r(y) = \sum_{\text{sentences}} \mathrm{VADER}
- 0.5 \cdot \#\text{repeated trigrams} + 0.3 \cdot [\text{ends a sentence}]` on the sentiment prompts, 24-token
completions, :math:`P = a\,e^{r/\beta}` with :math:`\beta = 0.1`. Unlike toxicity (the base model's ~0.1 sits on
the floor), the base model is far from this target: one sentence's sentiment is ~0.15 on average, a completion
can collect up to +1 per positive sentence, and most 24-token completions end mid-sentence (completeness 0).

The two rewards are the *same* function of the text; they differ only in where it sits on the tokens:
``granularity=fine`` puts each sentence's sentiment on the token that ends it, each sub-sentence's repetition
penalty where the repetition occurs and completeness on the last token; ``granularity=holistic`` puts the total
on the last token. f-DPG's sequence-level gradient does not see the difference, so f-DPG runs with reverse KL
and ``--token_credit`` (reward-to-go per token, :mod:`fdpg.algorithms.f_dpg`); PPO takes the per-token rewards as its
reward vector (GAE with its value head). 2 algorithms x 2 granularities x 3 seeds, 40 steps of 16 completions.

Results (``results/``): ``curves.png`` (on-policy batch means of the reward and its parts against samples seen,
mean over seeds with a ±1 s.e. band: each step's batch is 16 fresh samples of the current policy, the quantity
an evaluation measures, from fewer samples), ``final.csv`` (each arm's final evaluation of 512 completions,
seeds pooled), ``runs.csv`` and ``metrics.csv`` (each run's evaluated point and its training log: the
analysis can be redone from them), ``comparisons.csv`` (fine against holistic within each algorithm, and every
pair at matched KL) and ``verdict.md``.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pandas as pd

from experiments.common import SMOKE_STEPS, Stage, experiment_parser, flags, run_stages, sweep_finished

HERE = Path(__file__).resolve().parent
DEFAULT_OUT = HERE / "fine_grained"

COMMON: dict[str, Any] = {"task": "fine_grained", "beta": 0.1, "lora_r": 8, "batch_size": 16, "max_new_tokens": 24,
                          "steps": 40, "eval_samples": 512}
SEEDS = "0,1,2"  # 2 seeds left every matched-KL s.e. at 0.15-0.3 (scatter between seeds)
GRID = f"task_args=granularity=fine,granularity=holistic seed={SEEDS}"
#: Each algorithm's sweep (``algo`` on the grid, so that run directories are named apart across the sweeps).
ARMS: dict[str, dict[str, Any]] = {
    "fdpg": {"divergence": "rkl", "token_credit": True, "learning_rate": 1e-3},
    "ppo": {"learning_rate": 2.5e-4},
}
SMOKE: dict[str, Any] = {"steps": SMOKE_STEPS, "batch_size": 4, "max_new_tokens": 8, "eval_samples": 8,
                         "micro_batch_size": 4, "generation_batch_size": 4}
METRICS = ("score/reward", "score/sentiment", "score/repetition", "score/completeness", "kl_pi_a_exact")
X, Y = "kl_pi_a_exact", "score/reward"


def stages(out: Path, workers: int = 2, smoke: str | None = None) -> list[Stage]:
    common = dict(COMMON)
    if smoke:
        common.update(SMOKE, model=smoke)
    grid = GRID if not smoke else GRID.replace(f"seed={SEEDS}", "seed=0")
    out_stages = []
    for arm, settings in ARMS.items():
        directory = out / "runs" / arm
        out_stages.append(Stage(f"sweep-{arm}", ["sweep", "--grid", f"algo={arm} {grid}",
                                                 "--output_dir", str(directory), "--workers", str(workers),
                                                 "--progress", "false",
                                                 *flags({**common, **settings})],
                                done=lambda _, d=directory: sweep_finished(d)))
    return out_stages


def arm_label(config: dict[str, Any]) -> str:
    algo = "PPO" if config.get("algo") == "ppo" else "f-DPG rkl, token credit"
    granularity = "holistic" if "holistic" in str(config.get("task_args")) else "fine"
    return f"{algo}, {granularity}"


def write_results(out: Path, z: float = 2.0) -> dict[str, Any]:
    """``results/``: the curves against samples seen, the final evaluations per arm and the verdict."""
    from analysis import frontier_points, load_runs, plot_training_curves, scan_runs
    from analysis.verdict import Point, arms_from_points, compare_arms, compare_sqrt_fits, comparisons_frame, pool_seeds

    results = out / "results"
    results.mkdir(parents=True, exist_ok=True)
    scan = scan_runs([str(out / "runs" / a) for a in ARMS])
    labels = {d.name: arm_label(json.loads((d / "config.json").read_text())["config"]) for d in scan.dirs}
    metrics = load_runs([str(d) for d in scan.dirs])
    metrics["arm"] = metrics["run"].map(labels)
    metrics["samples_seen"] = metrics["step"] * metrics["batch_size"]
    plot_training_curves(metrics, columns=("score/reward", "score/sentiment", "score/completeness", "kl_pi_a"),
                         hue="arm", x="samples_seen", path=results / "curves.png")
    points = frontier_points(scan.dirs, source="eval")
    points["arm"] = [labels.get(r, "base a") if m != "base a" else "base a"
                     for r, m in zip(points["run"], points["method"])]
    points.to_csv(results / "runs.csv", index=False)
    metrics.drop(columns=[c for c in metrics if metrics[c].dtype == object and c not in ("run", "arm", "method")]
                 ).to_csv(results / "metrics.csv", index=False)
    table = pool_seeds(points, ["arm"], METRICS)
    table.to_csv(results / "final.csv", index=False)
    base_row = table[table["arm"] == "base a"].iloc[0]
    base = Point(0.0, float(base_row[Y]), 0.0, float(base_row[f"{Y}_se"]))
    trained = table[table["arm"] != "base a"]
    rows = trained.set_index("arm")
    within = []
    for algo in ("f-DPG rkl, token credit", "PPO"):
        fine, holistic = f"{algo}, fine", f"{algo}, holistic"
        if fine not in rows.index or holistic not in rows.index:
            continue
        for metric in METRICS:
            d = float(rows.loc[fine, metric] - rows.loc[holistic, metric])
            s = math.hypot(float(rows.loc[fine, f"{metric}_se"]), float(rows.loc[holistic, f"{metric}_se"]))
            verdict = "tie" if abs(d) <= z * s else ("fine > holistic" if d > 0 else "fine < holistic")
            within.append({"algorithm": algo, "metric": metric, "fine": float(rows.loc[fine, metric]),
                           "holistic": float(rows.loc[holistic, metric]), "difference": d, "se": s,
                           "z": d / s if s else float("nan"), "verdict": verdict})
    within = pd.DataFrame(within)
    matched = comparisons_frame(compare_arms(arms_from_points(trained, arm="arm", x=X, y=Y), base, z=z))
    # as in Experiment 1: each arm's curve r0 + c sqrt(KL) through every run's own point, read at KL = 1
    runs = points[points["arm"] != "base a"]
    fits, fitted = compare_sqrt_fits(arms_from_points(runs, arm="arm", x=X, y=Y), base, kl=1.0, z=z)
    fits, fitted = pd.DataFrame([vars(f) for f in fits]), comparisons_frame(fitted)
    within.to_csv(results / "comparisons.csv", index=False)
    matched.to_csv(results / "matched_kl.csv", index=False)
    fits.to_csv(results / "sqrt_fits.csv", index=False)
    fitted.to_csv(results / "comparisons_sqrt_fit.csv", index=False)
    summary = {"z": z, "arms": json.loads(table.to_json(orient="records")),
               "fine_vs_holistic": json.loads(within.to_json(orient="records")),
               "matched_kl": json.loads(matched.to_json(orient="records")),
               "sqrt_fits": json.loads(fits.to_json(orient="records")),
               "matched_kl_sqrt_fit": json.loads(fitted.to_json(orient="records"))}
    (results / "final.json").write_text(json.dumps(summary, indent=1) + "\n")
    (results / "verdict.md").write_text(verdict_markdown(table, within, matched, z, fits, fitted) + "\n")
    return summary


def verdict_markdown(table: pd.DataFrame, within: pd.DataFrame, matched: pd.DataFrame, z: float,
                     fits: pd.DataFrame, fitted: pd.DataFrame) -> str:
    def pm(row, m: str) -> str:
        return f"{row[m]:.3f} ± {row[f'{m}_se']:.3f}" if m in row and not pd.isna(row[m]) else "n/a"

    lines = ["# Experiment 2: fine-grained against holistic rewards — verdict", "",
             "Final evaluation of each arm (512 completions per run, mean over the seeds ± s.e., the larger of the "
             "seed-to-seed and the evaluation s.e.).", "",
             "| arm | runs | reward | sentiment (sum over sentences) | repeated trigrams | completeness | "
             "KL(π‖a) exact |", "|---|---|---|---|---|---|---|"]
    for _, row in table.iterrows():
        lines.append(f"| {row['arm']} | {int(row['n_runs'])} | " + " | ".join(pm(row, m) for m in METRICS) + " |")
    lines += ["", f"## Fine-grained against holistic, within each algorithm (|d| > {z:g} s.e.: they differ)", "",
              "| algorithm | metric | fine | holistic | fine − holistic | s.e. | z | verdict |",
              "|---|---|---|---|---|---|---|---|"]
    for _, c in within.iterrows():
        lines.append(f"| {c['algorithm']} | {c['metric']} | {c['fine']:.3f} | {c['holistic']:.3f} | "
                     f"{c['difference']:+.3f} | {c['se']:.3f} | {c['z']:+.1f} | {c['verdict']} |")
    lines += ["", f"## Every pair at matched KL, on fitted curves (|d| > {z:g} s.e.: they differ)", "",
              "Each arm's curve `r(KL) = r0 + c·√KL` through every run's own point (`analysis.verdict."
              "compare_sqrt_fits`, as in Experiment 1): the difference at any matched KL is (c_A − c_B)·√KL, read "
              "here at KL = 1.", "",
              "| arm | runs | c (reward per √nat) | s.e. | s.e. (evaluation) | s.e. (scatter) |",
              "|---|---|---|---|---|---|"]
    for _, f in fits.iterrows():
        lines.append(f"| {f['name']} | {int(f['n'])} | {f['c']:.4f} | {f['se']:.4f} | {f['se_eval']:.4f} | "
                     f"{f['se_residual']:.4f} |")
    lines += ["", "| A | B | A − B at KL 1 | s.e. | z | verdict |", "|---|---|---|---|---|---|"]
    for _, c in fitted.iterrows():
        lines.append(f"| {c['a']} | {c['b']} | {c['difference']:+.3f} | {c['se']:.3f} | {c['z']:+.1f} | "
                     f"{c['verdict']} |")
    lines += ["", "## Every pair at matched KL on chords between the pooled points (no shape assumed; "
              "`analysis.verdict.compare_arms`)", "",
              "| A | B | matched KL | A − B | s.e. | z | verdict |", "|---|---|---|---|---|---|---|"]
    for _, c in matched.iterrows():
        lines.append(f"| {c['a']} | {c['b']} | {c['kl']:.3f} | {c['difference']:+.3f} | {c['se']:.3f} | "
                     f"{c['z']:+.1f} | {c['verdict']} |")
    lines += ["", "![curves](curves.png)"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = experiment_parser(__doc__.split("\n\n")[0], str(DEFAULT_OUT))
    args = parser.parse_args(argv)
    out = Path(args.out)
    run_stages(stages(out, args.workers, args.smoke), out, dry_run=args.dry_run)
    if not args.dry_run:
        write_results(out)
        print((out / "results" / "verdict.md").read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
