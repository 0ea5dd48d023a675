r"""GRPO (Shao et al. 2024) and its variants (Dr. GRPO, DAPO, GSPO, CISPO) on the shared engine.

The critic-free online baseline: the same sampling, scoring, reference pass, run directory, checkpoints and metric
names as f-DPG and PPO (:class:`fdpg.engine.OnlineTrainer`), the inner loop of PPO
(:meth:`~fdpg.engine.OnlineTrainer.minibatch_updates`), and its own advantage and loss (:mod:`objectives.grpo`, which
also gives its f-DPG reading). One step:

1. for each of ``batch_size / samples_per_prompt`` prompts, :math:`G` = ``samples_per_prompt`` completions from
   :math:`\pi_{old} = \pi_\theta`, recording :math:`\log\pi_{old}` per token;
2. score them with the task (the reward feature :math:`r`), and :math:`\log a` per token from the reference;
3. the group-relative advantage :math:`\hat A_i = (r_i - \bar r_{g(i)})/(\sigma + 10^{-4})` over the global batch
   (``--scale_rewards`` group, batch or none), the same for every token of :math:`y_i`;
4. ``grpo_iterations`` passes of ``grpo_minibatches`` shuffled minibatches, one optimizer step each: the clipped
   surrogate (token or sequence ratio, ``--epsilon_high``, ``--grpo_delta``) plus ``kl_coef`` times the k3 KL to the
   reference, aggregated per ``--grpo_loss``;
5. the scheduler steps once per step.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch

from fdpg.engine import OnlineTrainer, reward_target
from fdpg.log_probs import completion_token_log_probs
from fdpg.sampling import SampleBatch
from objectives import ReverseKL
from objectives.grpo import aggregate, group_advantages, per_token_loss
from objectives.rl import kl_per_token, masked_mean


class GRPOTrainer(OnlineTrainer):
    """GRPO with group-relative advantages, no critic; see the module docstring.

    Args: those of :class:`fdpg.engine.OnlineTrainer`; ``target`` must be :math:`a\\,e^{r/\\beta}`
    (:func:`fdpg.engine.reward_target`), its feature :math:`r` is the reward.
    """

    algorithm = "GRPO"

    def __init__(self, config, policy, target, scorer, prompts=None, metrics_fn=None, accelerator=None,
                 **engine_options) -> None:
        if config.algo != "grpo":
            raise ValueError(f"GRPOTrainer needs --algo grpo, got {config.algo!r}")
        target = reward_target(target, None, config.beta, algo="grpo")
        self.reward_feature = target.energies[0].reward
        super().__init__(config, policy, target, scorer, prompts, metrics_fn, accelerator, **engine_options)
        if self.local_batch % config.grpo_minibatches:
            raise ValueError(f"--grpo_minibatches ({config.grpo_minibatches}) must divide each process's share of "
                             f"the batch ({self.local_batch})")
        self.divergence = ReverseKL()  # d_f of the shared metrics: KL(pi||p) for p = a exp(r/beta)

    def algorithm_state(self) -> dict[str, Any]:
        return {"log_z": self.log_z.state_dict()}

    def load_algorithm_state(self, state: Mapping[str, Any]) -> None:
        self.log_z.load_state_dict(state["log_z"])

    def train_step(self, step: int) -> dict[str, Any]:
        """Run optimisation step ``step`` (0-based) and return its metrics."""
        cfg = self.config
        started = self.begin_step()
        batch, features, token_log_a = self.rollout(step)  # samples, scores, log a per token

        with self.timed("bookkeeping"):
            token_log_old = batch.token_log_pi.double()
            g_rewards = self.gather(features[self.reward_feature].double())
            g_advantages = group_advantages(g_rewards, cfg.samples_per_prompt, cfg.scale_rewards)
            advantages = g_advantages[self.local_slice()]
            # dapo's normaliser: the generation batch's tokens per optimizer step and process (TRL's).
            g_tokens = float(self.gather(batch.completion_mask.sum().double().reshape(1)).sum())
            tokens_per_update = g_tokens / (self.accelerator.num_processes * cfg.grpo_minibatches)

            # The shared metrics over the global batch (the same names as f-DPG's), before the weights move.
            log_pi, log_a = token_log_old.sum(-1), token_log_a.sum(-1)
            g_keys = self.gather_list(self.prompt_keys(batch.prompts))
            g_log_P, g_log_pi, g_log_a = (self.gather(x) for x in (self.target.log_P(log_a, features), log_pi,
                                                                    log_a))
            g_features = {k: self.gather(v) for k, v in features.items()}
            g_log_p = self.update_log_z(g_log_P, g_log_pi, g_keys)
            metrics = self.shared_metrics(step, batch, self.divergence, g_features, g_log_pi, g_log_pi, g_log_a,
                                          g_log_p, g_advantages)
            groups = g_rewards.reshape(-1, cfg.samples_per_prompt)
            metrics.update({
                "grpo/reward_mean": float(g_rewards.mean()),
                "grpo/reward_std_in_group": float(groups.std(-1).mean()),
                "grpo/zero_std_fraction": float((groups.std(-1) == 0).double().mean()),
                "grpo/advantage_abs_mean": float(g_advantages.abs().mean()),
            })

        lr = self.scheduler.get_last_lr()[0]
        stats = self.optimise(step, batch, token_log_old, token_log_a, advantages, tokens_per_update)
        self.scheduler.step()
        metrics.update({"lr": lr, **stats})
        return self.finish_metrics(metrics, started)

    def optimise(self, step: int, batch: SampleBatch, old_log_pi: torch.Tensor, log_a: torch.Tensor,
                 advantages: torch.Tensor, tokens_per_update: float) -> dict[str, float]:
        """The passes of shuffled minibatches (:meth:`~fdpg.engine.OnlineTrainer.minibatch_updates`); each loss
        statistic's mean over the optimizer steps."""
        cfg = self.config
        size = self.local_batch // cfg.grpo_minibatches
        n_micro = math.ceil(size / cfg.micro_batch_size)

        def minibatch_loss(rows, index) -> tuple[torch.Tensor, dict[str, float]]:
            part = batch.rows(rows)
            w = part.completion_ids.shape[1]
            token_log_pi = completion_token_log_probs(self.model, part).double()
            device = token_log_pi.device
            mask = part.completion_mask.to(device)
            old, ref, adv = old_log_pi[rows, :w].to(device), log_a[rows, :w].to(device), advantages[rows].to(device)
            if self.first_epoch and not self.generator.exact_policy:
                self.note_proposal_gap((old * mask).sum(-1), (token_log_pi * mask).sum(-1))
            loss_per_token, ratio = per_token_loss(token_log_pi, old, adv, mask, cfg.grpo_loss, cfg.clip_range,
                                                   cfg.epsilon_high, cfg.grpo_delta, cfg.importance_sampling, ref,
                                                   cfg.kl_coef, cfg.kl_ratio_correction)
            loss = aggregate(loss_per_token, mask, cfg.grpo_loss, size, tokens_per_update, cfg.max_new_tokens,
                             n_micro)
            high = cfg.clip_range if cfg.epsilon_high is None else cfg.epsilon_high
            adv = adv.reshape(-1, 1)
            clipped = ((ratio < 1 - cfg.clip_range) & (adv < 0)) | ((ratio > 1 + high) & (adv > 0))
            share = float(mask.sum() / batch.completion_mask[index].sum().clamp(min=1))
            kl = kl_per_token(token_log_pi.detach(), ref, "k3")
            return loss, {"grpo/loss": float(loss.detach()),
                          "grpo/clip_fraction": float(masked_mean(clipped.expand_as(mask).double(), mask)) * share,
                          "grpo/kl_k3": float(masked_mean(kl, mask)) * share}

        return self.minibatch_updates(step, cfg.grpo_iterations, cfg.grpo_minibatches, minibatch_loss)
