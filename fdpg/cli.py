"""The ``fdpg`` command line.

::

    fdpg train [--config FILE.yaml] [--task sentiment] [--divergence js] [--beta 0.1] ...
    fdpg train --algo ppo --task sentiment --beta 0.1 ...       the PPO baseline on the same engine
    fdpg train --algo grpo --samples_per_prompt G ...             GRPO (--grpo_loss, --scale_rewards, GSPO, ...)
    fdpg train --algo kto --preferences LABELLED|PAIRS|task ...  KTO from completions labelled desirable or not
    fdpg train --algo online_dpo --samples_per_prompt 2 ...     online DPO: the task's reward judges two samples
    fdpg train --algo listwise --preferences RANKINGS --list_loss lipo|rrhf|pro ...   list-wise losses
    fdpg train --algo dpo --preferences PAIRS|task [--divergence js] ...   DPO / f-DPO from preference pairs
    fdpg train --algo sft --data DEMONSTRATIONS ...               supervised fine-tuning (completion tokens only)
    fdpg train --algo raft --samples_per_prompt K ...             online rejection-sampling fine-tuning (best of K)
    fdpg train --algo ppo --ptx_data TEXT --ptx_coef G ...        PPO-ptx; --model RUN starts from a finished run
    fdpg filter-samples --task T --n N --quantile Q --output_dir DIR   base samples the task scores best, as SFT data
    fdpg label-rankings --task T --model RUN --k 4 --output_dir DIR   K-wise rankings of a model's samples by the task
    fdpg pipeline PIPELINE.yaml [--dry_run]                       chained stages (sft -> reward model -> ppo, rounds)
    fdpg eval --task sentiment --model RUN_DIR_OR_MODEL [--n 64]   metrics of a model or a run
    fdpg analyze runs/* --out report                               Pareto frontier and plots of runs
    fdpg sweep --grid "divergence=rkl,js seed=0,1" --output_dir sweeps/NAME [train flags]   one run per cell
    fdpg bon --task sentiment --n 1,2,4,8,16 --output_dir runs      Best-of-n of the base model (reference points)
    fdpg report runs/ --out report                                 HTML + Markdown report: frontiers, curves, tables
    fdpg reward-model train --data RANKINGS --output_dir DIR ...   train a reward model R(prompt, response)
    fdpg reward-model eval --model RUN [--data DATA] [--json]      pairwise accuracy and reward distribution
    fdpg reward-collapse [--output_dir DIR --steps N]              the reward-collapse experiment (Song et al. 2023)
    fdpg divergences            list the registered f-divergences
    fdpg tasks                  list the tasks
    fdpg models prepare         dequantise the embedded default model once into the cache

``fdpg train --help`` lists every setting (the fields of :class:`fdpg.config.TrainConfig`).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from fdpg.commands.prompts_file import read_prompts_file
from fdpg.config import TrainConfig, load_config_file


def parse_train_args(argv: Sequence[str]) -> TrainConfig:
    """Flags over an optional ``--config`` YAML/JSON file over, when resuming, the run's saved settings, over the
    task's defaults over the global defaults. ``--resume RUN`` alone continues RUN with its own settings; a flag
    given explicitly overrides one (the trainer refuses a change of a setting that cannot change)."""
    import dataclasses

    from transformers import HfArgumentParser

    from fdpg.plugins import load_plugins, pop_plugins_flag

    specs, argv = pop_plugins_flag(argv)
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config", default=None)
    pre.add_argument("--resume", default=None)
    known, rest = pre.parse_known_args(list(argv))
    rest = [*rest, "--resume", known.resume] if known.resume else rest
    parser = HfArgumentParser(TrainConfig, prog="fdpg train",
                              description="Align a causal LM with f-divergence minimisation (f-DPG).")
    parser.add_argument("--config", default=None, help="YAML or JSON file of settings (flags override it).")
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    if {"-h", "--help"} & set(rest):
        show_only_algorithm_settings(parser, rest)
    saved = saved_run_settings(known.resume, names) if known.resume else {}
    from_file = load_config_file(known.config) if known.config else {}
    # the run's own plugins, the file's and the flag's, before anything reads a divergence or a task name
    plugins = load_plugins([saved.get("plugins", ""), from_file.get("plugins", ""), *specs])
    parser.set_defaults(**{**saved, **from_file, "plugins": ",".join(plugins)})
    (config,) = parser.parse_args_into_dataclasses(args=rest, look_for_args_file=False)[:1]
    explicit = set(saved) | set(from_file) | {flag.lstrip("-").split("=")[0].replace("-", "_") for flag in rest
                                              if flag.startswith("--")} & names
    return apply_task_defaults(config, explicit)


def show_only_algorithm_settings(parser: argparse.ArgumentParser, argv: Sequence[str]) -> None:
    """With ``--algo X`` on the line, ``--help`` lists the shared settings and X's own
    (:data:`fdpg.algorithms.ALGORITHM_SETTINGS`), the other algorithms' hidden."""
    from fdpg.algorithms import ALGORITHM_SETTINGS, algorithm_specific_settings

    algo = argparse.ArgumentParser(add_help=False)
    algo.add_argument("--algo", default=None)
    chosen = algo.parse_known_args(list(argv))[0].algo
    if chosen not in ALGORITHM_SETTINGS:
        return
    hidden = algorithm_specific_settings() - set(ALGORITHM_SETTINGS[chosen])
    parser.description = (f"{parser.description} The settings of --algo {chosen} and the shared ones (without "
                          "--algo: every algorithm's).")
    for action in parser._actions:
        names = {option.lstrip("-").replace("-", "_") for option in action.option_strings}
        if names & hidden or {n.removeprefix("no_") for n in names if n.startswith("no_")} & hidden:
            action.help = argparse.SUPPRESS


