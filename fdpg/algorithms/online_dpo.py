r"""Online DPO (Guo et al. 2024, "Direct language model alignment from online AI feedback"; TRL's OnlineDPOTrainer).

RLAIF with the task's scorer as the judge, on the shared engine (:class:`fdpg.engine.OnlineTrainer`): each step
samples two completions of each prompt from the *current* policy, the task's reward (the judge: a scorer, a reward
model of ``fdpg reward-model train`` through ``--task reward_model``, any feature with ``--reward_feature``) orders
them, and the preference loss of :mod:`objectives.preference` (DPO's sigmoid, or IPO, hinge, ..., f-DPO with
``--divergence``) is taken on the pairs, against the reference's log-probabilities from the rollout's reference pass.
One step:

1. for each of ``batch_size / 2`` prompts, two completions :math:`y_1, y_2 \sim \pi_\theta(\cdot\mid c)`;
2. score both (the reward :math:`r`), and :math:`\log\pi_{ref}` of both from the reference;
3. the pair :math:`(y_w, y_l)` with :math:`r(y_w) > r(y_l)`; a tie carries no preference and is dropped (weight 0);
4. the mean over the batch's untied pairs of the preference loss of
   :math:`\log\frac{\pi_\theta}{\pi_{ref}}(y_w) , \log\frac{\pi_\theta}{\pi_{ref}}(y_l)` (the policy's from a
   forward pass with gradients, micro-batched by pairs), backward, clipped optimizer step, scheduler step.

Its f-divergence reading is DPO's (:mod:`fdpg.algorithms.dpo`): on Bradley-Terry preferences of the judge's
reward, the loss is minimised at the f-DPG target :math:`p\propto\pi_{ref}e^{r/\beta}` (reverse KL; with
``--divergence`` f, :math:`f'(\pi/\pi_{ref}) = r/\beta + c`); online, the pairs come from the current policy instead
of a fixed dataset, so the preferences follow the policy, as in on-policy RL.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from fdpg.engine import OnlineTrainer, reward_target
from fdpg.log_probs import completion_token_log_probs
from objectives import get_divergence
from objectives.preference import implicit_rewards, preference_loss


class OnlineDPOTrainer(OnlineTrainer):
    """Online DPO with the task's reward as the judge; see the module docstring.

    Args: those of :class:`fdpg.engine.OnlineTrainer`; ``target`` must be :math:`a\\,e^{r/\\beta}`
    (:func:`fdpg.engine.reward_target`), its feature :math:`r` judges the pairs.
    """

    algorithm = "online DPO"

    def __init__(self, config, policy, target, scorer, prompts=None, metrics_fn=None, accelerator=None,
                 **engine_options) -> None:
        if config.algo != "online_dpo":
            raise ValueError(f"OnlineDPOTrainer needs --algo online_dpo, got {config.algo!r}")
        target = reward_target(target, None, config.beta, algo="online_dpo")
        self.reward_feature = target.energies[0].reward
        super().__init__(config, policy, target, scorer, prompts, metrics_fn, accelerator, **engine_options)
        if self.local_batch % 2:
            raise ValueError(f"each process's share of the batch ({self.local_batch}) must hold whole pairs")
        self.divergence = get_divergence(config.divergence)

    def algorithm_state(self) -> dict[str, Any]:
        return {"log_z": self.log_z.state_dict()}

    def load_algorithm_state(self, state: Mapping[str, Any]) -> None:
        self.log_z.load_state_dict(state["log_z"])

    @staticmethod
    def judge(rewards: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """For consecutive pairs of ``rewards`` (``[2n]``): the row of each pair's chosen and rejected completion
        (``[n]`` each) and whether the pair has a preference (not a tie)."""
        pairs = rewards.reshape(-1, 2)
        first_wins = pairs[:, 0] >= pairs[:, 1]
        base = torch.arange(len(pairs)) * 2
        chosen = torch.where(first_wins, base, base + 1)
        return chosen, torch.where(first_wins, base + 1, base), pairs[:, 0] != pairs[:, 1]

    def train_step(self, step: int) -> dict[str, Any]:
        """Run optimisation step ``step`` (0-based) and return its metrics."""
        cfg, acc = self.config, self.accelerator
        started = self.begin_step()
        batch, features, token_log_a = self.rollout(step)  # two completions per prompt, scores, log a per token

        with self.timed("bookkeeping"):
            rewards = features[self.reward_feature].double()
            chosen, rejected, untied = self.judge(rewards)
            n_untied = float(self.gather(untied.double().sum().reshape(1)).sum())
            normaliser = max(n_untied, 1.0) / acc.num_processes  # DDP averages: the mean over all untied pairs
            log_a = token_log_a.sum(-1)
            log_pi = batch.log_pi.double()
            g_keys = self.gather_list(self.prompt_keys(batch.prompts))
            g_log_P, g_log_pi, g_log_a = (self.gather(x) for x in (self.target.log_P(log_a, features), log_pi,
                                                                    log_a))
            g_features = {k: self.gather(v) for k, v in features.items()}
            g_log_p = self.update_log_z(g_log_P, g_log_pi, g_keys)
            metrics = self.shared_metrics(step, batch, self.divergence, g_features, g_log_pi, g_log_pi, g_log_a,
                                          g_log_p, implicit_rewards(g_log_pi - g_log_a, self.divergence, cfg.beta))

        parts = []
        lengths = batch.completion_mask.sum(-1)
        with self.timed("backward"):
            for pairs, sync in self.accumulation(list(range(len(chosen))), max(1, cfg.micro_batch_size // 2)):
                rows = torch.cat([chosen[pairs], rejected[pairs]])
                part = batch.rows(rows)
                with sync, acc.autocast():
                    seq = completion_token_log_probs(self.model, part).sum(-1).double()
                    ratio = seq - log_a[rows].to(seq.device)
                    w, lo = ratio.chunk(2)
                    losses = preference_loss(w, lo, self.divergence, cfg.beta, cfg.preference_loss,
                                             cfg.label_smoothing, lengths[chosen[pairs]].to(seq.device),
                                             lengths[rejected[pairs]].to(seq.device), length_alpha=cfg.length_alpha,
                                             positive_lambda=cfg.positive_lambda, discopop_tau=cfg.discopop_tau)
                    keep = untied[pairs].to(losses)
                    acc.backward((losses * keep).sum() / normaliser)
                parts.append((losses.detach().cpu(), w.detach().cpu(), lo.detach().cpu(), untied[pairs]))

        with self.timed("optimizer"):
            lr = self.scheduler.get_last_lr()[0]
            grad_norm = self.optimizer_step()
            self.scheduler.step()

        losses, w, lo, keep = (self.gather(torch.cat(c)) for c in zip(*parts))
        keep = keep.bool()
        r_w, r_l = (implicit_rewards(x[keep], self.divergence, cfg.beta) for x in (w, lo))
        mean = lambda x: float(x.mean()) if len(x) else None  # noqa: E731
        metrics.update({"loss": mean(losses[keep]), "rewards/chosen": mean(r_w), "rewards/rejected": mean(r_l),
                        "rewards/margins": mean(r_w - r_l), "rewards/accuracy": mean((r_w > r_l).double()),
                        "online_dpo/tie_fraction": 1.0 - float(keep.double().mean()),
                        "online_dpo/judge_margin": mean(self.gather(rewards[chosen] - rewards[rejected])[keep]),
                        "lr": lr, "grad_norm": grad_norm})
        return self.finish_metrics(metrics, started)
