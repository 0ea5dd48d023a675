r"""The algorithms, one file each, every one reading top to bottom as its algorithm over the shared engine
(:mod:`fdpg.engine`: sampling, scoring, the reference pass, the loop with signals and resume, logging) and the tensor
functions of :mod:`objectives`:

- :mod:`~fdpg.algorithms.f_dpg`: f-DPG, :math:`\min_\theta D_f(\pi_\theta\|p)` toward an energy-based target;
- :mod:`~fdpg.algorithms.ppo`: PPO with a per-token KL penalty (RLHF), PPO-ptx;
- :mod:`~fdpg.algorithms.grpo`: GRPO and its variants (Dr. GRPO, DAPO, GSPO, CISPO), no critic;
- :mod:`~fdpg.algorithms.dpo`: DPO and f-DPO from preference pairs; :mod:`~fdpg.algorithms.kto`: KTO from labelled
  completions; :mod:`~fdpg.algorithms.online_dpo`: online DPO, the task's reward judging the policy's own samples;
- :mod:`~fdpg.algorithms.sft`: supervised fine-tuning on demonstrations;
- :mod:`~fdpg.algorithms.raft`: RAFT, online rejection-sampling fine-tuning;
- :mod:`~fdpg.algorithms.reward_model`: reward models from pairs or K-wise rankings.

:func:`online_trainer_class` maps ``--algo`` to the trainer class of the online algorithms that share one
constructor (f-DPG, PPO, GRPO, online DPO, RAFT); DPO, KTO and SFT read data and are built by their own
builders in ``fdpg.cli``.
"""

from __future__ import annotations

import importlib

#: ``--algo`` -> (module, class) of the online trainers built as ``Trainer(config, policy, target, scorer, prompts)``.
ONLINE_TRAINERS = {
    "fdpg": ("fdpg.algorithms.f_dpg", "FDPGTrainer"),
    "ppo": ("fdpg.algorithms.ppo", "PPOTrainer"),
    "grpo": ("fdpg.algorithms.grpo", "GRPOTrainer"),
    "online_dpo": ("fdpg.algorithms.online_dpo", "OnlineDPOTrainer"),
    "raft": ("fdpg.algorithms.raft", "RAFTTrainer"),
}


def online_trainer_class(algo: str) -> type:
    """The trainer class of the online algorithm ``algo`` (imported on first use)."""
    if algo not in ONLINE_TRAINERS:
        raise ValueError(f"--algo {algo!r} is not an online algorithm built from a task; choose one of "
                         f"{', '.join(ONLINE_TRAINERS)}")
    module, name = ONLINE_TRAINERS[algo]
    return getattr(importlib.import_module(module), name)