def saved_run_settings(run_dir: str, names: set[str]) -> dict:
    """The settings recorded in ``RUN/config.json`` that are fields of :class:`TrainConfig` (the run's own
    ``resume`` and ``output_dir`` excluded); a directory that is not a run is reported by the trainer."""
    import json

    try:
        saved = json.loads((Path(run_dir) / "config.json").read_text())["config"]
    except (OSError, ValueError, KeyError, TypeError):
        return {}
    return {k: v for k, v in saved.items() if k in names and k not in ("resume", "output_dir")}


def apply_task_defaults(config: TrainConfig, explicit: set[str]) -> TrainConfig:
    """Settings the task suggests (e.g. forward KL for a binary constraint) where the user set none."""
    import dataclasses

    from tasks import get_task

    suggested = {k: v for k, v in getattr(get_task(config.task), "defaults", {}).items()
                 if k in {f.name for f in dataclasses.fields(TrainConfig)} and k not in explicit}
    if config.algo != "fdpg":
        suggested.pop("divergence", None)  # a task's suggested f is f-DPG's; PPO is reverse KL by definition
    changed = {k: v for k, v in suggested.items() if getattr(config, k) != v}
    if changed:
        print(f"[fdpg] task {config.task!r} defaults: " + ", ".join(f"{k}={v}" for k, v in changed.items()),
              file=sys.stderr)
        config = dataclasses.replace(config, **changed)
    return config


