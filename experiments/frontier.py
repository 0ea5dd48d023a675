r"""Experiment 1: the divergence frontier on sentiment (Go et al. 2023), with a verdict.

::

    python -m experiments.frontier            # ~1 h on 2 cores; run it again to resume; results in results/

Arms, all toward :math:`p \propto a\,e^{r/\beta}` (VADER sentiment, :math:`\beta = 0.1`) from the embedded
SmolLM2-135M-Instruct with a LoRA (r = 8): f-DPG with reverse KL, forward KL, total variation, Jensen-Shannon and
Amari :math:`\alpha = 0.5`; PPO and DPO at the same :math:`\beta`; Best-of-n of the base model for
:math:`n \le 16`; and the base model. Two seeds per trained arm; every trained point is its run's final
evaluation (``eval.json``: 1024 completions, reward and the exact per-token :math:`KL(\pi\|a)` with standard
errors), Best-of-n's from 1024 prompts with the analytic KL.

Stages: three ``fdpg sweep`` s (f-DPG's ten cells, PPO's two, DPO's two; two 1-thread workers), ``fdpg bon``,
``fdpg report``, then :func:`write_results`: ``results/frontier.csv`` / ``.json`` (one row per arm, seeds
pooled), ``results/comparisons.csv`` (every pair at matched KL, :mod:`analysis.verdict`) and
``results/verdict.md``.

The choices (measured first, one cell of each algorithm: ``README``): 16-token completions (an evaluation of 1024
completions takes ~140 s on one thread; at 32 tokens about twice that), batch 16, 40 steps (640 samples a run), f-DPG
at learning rate 1e-3, PPO at 2.5e-4 (it takes 4 epochs of updates from each batch: 1e-3 took it to KL 0.95 in
4 steps), DPO at 5e-4 on 1024 base samples of 256 prompts (best against worst of 4).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pandas as pd

from experiments.common import SMOKE_STEPS, Stage, experiment_parser, flags, run_stages, sweep_finished

HERE = Path(__file__).resolve().parent
DEFAULT_OUT = HERE / "frontier"

#: Settings of every trained cell.
COMMON: dict[str, Any] = {"task": "sentiment", "beta": 0.1, "lora_r": 8, "batch_size": 16, "max_new_tokens": 16,
                          "steps": 40, "eval_samples": 1024}
#: Each arm's sweep: its own settings and its grid (the seeds always; ``algo`` on the grid, so that run directories
#: are named apart across sweeps: analysis tells runs apart by their directory's name).
SEEDS = "0,1"
ARMS: dict[str, dict[str, Any]] = {
    "fdpg": {"grid": f"divergence=rkl,fkl,tv,js,alpha:0.5 seed={SEEDS}", "settings": {"learning_rate": 1e-3}},
    "ppo": {"grid": f"algo=ppo seed={SEEDS}", "settings": {"learning_rate": 2.5e-4}},
    "dpo": {"grid": f"algo=dpo seed={SEEDS}", "settings": {"preferences": "task", "pair_prompts": 256,
                                                  "pair_samples": 4, "learning_rate": 5e-4, "eval_every": 10}},
}
BEST_OF_N = {"n": "1,2,4,8,16", "prompts": 1024, "chunk": 64}
#: The Go et al. (2023) readings the verdict checks.
JS, FKL = "f-DPG js", "f-DPG fkl"
DIVERGENCE_ARMS = ("f-DPG rkl", "f-DPG fkl", "f-DPG tv", "f-DPG js", "f-DPG alpha:0.5")
#: The reward and the KL the frontier is drawn in.
X, Y = "kl_pi_a_exact", "score/reward"
#: Smoke-run overrides (a 1-step version of every stage on a tiny model, for the test suite).
SMOKE: dict[str, Any] = {"steps": SMOKE_STEPS, "batch_size": 4, "max_new_tokens": 8, "eval_samples": 8,
                         "micro_batch_size": 4, "generation_batch_size": 4}


def stages(out: Path, workers: int = 2, smoke: str | None = None) -> list[Stage]:
    """The experiment's ``fdpg`` commands (``smoke``: a tiny model's path, for a 1-step version of each)."""
    common = dict(COMMON)
    if smoke:
        common.update(SMOKE, model=smoke)
    out_stages = []
    for arm, spec in ARMS.items():
        settings = {**common, **spec["settings"]}
        if smoke and "pair_prompts" in settings:
            settings["pair_prompts"] = 24  # enough untied pairs for a batch of 4
        grid = spec["grid"] if not smoke else spec["grid"].replace(f"seed={SEEDS}", "seed=0")
        directory = out / "runs" / arm
        out_stages.append(Stage(f"sweep-{arm}", ["sweep", "--grid", grid, "--output_dir", str(directory),
                                                 "--workers", str(workers), "--progress", "false",
                                                 *flags(settings)],
                                done=lambda _, d=directory: sweep_finished(d)))
    bon_dir = out / "runs" / "bon"
    bon = {**BEST_OF_N, **({"prompts": 4, "n": "1,2", "chunk": 4} if smoke else {})}
    out_stages.append(Stage("bon", ["bon", "--task", common["task"], "--output_dir", str(bon_dir),
                                    "--max_new_tokens", str(common["max_new_tokens"]), "--beta", str(common["beta"]),
                                    "--no_progress", *flags(bon), *(["--model", smoke] if smoke else [])],
                            done=lambda _: bon_dir.is_dir() and any(bon_dir.glob("bon-*/metrics.jsonl"))))
    out_stages.append(Stage("report", ["report", *(str(out / "runs" / a) for a in (*ARMS, "bon")),
                                       "--out", str(out / "results" / "report"),
                                       "--title", "Experiment 1: the divergence frontier on sentiment"]))
    return out_stages


# ---------------------------------------------------------------------------------------------- the verdict
def bon_n(run: str) -> float:
    """The n of a Best-of-n run's name (``bon-sentiment-n4-seed0`` -> 4), NaN for another run."""
    import re

    found = re.search(r"-n(\d+)-seed", str(run))
    return float(found.group(1)) if found else float("nan")


