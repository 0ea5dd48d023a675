r"""f-DPG: minimise :math:`D_f(\pi_\theta\|p)` toward any energy-based target, on the shared engine.

One step (Go et al. 2023, Algorithm 1, with the DPG/CDPG machinery of Khalifa et al. 2021 and
Korbak et al. 2022); the phases come from :class:`fdpg.engine.OnlineTrainer`:

1. draw prompts :math:`c` and sample :math:`x \sim q(\cdot\mid c)` (:math:`q = \pi_\theta` on-policy);
2. score: the task's features, and :math:`\log a(x\mid c)` from the reference in one no-grad pass;
3. :math:`\log P = \log a + \sum_k\log\Phi_k`, update :math:`\log Z` (per prompt when conditional)
   with :math:`\log w = \log P - \log q` gathered over all processes;
4. pseudo-rewards :math:`R = -f'(\pi/p)` with :math:`\log t = \log\pi - \log P + \log Z`, a baseline
   over the global batch, importance weights :math:`\pi/q`;
5. :math:`\mathcal L = -\frac1n\sum_j w_j(R_j - b_j)\log\pi_\theta(x_j)`, backward (micro-batched),
   clip, optimizer and scheduler step, all through ``accelerate``;
6. metrics to ``metrics.jsonl``, samples to ``samples.jsonl``; checkpoints every ``save_every`` steps.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from contextlib import nullcontext
from typing import Any

import torch

from fdpg.engine import (  # noqa: F401  (re-exported: the names callers have imported from here)
    MetricsFn,
    OnlineTrainer,
    Scorer,
    StopTraining,
    cpu_bf16_is_native,
    feature_means,
)
from fdpg.log_probs import completion_token_log_probs
from objectives import MovingAverageBaseline, batch_baseline, get_divergence, surrogate_loss


class FDPGTrainer(OnlineTrainer):
    """Trains ``policy`` toward ``target`` by f-divergence minimisation; see the module docstring.

    Args: those of :class:`fdpg.engine.OnlineTrainer`.
    """

    algorithm = "f-DPG"

    def __init__(self, config, policy, target, scorer, prompts=None, metrics_fn=None, accelerator=None) -> None:
        super().__init__(config, policy, target, scorer, prompts, metrics_fn, accelerator)
        self.divergence = get_divergence(config.divergence)
        self.moving_baseline = MovingAverageBaseline(config.baseline_decay)
        if config.off_policy:
            self.proposal = {k: v.detach().clone() for k, v in self._policy_trainable().items()}

    def algorithm_state(self) -> dict[str, Any]:
        return {"log_z": self.log_z.state_dict(), "moving_baseline": self.moving_baseline.state_dict()}

    def load_algorithm_state(self, state: Mapping[str, Any]) -> None:
        self.log_z.load_state_dict(state["log_z"])
        self.moving_baseline.load_state_dict(state["moving_baseline"])

    def _baseline(self, rewards: torch.Tensor, keys: list[str]) -> torch.Tensor:
        if self.config.baseline == "moving_average":
            return self.moving_baseline(rewards)
        return batch_baseline(rewards, self.config.baseline, keys)

    def train_step(self, step: int) -> dict[str, Any]:
        """Run optimisation step ``step`` (0-based) and return its metrics."""
        cfg, acc = self.config, self.accelerator
        started = self.begin_step()
        batch, features, token_log_a = self.rollout(step)  # samples, scores, log a per token

        with self.timed("bookkeeping"):
            log_a = token_log_a.sum(-1)
            log_q = batch.log_q.double()
            log_pi_now = self.sequence_log_probs(batch, reference=False) if self.proposal is not None \
                else batch.log_pi.double()
            log_P = self.target.log_P(log_a, features)

            # Everything below is over the global batch, identical on every process.
            g_keys = self.gather_list(self.prompt_keys(batch.prompts))
            g_log_P, g_log_q, g_log_pi, g_log_a = (self.gather(x) for x in (log_P, log_q, log_pi_now, log_a))
            g_features = {k: self.gather(v) for k, v in features.items()}
            g_log_p = self.update_log_z(g_log_P, g_log_q, g_keys)
            g_rewards = self.divergence.pseudo_reward(g_log_pi, g_log_p, max_log_ratio=cfg.max_log_ratio)
            g_baseline = self._baseline(g_rewards, g_keys)
            g_weights = torch.exp(g_log_pi - g_log_q)
            if cfg.importance_weight_clip is not None:
                g_weights = g_weights.clamp(max=cfg.importance_weight_clip)
            refresh = False
            if self.proposal is not None:  # DPG: keep the proposal until pi is closer to p than it is
                d_pi = float(self.divergence.estimate(g_log_pi, g_log_p, g_log_q))
                d_q = float(self.divergence.estimate(g_log_q, g_log_p))
                refresh = d_pi < d_q
                if refresh:
                    self.proposal = {k: v.detach().clone() for k, v in self._policy_trainable().items()}
            local = self.local_slice()
            rewards, baseline, weights = g_rewards[local], g_baseline[local], g_weights[local]
            metrics = self.shared_metrics(step, batch, self.divergence, g_features, g_log_pi, g_log_q, g_log_a,
                                          g_log_p, g_rewards)

        with self.timed("backward"):
            n_micro = math.ceil(len(batch) / cfg.micro_batch_size)
            for i in range(n_micro):
                lo, hi = i * cfg.micro_batch_size, (i + 1) * cfg.micro_batch_size
                part = batch.slice(lo, hi)
                sync = nullcontext() if i == n_micro - 1 else acc.no_sync(self.model)
                with sync, acc.autocast():
                    log_pi = completion_token_log_probs(self.model, part).sum(-1)
                    loss = surrogate_loss(log_pi, rewards[lo:hi].to(log_pi.device),
                                          baseline[lo:hi].to(log_pi.device),
                                          weights[lo:hi].to(log_pi.device) if cfg.proposal_differs else None,
                                          normaliser=self.local_batch)
                    acc.backward(loss)

        with self.timed("optimizer"):
            lr = self.scheduler.get_last_lr()[0]
            grad_norm = self.optimizer_step()
            self.scheduler.step()

        metrics.update({"lr": lr, "grad_norm": grad_norm, "proposal_refreshed": refresh})
        return self.finish_metrics(metrics, started)
