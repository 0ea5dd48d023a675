r"""``reward_model``: a trained reward model as the task's scorer, :math:`P(x\mid c) = a(x\mid c)\exp(R(c, x)/\beta)`.

:math:`R` is a model trained by ``fdpg reward-model train`` (:mod:`fdpg.algorithms.reward_model`), applied to the
prompt and
the completion as a text pair, as it was trained; bounded (in :math:`[0, 1]`) or not, as it was trained.

``--task_args``:

- ``path=RUN``: the run directory of ``fdpg reward-model train`` (or its ``final/``); required;
- ``data=PATH``: where the prompts come from, pairs or rankings whose distinct prompts are the pool (default: the
  data the reward model was trained on, as its run recorded it); ``--prompts_file`` replaces both;
- ``batch_size=32``: completions per forward pass of the reward model.

Metrics: ``score/reward`` (mean R) and ``score/reward_std``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from objectives import rl_with_kl
from tasks.base import Task, TaskSpec, parse_options


def reward_metrics(features: Mapping[str, torch.Tensor]) -> dict[str, float]:
    r = features["reward"].double()
    return {"score/reward": float(r.mean()), "score/reward_std": float(r.std()) if r.numel() > 1 else 0.0}


class RewardModelTask(Task):
    name = "reward_model"
    description = ("a trained reward model (fdpg reward-model train): P = a * exp(R(prompt, x) / beta); "
                   "--task_args path=RUN[,data=PROMPTS_DATA]")
    defaults = {"divergence": "rkl", "beta": 0.1, "max_new_tokens": 32}
    options = {"path": "", "data": "", "batch_size": 32}

    def build(self, beta: float, options: Mapping[str, str], prompts: Sequence[str] | None = None) -> TaskSpec:
        from fdpg.algorithms.reward_model import RewardModel

        opts = parse_options(self.name, options, self.options)
        if not opts["path"]:
            raise ValueError("task 'reward_model' needs the reward model: --task_args path=RUN, the run directory of "
                             "`fdpg reward-model train`")
        if opts["batch_size"] < 1:
            raise ValueError(f"task 'reward_model': batch_size must be positive, got {opts['batch_size']}")
        model = RewardModel.load(opts["path"], batch_size=opts["batch_size"])  # fails here, before any training
        if prompts:
            pool, origin = list(prompts), "--prompts_file"
        else:
            from fdpg.rankings import load_rankings

            data = opts["data"] or model.info.get("data")
            if not data:
                raise ValueError(f"task 'reward_model': {opts['path']} records no data to take prompts from; give "
                                 "--task_args data=PATH or --prompts_file")
            split = model.info.get("data_split", "train") if not opts["data"] else "train"
            pool, origin = load_rankings(data, split).unique_prompts(), data
        bounded = "bounded, in [0, 1]" if model.bounded else "unbounded"

        def scorer(completions: list[str], prompts: list[str]) -> dict[str, torch.Tensor]:
            return {"reward": model(list(prompts), list(completions))}

        return TaskSpec(
            prompts=pool,
            scorer=scorer,
            target=rl_with_kl("reward", beta).as_conditional(),
            metrics=reward_metrics,
            defaults=dict(self.defaults),
            notes=[f"reward = the reward model in {model.directory} ({bounded}, trained with U = "
                   f"{model.info.get('utility')}); {len(pool)} prompts from {origin}"],
        )
