r"""A model's samples scored by a task: the shared first half of ``fdpg filter-samples`` and ``fdpg label-rankings``.

``k`` completions for each of ``n`` prompts drawn (seeded) from the task's pool, sampled from the model (a hub name,
a local path or a finished fdpg run: :func:`fdpg.models.finished_run`) and scored by one feature of the task's
scorer: the reward :math:`r` of a target :math:`a\,e^{r/\beta}`, or the feature ``--reward_feature`` names (e.g. a
0/1 constraint :math:`b`).
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

import torch


@dataclass
class ScoredSamples:
    """``prompts[i]``, ``texts[i]`` and ``scores[i]`` of each sample, the ``k`` samples of a prompt adjacent."""

    prompts: list[str]
    texts: list[str]
    scores: torch.Tensor
    feature: str


def add_sampling_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags every scored-sampling command takes (task, model, length, seed, feature)."""
    from fdpg.commands.generation_flags import add_generation_arguments
    from fdpg.config import TrainConfig

    parser.add_argument("--task", required=True)
    parser.add_argument("--output_dir", "--output-dir", required=True)
    parser.add_argument("--model", default=TrainConfig.model, help="a hub name, a local path or a finished fdpg run")
    parser.add_argument("--max_new_tokens", "--max-new-tokens", type=int, default=TrainConfig.max_new_tokens)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--task_args", "--task-args", default="")
    parser.add_argument("--reward_feature", "--reward-feature", default=None,
                        help="the feature that scores a sample (default: the reward of an a*exp(r/beta) target)")
    parser.add_argument("--beta", type=float, default=TrainConfig.beta)
    parser.add_argument("--no_progress", action="store_true")
    add_generation_arguments(parser)


def draw_scored_samples(args: argparse.Namespace, n_prompts: int, per_prompt: int = 1) -> ScoredSamples:
    """``per_prompt`` samples for each of ``n_prompts`` prompts drawn from the task's pool (without replacement when
    the pool is large enough), scored by the task (the flags of :func:`add_sampling_arguments`)."""
    from fdpg.bon import reward_feature_of
    from fdpg.commands.generation_flags import generation_from_arguments
    from fdpg.config import TrainConfig
    from fdpg.evaluation import draw_prompts, sample_for_prompts
    from fdpg.generation import attach_generator
    from fdpg.policy import Policy
    from fdpg.scores import checked_features
    from tasks import get_task

    generation = generation_from_arguments(args)
    config = TrainConfig(task=args.task, task_args=args.task_args, beta=args.beta)
    spec = get_task(args.task).build(args.beta, config.task_options(), None)
    feature = reward_feature_of(spec, args.reward_feature, args.beta)
    policy = Policy.from_pretrained(args.model)
    attach_generator(policy, generation)
    prompts = [p for p in draw_prompts(spec.prompts, n_prompts, args.seed) for _ in range(per_prompt)]
    batch = sample_for_prompts(policy, prompts, args.max_new_tokens, args.seed, progress=not args.no_progress)
    scores = checked_features(spec.target, spec.scorer(list(batch.texts), list(batch.prompts)), len(batch))[feature]
    return ScoredSamples(list(batch.prompts), list(batch.texts), scores.double(), feature)