def build_trainer(config: TrainConfig):
    """Task, policy and trainer from a config (cheap checks first, the model load last)."""
    import torch

    from fdpg.algorithms.ppo import reward_target
    from fdpg.generation import attach_generator
    from fdpg.policy import LoraSettings, Policy
    from objectives import get_divergence
    from tasks import get_task

    get_divergence(config.divergence)  # unknown names fail before any model is loaded
    task = get_task(config.task)
    prompts = read_prompts_file(config.prompts_file) if config.prompts_file else None
    spec = task.build(config.beta, config.task_options(), prompts)
    if config.token_credit and spec.fine_grained is None:
        raise ValueError(f"--token_credit weights each token by its reward-to-go, which needs per-token rewards: task "
                         f"{config.task!r} has one score per completion (try --task toxicity --task_args "
                         "granularity=sentence, or --task fine_grained)")
    pair_reward = None
    if config.algo in ("ppo", "grpo", "online_dpo"):
        # PPO, GRPO and online DPO need a reward, not a fitted target: refused or rebuilt here, before any model
        # is loaded.
        spec.target, spec.fit = reward_target(spec.target, config.reward_feature, config.beta, algo=config.algo), None
    elif config.algo in ("dpo", "kto", "listwise"):
        pair_reward = pair_reward_feature(spec, config) if config.preferences == "task" and not config.resume else None
    elif config.algo == "raft":
        # RAFT ranks by a reward, needs no fitted target: refused or rebuilt here, before any model is loaded.
        spec.target, spec.fit = reward_target(spec.target, config.reward_feature, config.beta, algo="raft"), None
    elif config.algo == "sft":
        from fdpg.demonstrations import load_demonstrations

        demonstrations = load_demonstrations(config.data)  # bad data refused before the model load
        spec.fit = None  # SFT's target is the data; the task's (unfitted) target only labels the evaluation
    else:
        refuse_infinite_divergence_to_zeros(spec.target, config)
    torch.manual_seed(config.seed)
    lora = LoraSettings(config.lora_r, config.lora_alpha, config.lora_dropout, config.lora_target_modules) \
        if config.lora_r > 0 else None
    policy = Policy.from_pretrained(config.model, lora=lora, trust_remote_code=config.trust_remote_code)
    attach_generator(policy, config)  # every sampling path of the run (fit, rollouts, evaluations) goes through it
    target, fit_details = fit_target(spec, policy, config.max_new_tokens, config.fit_samples, config.seed,
                                     resume=config.resume)
    if config.algo == "listwise":
        return build_listwise_trainer(config, policy, spec, target, fit_details)
    if config.algo in ("dpo", "kto"):
        return build_dpo_trainer(config, policy, spec, target, fit_details, pair_reward)
    if config.algo == "sft":
        return build_sft_trainer(config, policy, spec, target, demonstrations)
    from fdpg.algorithms import online_trainer_class

    trainer = online_trainer_class(config.algo)(config, policy, target, spec.scorer, spec.prompts, spec.metrics,
                        fine_grained=spec.fine_grained, fine_grained_feature=spec.fine_grained_feature)
    trainer.run_extras = {"target_fit": fit_details} if fit_details else {}
    return trainer


def pair_reward_feature(spec, config: TrainConfig) -> str:
    """The task feature that ranks the samples of ``--preferences task`` (refused before any model is loaded when
    the task has no scalar reward and none is named)."""
    from fdpg.engine import reward_target

    return reward_target(spec.target, config.reward_feature, config.beta, algo="dpo").energies[0].reward


def build_dpo_trainer(config: TrainConfig, policy, spec, target, fit_details, pair_reward: str | None):
    """DPO's pairs (read back from the run directory on resume, made from the task, or loaded), tokenised and
    checked, the step count from ``--epochs``, and the trainer; for KTO the same data as labelled completions
    (:mod:`fdpg.labelled_feedback`)."""
    import datasets

    from fdpg.algorithms.dpo import PAIRS_DIR, DPOTrainer
    from fdpg.preferences import load_dataset_source, load_preferences, pairs_from_task, tokenize_pairs

    made = None
    saved = Path(config.resume) / PAIRS_DIR if config.resume else None
    if saved is not None and saved.is_dir():
        data, source = datasets.load_from_disk(str(saved)), str(saved)
    elif config.preferences == "task":
        print(f"[fdpg] making preference pairs: {config.pair_samples} base-model samples for each of "
              f"{config.pair_prompts} prompts, ranked by {pair_reward!r}", file=sys.stderr, flush=True)
        data = made = pairs_from_task(policy, spec, pair_reward, config.pair_prompts, config.pair_samples,
                                      config.max_new_tokens, config.seed + 2, progress=config.progress)
        source = "the pairs made from the task"
        print(f"[fdpg] {len(data)} pairs ({config.pair_prompts - len(data)} prompts dropped for ties)",
              file=sys.stderr, flush=True)
    else:
        source = f"--preferences {config.preferences}"
        # KTO's rows are checked as labelled completions or as pairs (fdpg.labelled_feedback), DPO's as pairs.
        data = load_dataset_source(config.preferences, flag="--preferences") if config.algo == "kto" \
            else load_preferences(config.preferences)
    labelled = None
    if config.algo == "kto":  # labelled singles (pairs unpaired), each with a mismatched completion
        from fdpg.labelled_feedback import labelled_completions, with_mismatched_completions

        labelled = labelled_completions(data, source)
        data = with_mismatched_completions(labelled, config.seed + 5)
    limit = config.max_length or policy.max_positions
    pairs = tokenize_pairs(data, policy.tokenizer, limit, config.truncate_pairs, source)
    if pairs.truncated:
        print(f"[fdpg] --truncate_pairs: {pairs.truncated} responses cut to fit {limit} tokens", file=sys.stderr)
    what = "examples" if labelled is not None else "pairs"
    config = steps_for_epochs(config, len(pairs), what)
    extras = {"preference_pairs": len(pairs), "truncated_responses": pairs.truncated,
              **({"target_fit": fit_details} if fit_details else {})}
    if labelled is not None:
        from fdpg.algorithms.kto import KTOTrainer

        labels = list(data["label"])
        trainer = KTOTrainer(config, policy, target, spec.scorer, spec.prompts, spec.metrics, pairs=pairs,
                             labels=labels, pair_data=made)
        extras.update({"labelled_examples": len(pairs), "desirable": sum(labels)})
        del extras["preference_pairs"]
    else:
        trainer = DPOTrainer(config, policy, target, spec.scorer, spec.prompts, spec.metrics, pairs=pairs,
                             pair_data=made)
    trainer.run_extras = extras
    return trainer