def write_results(out: Path, z: float = 2.0) -> dict[str, Any]:
    """``results/``: the frontier per arm, every pair compared at matched KL (both chords), the Go et al. checks,
    and ``verdict.md`` that says them in words."""
    from analysis import frontier_points, scan_runs
    from analysis.verdict import (
        Point,
        arms_from_points,
        compare_arms,
        compare_sqrt_fits,
        comparisons_frame,
        near_frontier,
        pool_seeds,
    )

    results = out / "results"
    results.mkdir(parents=True, exist_ok=True)
    scan = scan_runs([str(out / "runs" / a) for a in (*ARMS, "bon")])
    points = frontier_points(scan.dirs, source="eval")
    points["n_bon"] = points["run"].map(bon_n)
    points = points[~((points["method"] == "Best-of-n") & (points["n_bon"] == 1))]  # n = 1 is the base model
    table = pool_seeds(points, ["method", "n_bon"], (Y, X, "score/positive_fraction", "entropy_exact", "distinct_2"))
    table["arm"] = [m if pd.isna(n) else f"{m} n={int(n)}" for m, n in zip(table["method"], table["n_bon"])]
    base_row = table[table["method"] == "base a"].iloc[0]
    base = Point(0.0, float(base_row[Y]), 0.0, float(base_row[f"{Y}_se"]))
    trained = table[table["method"] != "base a"]
    arms = arms_from_points(trained, arm="method", x=X, y=Y)
    by_scale = {scale: compare_arms(arms, base, z=z, scale=scale) for scale in ("sqrt", "linear")}
    comparisons = comparisons_frame(by_scale["sqrt"])
    comparisons["verdict_linear_chord"] = comparisons_frame(by_scale["linear"])["verdict"]
    table.drop(columns=["n_bon"]).to_csv(results / "frontier.csv", index=False)
    comparisons.to_csv(results / "comparisons.csv", index=False)
    # the primary comparison: each arm's curve r0 + c sqrt(KL) through every run's own point (seeds included)
    runs = points[points["method"] != "base a"]
    fits, fitted = compare_sqrt_fits(arms_from_points(runs, arm="method", x=X, y=Y), base, kl=1.0, z=z)
    fitted = comparisons_frame(fitted)
    fits = pd.DataFrame([vars(f) for f in fits])
    fits.to_csv(results / "sqrt_fits.csv", index=False)
    fitted.to_csv(results / "comparisons_sqrt_fit.csv", index=False)
    js_ok = js_rows = None
    if JS in set(fitted["a"]) | set(fitted["b"]):
        js_rows = fitted[(fitted["a"] == JS) | (fitted["b"] == JS)]
        beaten = js_rows[js_rows["verdict"] == js_rows.apply(
            lambda c: f"{c['a']} < {c['b']}" if c["a"] == JS else f"{c['a']} > {c['b']}", axis=1)]
        js_rows = [c for c in beaten["a"].tolist() + beaten["b"].tolist() if c != JS]
        # Go et al.'s frontier is that of the trained policies; Best-of-n is the reference beside it
        js_ok = {"trained": not [c for c in js_rows if c != "Best-of-n"], "with_best_of_n": not js_rows}
    chord_js_ok, _ = near_frontier(arms, base, JS, z=z) if JS in arms else (None, [])
    divergences = {k: v for k, v in arms.items() if k in DIVERGENCE_ARMS}
    fkl = _fkl_check(trained, base, z) if FKL in divergences else None
    summary = {"z": z, "base": vars(base), "arms": json.loads(table.drop(columns=["n_bon"]).to_json(orient="records")),
               "comparisons": json.loads(comparisons.to_json(orient="records")),
               "sqrt_fits": json.loads(fits.to_json(orient="records")),
               "comparisons_sqrt_fit": json.loads(fitted.to_json(orient="records")),
               "js_at_or_near_frontier": js_ok, "js_at_or_near_frontier_chords": chord_js_ok,
               "fkl_moves_least": fkl}
    (results / "frontier.json").write_text(json.dumps(summary, indent=1) + "\n")
    (results / "verdict.md").write_text(verdict_markdown(table, fits, fitted, comparisons, js_ok, js_rows,
                                                         chord_js_ok, fkl, z) + "\n")
    return summary


