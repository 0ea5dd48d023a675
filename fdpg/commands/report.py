"""The ``fdpg bon`` and ``fdpg report`` commands.

::

    fdpg bon --task sentiment --n 1,2,4,8,16 --output_dir runs [--prompts 64] [--model M] [--seed 0]
    fdpg report runs/ sweep/ --out report         report.html (self-contained), report.md, PNG figures, CSV tables
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence


def cmd_bon(argv: Sequence[str]) -> int:
    """``fdpg bon --task NAME --n 1,2,4,8,16 --output_dir DIR``: Best-of-n of the base model, the reference points of
    the frontier. For each n, the best (by the task's reward) of n completions per prompt, one run directory per n
    (``DIR/bon-TASK-nN-seedS``) that ``fdpg analyze`` and ``fdpg report`` draw beside the trained runs, method
    'Best-of-n', KL(pi||a) the analytic log n - (n-1)/n; n = 1 is the base model itself. max(n) completions per
    prompt are drawn once and best-of-n is the best of the first n of them (the nested estimator)."""
    from fdpg.bon import load_base_policy, parse_ns, reward_feature_of, run_best_of_n, write_bon_runs
    from fdpg.commands.generation_flags import add_generation_arguments, generation_from_arguments
    from fdpg.config import TrainConfig
    from fdpg.generation import attach_generator
    from tasks import get_task

    parser = argparse.ArgumentParser(prog="fdpg bon", description=cmd_bon.__doc__)
    parser.add_argument("--task", required=True)
    parser.add_argument("--n", default="1,2,4,8,16",
                        help="the n of best-of-n, separated by commas (default %(default)s)")
    parser.add_argument("--output_dir", "--output-dir", required=True,
                        help="where the run directories go (one per n): a sweep's directory puts them beside its runs")
    parser.add_argument("--model", default=TrainConfig.model, help="the base model: hub name, local path, or the "
                        "embedded default (%(default)s)")
    parser.add_argument("--prompts", type=int, default=64,
                        help="prompts, i.e. kept completions (samples) per n; max(n) completions are drawn for each")
    parser.add_argument("--max_new_tokens", "--max-new-tokens", type=int, default=TrainConfig.max_new_tokens)
    parser.add_argument("--seed", type=int, default=0, help="seed of the prompts and of sampling")
    parser.add_argument("--task_args", "--task-args", default="")
    parser.add_argument("--prompts_file", "--prompts-file", default=None)
    parser.add_argument("--reward_feature", "--reward-feature", default=None,
                        help="the feature to maximise when the task's target is not a exp(r/beta) (e.g. b)")
    parser.add_argument("--beta", type=float, default=TrainConfig.beta,
                        help="the task's beta (for building its target; best-of-n does not depend on it)")
    parser.add_argument("--chunk", type=int, default=16, help="completions per generate call")
    parser.add_argument("--trust_remote_code", action="store_true")
    parser.add_argument("--no_progress", action="store_true", help="no progress bar")
    add_generation_arguments(parser)
    args = parser.parse_args(list(argv))
    from fdpg.commands.prompts_file import read_prompts_file

    ns = parse_ns(args.n)
    generation = generation_from_arguments(args)
    if args.prompts < 1:
        raise ValueError(f"--prompts must be a positive number of prompts, got {args.prompts}")
    options = TrainConfig(task_args=args.task_args).task_options()
    prompts = read_prompts_file(args.prompts_file) if args.prompts_file else None
    spec = get_task(args.task).build(args.beta, options, prompts)
    reward = reward_feature_of(spec, args.reward_feature, args.beta)  # refused here, before the model loads
    listed = ", ".join(map(str, ns))
    print(f"[fdpg] best-of-n for n = {listed} on {args.task!r}: {max(ns)} completions for each of {args.prompts} "
          f"prompts, ranked by {reward!r}", file=sys.stderr, flush=True)
    import torch

    torch.manual_seed(args.seed)
    policy = load_base_policy(args.model, trust_remote_code=args.trust_remote_code)
    attach_generator(policy, generation)
    results = run_best_of_n(policy, spec, ns, args.prompts, args.max_new_tokens, args.seed, reward,
                            chunk=args.chunk, progress=not args.no_progress)
    settings = {"task": args.task, "task_args": args.task_args, "model": args.model, "reward_feature": reward,
                "prompts": args.prompts, "samples_per_prompt": max(ns), "max_new_tokens": args.max_new_tokens,
                "seed": args.seed, "prompts_file": args.prompts_file, "target": spec.target.describe(),
                "conditional": spec.target.conditional}
    base = results[0]  # n = 1, always computed: the first completion of each prompt, a plain base-model sample
    results = [r for r in results if r.n in ns]
    written = write_bon_runs(args.output_dir, results, settings, base=base)
    metric = next((k for k in results[0].metrics if k.startswith("score/") and not k.endswith("_se")), None)
    print(f"{'n':>4}  {'KL(pi||a) analytic':>18}  {metric or '':>28}  run")
    for result, path in zip(results, written):
        value, se = result.metrics.get(metric), result.metrics.get(f"{metric}_se")
        shown = "n/a" if value is None else f"{value:.4f}" + (f" ± {se:.4f}" if se is not None else "")
        print(f"{result.n:>4}  {result.metrics['kl_pi_a']:>18.4f}  {shown:>28}  {path}")
    return 0


def cmd_report(argv: Sequence[str]) -> int:
    """``fdpg report SWEEP_OR_RUN_DIRS... --out DIR``: a report of runs: report.html (self-contained, figures
    embedded), report.md and the PNG figures: the Pareto frontier of each task (one colour per method, with
    Best-of-n and the base model when present), training curves with bands over seeds, the final metrics of every
    cell (mean ± std over seeds) and the settings, the pseudo-reward -f'(t) of every divergence used, and samples
    of each cell. Directories that are not runs, runs with no step and damaged files are skipped and listed."""
    from analysis.report import build_report

    parser = argparse.ArgumentParser(prog="fdpg report", description=cmd_report.__doc__)
    parser.add_argument("runs", nargs="+", help="run directories, directories of runs (a sweep), or glob patterns")
    parser.add_argument("--out", default="report", help="where to write the report (default %(default)s)")
    parser.add_argument("--last", type=int, default=5, help="steps averaged into a run's point without eval.json")
    parser.add_argument("--source", choices=["auto", "eval", "train"], default="auto",
                        help="where a run's point comes from (as in fdpg analyze)")
    parser.add_argument("--smoothing", type=float, default=0.8, help="moving-average weight of the curves, [0, 1)")
    parser.add_argument("--samples", type=int, default=3, help="samples shown per cell at its first and last step")
    parser.add_argument("--title", default=None)
    args = parser.parse_args(list(argv))
    from fdpg.plugins import load_recorded

    load_recorded(args.runs)  # the divergences and tasks of runs made with plugins
    if args.last < 1:
        raise ValueError(f"--last must be a positive number of steps, got {args.last}")
    if not 0 <= args.smoothing < 1:
        raise ValueError(f"--smoothing must be in [0, 1), got {args.smoothing}")
    report = build_report(args.runs, args.out, last=args.last, source=args.source, smoothing=args.smoothing,
                          samples_per_step=args.samples, title=args.title)
    print(f"wrote {report.html}, {report.markdown} and {len(report.figures)} figures "
          f"({len(report.runs)} runs, {len(report.skipped)} skipped)")
    if not report.runs:
        print("fdpg report: no run could be loaded (see the reasons above and in the report)", file=sys.stderr)
        return 2
    return 0