def build_listwise_trainer(config: TrainConfig, policy, spec, target, fit_details):
    """The rankings of ``--preferences`` (read back the same on resume), tokenised and checked, the step count from
    ``--epochs``, and the list-wise trainer."""
    from fdpg.algorithms.listwise import ListwiseTrainer
    from fdpg.ranked_lists import load_ranked_lists

    limit = config.max_length or policy.max_positions
    lists = load_ranked_lists(config.preferences, policy.tokenizer, limit, config.truncate_pairs)
    config = steps_for_epochs(config, len(lists), "rankings")
    trainer = ListwiseTrainer(config, policy, target, spec.scorer, spec.prompts, spec.metrics, pairs=lists)
    trainer.run_extras = {"rankings": len(lists), "ranked_responses": lists.n_responses,
                          "truncated_responses": lists.truncated,
                          **({"target_fit": fit_details} if fit_details else {})}
    return trainer


def steps_for_epochs(config: TrainConfig, n_rows: int, what: str) -> TrainConfig:
    """``--epochs`` over ``n_rows`` training rows (pairs, demonstrations) as a step count."""
    import dataclasses
    import math

    from fdpg.preferences import split_pairs

    if config.epochs is None:
        return config
    n_train = len(split_pairs(n_rows, config.heldout_fraction, config.seed)[0])
    steps = max(1, math.ceil(config.epochs * n_train / config.batch_size))
    if steps != config.steps:
        print(f"[fdpg] --epochs {config.epochs:g} over {n_train} training {what}: {steps} steps", file=sys.stderr)
        config = dataclasses.replace(config, steps=steps)
    return config


def build_sft_trainer(config: TrainConfig, policy, spec, target, data):
    """SFT's demonstrations, tokenised and checked against the context, the step count from ``--epochs``, and the
    trainer."""
    from fdpg.algorithms.sft import SFTTrainer
    from fdpg.demonstrations import tokenize_demonstrations

    demonstrations = tokenize_demonstrations(data, policy.tokenizer, config.max_length or policy.max_positions,
                                             f"--data {config.data}")
    config = steps_for_epochs(config, len(demonstrations), "demonstrations")
    trainer = SFTTrainer(config, policy, target, spec.scorer, spec.prompts, spec.metrics,
                         demonstrations=demonstrations)
    trainer.run_extras = {"demonstrations": len(demonstrations), "demonstration_tokens": demonstrations.n_tokens}
    return trainer


def refuse_infinite_divergence_to_zeros(target, config: TrainConfig) -> None:
    """A target that can be zero (a binary constraint) with a divergence whose f'(inf) is infinite (reverse KL,
    chi2) fails at the first sample with P = 0: say so before any model is loaded."""
    import math

    from objectives import BinaryConstraint, ZeroTargetError, get_divergence

    divergence = get_divergence(config.divergence)
    if (config.max_log_ratio is None and math.isinf(divergence.f_prime_inf)
            and any(isinstance(e, BinaryConstraint) for e in target.energies)):
        raise ZeroTargetError(f"task {config.task!r}: its target {target.describe()} is 0 wherever the constraint "
                              f"fails, where {divergence.zero_target_problem()}")


