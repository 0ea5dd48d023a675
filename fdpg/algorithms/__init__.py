r"""The algorithms, one file each, every one reading top to bottom as its algorithm over the shared engine
(:mod:`fdpg.engine`: sampling, scoring, the reference pass, the loop with signals and resume, logging) and the tensor
functions of :mod:`objectives`:

- :mod:`~fdpg.algorithms.f_dpg`: f-DPG, :math:`\min_\theta D_f(\pi_\theta\|p)` toward an energy-based target;
- :mod:`~fdpg.algorithms.ppo`: PPO with a per-token KL penalty (RLHF), PPO-ptx;
- :mod:`~fdpg.algorithms.dpo`: DPO and f-DPO from preference pairs;
- :mod:`~fdpg.algorithms.sft`: supervised fine-tuning on demonstrations;
- :mod:`~fdpg.algorithms.raft`: RAFT, online rejection-sampling fine-tuning;
- :mod:`~fdpg.algorithms.reward_model`: reward models from pairs or K-wise rankings.
"""
