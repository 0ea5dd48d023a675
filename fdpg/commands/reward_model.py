"""``fdpg reward-model train|eval`` and ``fdpg reward-collapse``: the command-line side of
:mod:`fdpg.algorithms.reward_model`.

::

    fdpg reward-model train --data DATA --output_dir DIR [--steps N --batch_size B --bounded --utility SPEC ...]
    fdpg reward-model train --resume DIR [--steps N]        continue a run (its settings are the defaults)
    fdpg reward-model eval --model RUN [--data DATA] [--subset all|heldout|train] [--json] [--out FILE]
    fdpg reward-collapse [--output_dir DIR --steps N ...]   the reward-collapse experiment (tasks.reward_collapse)

``fdpg reward-model train --help`` lists every setting (the fields of
:class:`fdpg.algorithms.reward_model.RewardModelConfig`; dashes or underscores both work).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from collections.abc import Sequence
from pathlib import Path

ERRORS = (ValueError, FileNotFoundError, KeyError, ImportError)


def _fail(command: str, exc: BaseException) -> int:
    message = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
    print(f"fdpg {command}: error: {message}", file=sys.stderr)
    return 2


def parse_reward_model_args(argv: Sequence[str]):
    """The settings of ``fdpg reward-model train``: flags over, when resuming, the run's own settings (so that
    ``--resume RUN --steps N`` is enough) over the defaults."""
    from transformers import HfArgumentParser

    from fdpg.algorithms.reward_model import RewardModelConfig
    from fdpg.run_log import RunLog

    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--resume", default=None)
    known, _ = pre.parse_known_args(list(argv))
    parser = HfArgumentParser(RewardModelConfig, prog="fdpg reward-model train",
                              description="Train a reward model R(prompt, response) from pairs or rankings.")
    if known.resume:
        saved = RunLog.open_existing(known.resume).saved_config()
        names = {f.name for f in dataclasses.fields(RewardModelConfig)} - {"resume", "output_dir"}
        parser.set_defaults(**{k: v for k, v in saved.items() if k in names})
    (config,) = parser.parse_args_into_dataclasses(args=list(argv), look_for_args_file=False)
    return config


def reward_model_train(argv: Sequence[str]) -> int:
    """``fdpg reward-model train``: data and settings checked, then the model loaded and trained."""
    from fdpg.algorithms.reward_model import RewardModelTrainer, training_summary
    from fdpg.rankings import load_rankings

    config = parse_reward_model_args(argv)
    if not config.data:
        raise ValueError("--data is required: pairs (prompt, chosen, rejected) or rankings (prompt, responses best "
                         "first) as a JSON/JSONL/CSV/Parquet file, a saved datasets directory or a hub dataset name")
    rankings = load_rankings(config.data, config.data_split, config.margin_column, config.utility_column)
    trainer = RewardModelTrainer(config, rankings)
    summary = trainer.train()
    if trainer.is_main and trainer.run_dir is not None:
        print(f"[fdpg] {summary['status']} after {summary['steps_completed']}/{summary['steps']} steps in "
              f"{summary['wall_time_s']:.0f} s; run: {trainer.run_dir}")
        print(training_summary(trainer.run_dir))
    return 0 if summary["status"] == "finished" else 130


def reward_model_eval(argv: Sequence[str]) -> int:
    """``fdpg reward-model eval``: pairwise accuracy and the reward distribution of a trained reward model."""
    from fdpg.algorithms.reward_model import RewardModel, evaluate_reward_model, format_evaluation
    from fdpg.rankings import load_rankings, split_by_prompt
    from fdpg.run_log import dumps

    parser = argparse.ArgumentParser(prog="fdpg reward-model eval", description=reward_model_eval.__doc__)
    parser.add_argument("--model", required=True, help="a run directory of `fdpg reward-model train` (or its final/)")
    parser.add_argument("--data", default=None, help="pairs or rankings (default: the data the model was trained on)")
    parser.add_argument("--data_split", "--data-split", default="train")
    parser.add_argument("--subset", choices=["all", "heldout", "train"], default="all",
                        help="every ranking of --data (all), or the run's held-out / training prompts (needs the run's "
                             "own data)")
    parser.add_argument("--batch_size", "--batch-size", type=int, default=32, help="responses per forward pass")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    parser.add_argument("--out", default=None, help="also write the JSON result here")
    args = parser.parse_args(list(argv))
    if args.batch_size < 1:
        raise ValueError(f"--batch_size must be a positive integer, got {args.batch_size}")
    model = RewardModel.load(args.model, batch_size=args.batch_size)
    data = args.data or model.info.get("data")
    if not data:
        raise ValueError(f"{args.model} records no training data; give --data")
    rankings = load_rankings(data, args.data_split if args.data else model.info.get("data_split", "train"))
    if args.subset != "all":
        run_config = _run_config(args.model)
        if run_config is None or args.data and args.data != model.info.get("data") and \
                Path(args.data).resolve() != Path(str(model.info.get("data"))).resolve():
            raise ValueError(f"--subset {args.subset} is the split of the run's own data: give the run directory as "
                             "--model and no other --data")
        train, heldout = split_by_prompt(rankings, run_config["heldout_fraction"], run_config["seed"])
        chosen = heldout if args.subset == "heldout" else train
        if not chosen:
            raise ValueError(f"--subset {args.subset}: the run has no {args.subset} rankings")
        rankings = rankings.subset(chosen)
        rankings.source = f"{rankings.source} ({args.subset} prompts)"
    result = evaluate_reward_model(model, rankings)
    text = dumps(result)
    if args.out:
        Path(args.out).write_text(text + "\n")
    print(text if args.json else format_evaluation(result) + (f"\nwrote {args.out}" if args.out else ""))
    return 0


def _run_config(path: str) -> dict | None:
    import json

    for directory in (Path(path), Path(path).parent):
        file = directory / "config.json"
        if file.is_file():
            try:
                config = json.loads(file.read_text())["config"]
            except (ValueError, KeyError, TypeError):
                return None
            return config if config.get("kind") == "reward_model" else None
    return None


REWARD_MODEL_ACTIONS = {"train": reward_model_train, "eval": reward_model_eval}


def cmd_reward_model(argv: Sequence[str]) -> int:
    """``fdpg reward-model train|eval ...``."""
    argv = list(argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__.strip())
        return 0
    action = argv[0]
    if action not in REWARD_MODEL_ACTIONS:
        print(f"fdpg reward-model: unknown action {action!r}; use train or eval", file=sys.stderr)
        return 2
    try:
        return REWARD_MODEL_ACTIONS[action](argv[1:])
    except ERRORS as exc:
        return _fail(f"reward-model {action}", exc)


def cmd_reward_collapse(argv: Sequence[str]) -> int:
    """``fdpg reward-collapse``: the reward-collapse experiment (:mod:`tasks.reward_collapse`)."""
    try:
        from tasks.reward_collapse import main

        return main(list(argv))
    except ERRORS as exc:
        return _fail("reward-collapse", exc)