def fit_target(spec, policy, max_new_tokens: int, n: int | None, seed: int, resume: str | None = None):
    """The task's target, fitted first on ``n`` base-model samples when the task asks for it.

    ``n=None`` takes the task's suggestion. Base samples are stratified over the prompts (equal counts
    per prompt) and seeded. When resuming (``resume``: the run directory), the fit recorded in the run's
    ``config.json`` (``target_fit``) is restored without sampling again; a run without a record (made
    before fits were recorded) is fitted again, on the same seeded samples.
    """
    if getattr(spec, "fit", None) is None:
        return spec.target, None
    from tasks.constraints import base_sampler, restore_fit

    recorded = recorded_fit(resume) if resume else None
    if recorded is not None:
        lambdas = ", ".join(f"{k} = {v:+.4f}" for k, v in recorded["lambdas"].items())
        print(f"[fdpg] target restored from the fit recorded in {Path(resume) / 'config.json'}: lambda {lambdas}",
              file=sys.stderr, flush=True)
        return restore_fit(spec, recorded).target, recorded
    n = n or spec.fit_samples or 256
    print(f"[fdpg] fitting the target on {n} samples of the base model", file=sys.stderr, flush=True)
    fit = spec.fit(base_sampler(policy, spec.prompts, max_new_tokens, seed + 1), n)
    print(fit.report, file=sys.stderr, flush=True)
    return fit.target, getattr(fit, "details", None)


def recorded_fit(run_dir: str) -> dict | None:
    """The ``target_fit`` record of a run directory's ``config.json`` (``None`` when absent or unreadable)."""
    import json

    try:
        saved = json.loads((Path(run_dir) / "config.json").read_text())["config"]
    except (OSError, ValueError, KeyError, TypeError):
        return None  # the trainer reports a missing or broken run directory itself
    record = saved.get("target_fit") if isinstance(saved, dict) else None
    return record if isinstance(record, dict) and "lambdas" in record else None


def cmd_train(argv: Sequence[str]) -> int:
    summary, _ = run_training(parse_train_args(argv))
    return 0 if summary["status"] == "finished" else 130


def run_training(config: TrainConfig) -> tuple[dict, Path | None]:
    """Build and train (``fdpg train`` and :func:`fdpg.train`): the run's summary and its directory, with the final
    evaluation and the progress of the training batches printed as the command prints them."""
    trainer = build_trainer(config)
    summary = trainer.train()
    if trainer.is_main and trainer.run_dir is not None:
        print(f"[fdpg] {summary['status']} after {summary['steps_completed']}/{summary['steps']} steps "
              f"in {summary['wall_time_s']:.0f} s; run: {trainer.run_dir}")
        evaluation = trainer.run_dir / "eval.json"
        if evaluation.is_file():
            print(final_evaluation_report(evaluation))
        print(progress_report(trainer.run_dir / "metrics.jsonl"))
    return summary, trainer.run_dir


def final_evaluation_report(path: Path) -> str:
    """``eval.json`` for a person: each task metric, KL(pi||a) (exact per token) and the entropy, base model and
    final policy side by side, each ± its standard error; the run's result (the batch means below it are not)."""
    import json

    data = json.loads(path.read_text())
    policy, base = data["policy"], data["base"]
    keys = [k for k in policy if k.startswith("score/") and not k.endswith("_se")]
    keys += [k for k in ("kl_pi_a_exact", "entropy_exact", "d_f") if k in policy]

    def cell(result: dict, key: str) -> str:
        value, se = result.get(key), result.get(f"{key}_se")
        if value is None:
            return "n/a"
        return f"{value:.4f} ± {se:.4f}" if se is not None else f"{value:.4f}"

    width = max(len(k) for k in keys)
    lines = [f"[fdpg] final evaluation ({path}): {data['n']} completions each, mean ± standard error",
             f"  {'metric':<{width}}  {'base model':>19}  {'final policy':>19}"]
    lines += [f"  {k:<{width}}  {cell(base, k):>19}  {cell(policy, k):>19}" for k in keys]
    return "\n".join(lines)