def _fkl_check(trained: pd.DataFrame, base, z: float) -> dict[str, Any]:
    """Forward KL "needs more samples" (Go et al.): after the same 640 samples, how far each divergence moved the
    reward from the base model; forward KL against each other divergence (difference of gains, combined s.e.)."""
    rows = trained.set_index("method")
    gains = {m: (float(rows.loc[m, Y]) - base.reward, float(rows.loc[m, f"{Y}_se"])) for m in DIVERGENCE_ARMS
             if m in rows.index}
    fkl_gain, fkl_se = gains[FKL]
    pairs = {}
    for m, (gain, se) in gains.items():
        if m == FKL:
            continue
        s = math.hypot(fkl_se, se)
        pairs[m] = {"difference": fkl_gain - gain, "se": s, "z": (fkl_gain - gain) / s if s else float("nan"),
                    "fkl_moved_less": (gain - fkl_gain) > z * s}
    return {"gains": {m: {"gain": g, "se": s} for m, (g, s) in gains.items()}, "against": pairs,
            "shows": all(p["fkl_moved_less"] for p in pairs.values())}


def verdict_markdown(table: pd.DataFrame, fits: pd.DataFrame, fitted: pd.DataFrame, comparisons: pd.DataFrame,
                     js_ok, js_beaten, chord_js_ok, fkl, z: float) -> str:
    def pm(row, m: str) -> str:
        return f"{row[m]:.4f} ± {row[f'{m}_se']:.4f}"

    def pair_rows(frame: pd.DataFrame, extra: str | None = None) -> list[str]:
        rows = []
        for _, c in frame.iterrows():
            rows.append(f"| {c['a']} | {c['b']} | {c['kl']:.3f} | {c['reward_a']:.4f} | {c['reward_b']:.4f} | "
                        f"{c['difference']:+.4f} | {c['se']:.4f} | {c['z']:+.1f} | {c['verdict']} |"
                        + (f" {c[extra]} |" if extra else ""))
        return rows

    header = "| A | B | matched KL | reward A | reward B | A − B | s.e. | z | verdict |"
    lines = ["# Experiment 1: the divergence frontier on sentiment — verdict", "",
             "Reward (VADER compound of 16-token completions) and exact KL(π‖a) per arm, mean over seeds ± s.e. "
             "(the larger of the seed-to-seed and the evaluation s.e.); trained arms from 1024 evaluated "
             "completions per run, Best-of-n from 1024 prompts (analytic KL).", "",
             "| arm | runs | reward | KL(π‖a) exact |", "|---|---|---|---|"]
    for _, row in table.iterrows():
        lines.append(f"| {row['arm']} | {int(row['n_runs'])} | {pm(row, Y)} | {pm(row, X)} |")
    lines += ["", f"## Every pair at matched KL, on fitted curves (|d| > {z:g} s.e.: they differ; otherwise a tie)",
              "", "Each arm's curve `r(KL) = r0 + c·√KL` is fitted through every run's own point (the seeds land at "
              "different KLs along it), c's s.e. the larger of the evaluation errors propagated and the runs' "
              "scatter around the curve (`analysis.verdict.compare_sqrt_fits`). The reward difference at any "
              "matched KL is (c_A − c_B)·√KL, so the verdict holds at every KL; the readings are at KL = 1.", "",
              "| arm | runs | c (reward per √nat) | s.e. | s.e. (evaluation) | s.e. (scatter) |",
              "|---|---|---|---|---|---|"]
    for _, f in fits.iterrows():
        lines.append(f"| {f['name']} | {int(f['n'])} | {f['c']:.4f} | {f['se']:.4f} | {f['se_eval']:.4f} | "
                     f"{f['se_residual']:.4f} |")
    lines += ["", header, "|---|---|---|---|---|---|---|---|---|", *pair_rows(fitted)]
    lines += ["", "## The same pairs on chords between the pooled points", "",
              "A check that does not assume the curve's shape: each pair at the larger KL both pooled points reached, "
              "the further arm read on its chord from the base model in √KL (`analysis.verdict.compare_arms`; the "
              "seeds' spread along the curve counts as noise here, so these s.e. are larger); the last column "
              "uses a chord linear in KL.", "", header + " linear chord |",
              "|---|---|---|---|---|---|---|---|---|---|", *pair_rows(comparisons, "verdict_linear_chord")]
    lines += ["", "## Go et al.'s ordering", ""]
    if js_ok is not None:
        lines.append(f"- JS at or near the frontier of the trained policies (no trained arm's fitted curve above JS's "
                     f"by more than {z:g} s.e.): **{'yes' if js_ok['trained'] else 'no'}**; counting Best-of-n: "
                     f"**{'yes' if js_ok['with_best_of_n'] else 'no'}**"
                     + (f" (above it: {', '.join(js_beaten)})" if js_beaten else "")
                     + f"; on the chords of the pooled points, counting Best-of-n: "
                     f"**{'yes' if chord_js_ok else 'no'}**")
    if fkl is not None:
        against = "; ".join(f"{m}: {p['difference']:+.4f} ± {p['se']:.4f}" for m, p in fkl["against"].items())
        lines.append(f"- Forward KL needs more samples (after the same 640 samples its reward moved less than every "
                     f"other divergence's, by more than {z:g} s.e.): **{'yes' if fkl['shows'] else 'no'}** "
                     f"(fkl's gain minus the other's: {against})")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = experiment_parser(__doc__.split("\n\n")[0], str(DEFAULT_OUT))
    args = parser.parse_args(argv)
    out = Path(args.out)
    run_stages(stages(out, args.workers, args.smoke), out, dry_run=args.dry_run)
    if not args.dry_run:
        summary = write_results(out)
        print((out / "results" / "verdict.md").read_text())
        return 0 if summary["arms"] else 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
