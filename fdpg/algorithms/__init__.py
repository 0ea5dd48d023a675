r"""The algorithms, one file each, every one reading top to bottom as its algorithm over the shared engine
(:mod:`fdpg.engine`: sampling, scoring, the reference pass, the loop with signals and resume, logging) and the tensor
functions of :mod:`objectives`:

- :mod:`~fdpg.algorithms.f_dpg`: f-DPG, :math:`\min_\theta D_f(\pi_\theta\|p)` toward an energy-based target;
- :mod:`~fdpg.algorithms.ppo`: PPO with a per-token KL penalty (RLHF), PPO-ptx;
- :mod:`~fdpg.algorithms.grpo`: GRPO and its variants (Dr. GRPO, DAPO, GSPO, CISPO), no critic;
- :mod:`~fdpg.algorithms.dpo`: DPO and f-DPO from preference pairs; :mod:`~fdpg.algorithms.kto`: KTO from labelled
  completions; :mod:`~fdpg.algorithms.listwise`: RRHF, PRO and LiPO from rankings;
  :mod:`~fdpg.algorithms.online_dpo`: online DPO, the task's reward judging the policy's own samples;
- :mod:`~fdpg.algorithms.sft`: supervised fine-tuning on demonstrations;
- :mod:`~fdpg.algorithms.raft`: RAFT, online rejection-sampling fine-tuning;
- :mod:`~fdpg.algorithms.reward_model`: reward models from pairs or K-wise rankings.

:func:`online_trainer_class` maps ``--algo`` to the trainer class of the online algorithms that share one
constructor (f-DPG, PPO, GRPO, online DPO, RAFT); DPO, KTO and SFT read data and are built by their own
builders in ``fdpg.cli``. :data:`ALGORITHM_SETTINGS` names each algorithm's own settings (fields of
:class:`fdpg.config.TrainConfig`; the others are everyone's), which ``fdpg train --algo X --help`` shows.
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


_OFFLINE_DATA = ("epochs", "eval_every", "heldout_fraction", "max_length")
_PAIRS_FROM_TASK = ("preferences", "pair_prompts", "pair_samples", "truncate_pairs", "reward_feature")
_PAIR_LOSS = ("preference_loss", "label_smoothing", "length_alpha", "positive_lambda", "discopop_tau")
#: ``--algo`` -> the settings only that algorithm reads (``fdpg train --algo X --help`` shows these and the shared
#: ones: model, task, sampling, optimisation, run directory, ...).
ALGORITHM_SETTINGS: dict[str, tuple[str, ...]] = {
    "fdpg": ("baseline", "baseline_decay", "log_z", "log_z_window", "max_log_ratio", "token_credit", "off_policy",
             "importance_weight_clip", "fit_samples"),
    "ppo": ("reward_feature", "ppo_epochs", "ppo_minibatches", "clip_range", "dual_clip", "value_clip", "vf_coef",
            "entropy_coef", "gamma", "gae_lambda", "whiten_advantages", "kl_estimator", "kl_in", "target_kl",
            "kl_horizon", "reward_clip", "normalize_rewards", "missing_eos_penalty", "critic", "value_model",
            "loss_aggregation", "ptx_data", "ptx_coef", "ptx_length"),
    "grpo": ("reward_feature", "grpo_loss", "scale_rewards", "grpo_iterations", "grpo_minibatches", "clip_range",
             "epsilon_high", "grpo_delta", "importance_sampling", "kl_coef", "kl_ratio_correction"),
    "dpo": (*_PAIRS_FROM_TASK, *_PAIR_LOSS, *_OFFLINE_DATA, "preference_loss_weights", "simpo_gamma", "nll_coef"),
    "listwise": ("preferences", "truncate_pairs", *_OFFLINE_DATA, "list_loss", "nll_coef"),
    "kto": (*_PAIRS_FROM_TASK, *_OFFLINE_DATA, "kto_loss", "desirable_weight", "undesirable_weight"),
    "online_dpo": ("reward_feature", *_PAIR_LOSS),
    "sft": ("data", *_OFFLINE_DATA),
    "raft": ("reward_feature", "raft_quantile"),
}


def algorithm_specific_settings() -> set[str]:
    """Every setting some algorithm declares as its own."""
    return {name for names in ALGORITHM_SETTINGS.values() for name in names}