def progress_report(metrics_file: Path, window: int = 5) -> str:
    """Task scores and KL(pi||a) of the training batches: mean of the first ``window`` logged steps -> mean of the
    last ``window`` (batch means of the samples trained on; the final evaluation above them is the run's result)."""
    import json

    rows = [json.loads(line) for line in metrics_file.read_text().splitlines() if line.strip()]
    if not rows:
        return "[fdpg] no step was logged"
    logged = {key for r in rows for key, v in r.items() if isinstance(v, (int, float))}
    # the task's scores and KL of the sampled batches; SFT's steps sample nothing: their loss instead
    keys = [key for key in sorted(logged) if key.startswith("score/")] + [
        key for key in ("kl_pi_a", "loss", "heldout/loss") if key in logged]
    k = min(window, len(rows))

    def mean(part: list[dict], key: str) -> float:
        values = [r[key] for r in part if isinstance(r.get(key), (int, float))]
        return sum(values) / len(values) if values else float("nan")

    lines = [f"  {key:<28} {mean(rows[:k], key):8.3f} -> {mean(rows[-k:], key):8.3f}" for key in keys]
    return (f"[fdpg] training batches (not the evaluation): mean of the first {k} steps -> mean of the last {k} "
            f"steps:\n" + "\n".join(lines))


def cmd_eval(argv: Sequence[str]) -> int:
    """``fdpg eval --task NAME --model PATH_OR_RUN``: task metrics, KL(pi||a) and Distinct-n of N samples."""
    from fdpg.commands.generation_flags import add_generation_arguments, generation_from_arguments
    from fdpg.evaluation import evaluate_policy, load_run_policy
    from fdpg.generation import attach_generator
    from fdpg.policy import Policy
    from fdpg.run_log import dumps
    from tasks import get_task

    parser = argparse.ArgumentParser(prog="fdpg eval", description=cmd_eval.__doc__)
    parser.add_argument("--task", required=True)
    parser.add_argument("--model", required=True, help="a run directory, a hub name or a local model path")
    parser.add_argument("--n", type=int, default=64, help="completions to sample")
    parser.add_argument("--max_new_tokens", "--max-new-tokens", type=int, default=32)
    parser.add_argument("--task_args", "--task-args", default="")
    parser.add_argument("--beta", type=float, default=0.1)
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--prompts_file", "--prompts-file", default=None)
    parser.add_argument("--out", "--output", dest="output", default=None,
                        help="write the full JSON result here (default for a run directory: RUN/eval-TASK.json)")
    parser.add_argument("--json", action="store_true", help="print the full JSON result instead of the table")
    add_generation_arguments(parser)
    args = parser.parse_args(list(argv))
    if args.n < 1:
        raise ValueError(f"--n must be a positive number of samples, got {args.n}")
    generation = generation_from_arguments(args)
    is_run = (Path(args.model) / "config.json").is_file() and (Path(args.model) / "metrics.jsonl").exists()
    if is_run:
        from fdpg.plugins import load_recorded

        load_recorded([args.model])  # a task of the run's own plugins
    options = TrainConfig(task_args=args.task_args).task_options()
    prompts = read_prompts_file(args.prompts_file) if args.prompts_file else None
    spec = get_task(args.task).build(args.beta, options, prompts)
    policy = load_run_policy(args.model) if is_run else Policy.from_pretrained(args.model)
    attach_generator(policy, generation)
    metrics = evaluate_policy(policy, spec, args.n, args.max_new_tokens, args.seed)
    result = {"task": args.task, "model": args.model, **metrics}
    text = dumps(result)
    output = args.output or (str(Path(args.model) / f"eval-{args.task}.json") if is_run else None)
    if output:
        Path(output).write_text(text + "\n")
    print(text if args.json else evaluation_table(result) + (f"\nwrote {output}" if output else ""))
    return 0


def evaluation_table(result: dict) -> str:
    """A person's view of an evaluation: one line per metric (value, standard error), then a few examples."""
    names = [k for k, v in result.items() if (isinstance(v, (int, float)) or v is None) and not k.endswith("_se")
             and k != "n"]
    width = max(len(k) for k in names)

    def number(value) -> str:
        return "n/a" if value is None else f"{value:.4f}"

    lines = [f"{result['model']} on {result['task']}: {result['n']} completions", "",
             f"{'metric':<{width}}  {'value':>10}  {'s.e.':>8}"]
    for k in names:
        se = number(result[f"{k}_se"]) if f"{k}_se" in result else ""
        lines.append(f"{k:<{width}}  {number(result[k]):>10}  {se:>8}")
    examples = result.get("examples", [])[:3]
    if examples:
        lines += ["", "examples:"] + [f"  {e['prompt']!r} -> {e['completion']!r}" for e in examples]
    return "\n".join(lines)


def cmd_analyze(argv: Sequence[str]) -> int:
    """``fdpg analyze RUN [RUN ...] --out DIR``: final points, Pareto frontier and plots of logged runs."""
    import analysis

    parser = argparse.ArgumentParser(prog="fdpg analyze", description=cmd_analyze.__doc__)
    parser.add_argument("runs", nargs="+", help="run directories, directories of runs, or glob patterns")
    parser.add_argument("--out", default="analysis-report", help="where to write points.csv and the plots")
    parser.add_argument("--x", default=None,
                        help="divergence axis (default: kl_pi_a_exact, the exact per-token KL(pi||a), when every run "
                             "logged it within its last steps, else kl_pi_a)")
    parser.add_argument("--y", default="score/reward", help="alignment-score axis")
    parser.add_argument("--hue", default="method",
                        help="the column that groups runs into curves (default: method, e.g. 'f-DPG rkl', 'PPO')")
    parser.add_argument("--last", type=int, default=5, help="steps averaged into each run's point")
    parser.add_argument("--smoothing", type=float, default=0.8,
                        help="exponential-moving-average weight of the training curves, in [0, 1); 0: raw values")
    parser.add_argument("--source", choices=["auto", "eval", "train"], default="auto",
                        help="where a run's point comes from: its final evaluation (eval.json) when it has one "
                             "(auto), only evaluated runs (eval), or the mean of its last training steps (train)")
    args = parser.parse_args(list(argv))
    import pandas as pd

    from fdpg.plugins import load_recorded

    load_recorded(args.runs)
    scan = analysis.scan_runs(args.runs)
    for line in scan.messages():
        print(f"[fdpg analyze] {line}", file=sys.stderr)
    if not scan.dirs:
        raise FileNotFoundError(f"no loadable run in {' '.join(args.runs)}")
    metrics = pd.concat([analysis.load_run(d) for d in scan.dirs], ignore_index=True)
    points = analysis.frontier_points(scan.dirs, source=args.source, last=args.last, metrics=metrics)
    pooled = analysis.seed_points(points) if args.hue not in ("run", "seed") else points
    x, y, note = analysis.frontier_axes(points, args.x, args.y, args.last)
    if note:
        print(note)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    points.to_csv(out / "points.csv", index=False)
    written = [out / "points.csv"]
    if (pooled["n_runs"] > 1).any():
        pooled.to_csv(out / "seed_points.csv", index=False)
        written.append(out / "seed_points.csv")
    # one colour per group, the same in both figures
    palette = analysis.hue_palette(points[args.hue]) if args.hue in points else None
    analysis.plot_pareto(pooled, x=x, y=y, hue=args.hue, palette=palette, path=out / "pareto.png")
    written.append(out / "pareto.png")
    trained = analysis.training_metrics(metrics)  # Best-of-n has no training curve
    if not trained.empty:
        curves = list(dict.fromkeys((y, x, "kl_pi_a", "d_f")))
        analysis.plot_training_curves(trained, columns=curves, hue=args.hue, palette=palette,
                                      smoothing=args.smoothing, path=out / "curves.png")
        written.append(out / "curves.png")
    front = analysis.pareto_frontier(pooled, x=x, y=y)
    columns = ("run", args.hue, "beta", "n_runs", "final_step", "n_steps", x, f"{x}_se", y, f"{y}_se", "source")
    with pd.option_context("display.width", 200, "display.max_columns", None, "display.precision", 4):
        print(points[[c for c in dict.fromkeys(columns) if c in points and c != "n_runs"]].to_string(index=False))
        if (pooled["n_runs"] > 1).any():
            print("\nruns that differ only in the seed, pooled (mean, standard error over seeds):")
            print(pooled[[c for c in dict.fromkeys(columns) if c in pooled]].to_string(index=False))
    print(f"\nPareto frontier ({x} low, {y} high): {', '.join(front['run'])}")
    print(f"wrote {', '.join(str(p) for p in written)}")
    return 0


def cmd_divergences(argv: Sequence[str]) -> int:
    from objectives import describe_divergences

    for name, text in describe_divergences().items():
        print(f"{name:<10} {text}")
    return 0


def cmd_tasks(argv: Sequence[str]) -> int:
    from tasks import available_tasks

    for name, text in available_tasks().items():
        print(f"{name:<12} {text}")
    return 0


def cmd_models(argv: Sequence[str]) -> int:
    from fdpg.models import default_cache_dir, prepare_embedded_model

    parser = argparse.ArgumentParser(prog="fdpg models")
    parser.add_argument("action", choices=["prepare"])
    parser.add_argument("--cache_dir", default=None, help=f"default: {default_cache_dir()}")
    parser.add_argument("--force", action="store_true", help="prepare again even if already prepared")
    args = parser.parse_args(list(argv))
    path = prepare_embedded_model(Path(args.cache_dir) if args.cache_dir else None, force=args.force)
    print(path)
    return 0


def cmd_sweep(argv: Sequence[str]) -> int:
    from fdpg.commands.sweep import cmd_sweep as sweep

    return sweep(argv)


def cmd_bon(argv: Sequence[str]) -> int:
    from fdpg.commands.report import cmd_bon as bon

    return bon(argv)


def cmd_report(argv: Sequence[str]) -> int:
    from fdpg.commands.report import cmd_report as report

    return report(argv)


def cmd_reward_model(argv: Sequence[str]) -> int:
    from fdpg.commands.reward_model import cmd_reward_model as reward_model

    return reward_model(argv)


def cmd_reward_collapse(argv: Sequence[str]) -> int:
    from fdpg.commands.reward_model import cmd_reward_collapse as reward_collapse

    return reward_collapse(argv)


def cmd_pipeline(argv: Sequence[str]) -> int:
    from fdpg.commands.pipeline import cmd_pipeline as pipeline

    return pipeline(argv)


def cmd_filter_samples(argv: Sequence[str]) -> int:
    from fdpg.commands.filter_samples import cmd_filter_samples as filter_samples

    return filter_samples(argv)


def cmd_label_rankings(argv: Sequence[str]) -> int:
    from fdpg.commands.label_rankings import cmd_label_rankings as label_rankings

    return label_rankings(argv)


COMMANDS = {"train": cmd_train, "eval": cmd_eval, "analyze": cmd_analyze, "sweep": cmd_sweep, "bon": cmd_bon,
            "report": cmd_report, "reward-model": cmd_reward_model, "reward-collapse": cmd_reward_collapse,
            "divergences": cmd_divergences, "tasks": cmd_tasks, "models": cmd_models, "pipeline": cmd_pipeline,
            "filter-samples": cmd_filter_samples, "label-rankings": cmd_label_rankings}


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        print(__doc__.strip())
        if argv and argv[0] not in ("-h", "--help"):
            print(f"\nunknown command {argv[0]!r}", file=sys.stderr)
            return 2
        return 0
    try:
        from fdpg.plugins import load_plugins, pop_plugins_flag

        if argv[0] == "train":
            load_plugins()  # FDPG_PLUGINS and entry points; train reads --plugins itself (and records them)
            rest = argv[1:]
        else:
            specs, rest = pop_plugins_flag(argv[1:])
            load_plugins(specs)
            if argv[0] == "sweep" and specs:  # every cell's command names them (--print_commands, array jobs)
                from fdpg.plugins import canonical

                rest += ["--plugins", ",".join(canonical(s) for s in specs)]
        return COMMANDS[argv[0]](rest)
    except (ValueError, FileNotFoundError, KeyError, ImportError) as exc:
        message = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
        print(f"fdpg {argv[0]}: error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
