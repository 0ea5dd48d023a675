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
   clip, optimizer and scheduler step, all through ``accelerate``; with ``--token_credit`` (reverse KL, a causal
   fine-grained reward) each token's log-probability is weighted by its reward-to-go instead,
   :math:`\mathcal L = -\frac1n\sum_j\sum_t (G_{jt} - b_{jt})\log\pi_\theta(y_{jt}\mid c, y_{j,<t})` with
   :math:`G_{jt} = \sum_{t'\ge t}(r_{jt'}/\beta - \log\frac{\pi}{a}(y_{jt'}))`
   (:func:`objectives.fine_grained.reward_to_go`) and :math:`b_{jt}` the baseline of the other samples' :math:`G`
   at position t (:func:`objectives.estimators.token_baseline`): the same expected gradient, lower variance;
6. metrics to ``metrics.jsonl``, samples to ``samples.jsonl``; checkpoints every ``save_every`` steps.
"""

from __future__ import annotations

from collections.abc import Mapping
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
from objectives import MovingAverageBaseline, ReverseKL, batch_baseline, get_divergence, surrogate_loss
from objectives.estimators import token_baseline
from objectives.fine_grained import reward_to_go


class FDPGTrainer(OnlineTrainer):
    """Trains ``policy`` toward ``target`` by f-divergence minimisation; see the module docstring.

    Args: those of :class:`fdpg.engine.OnlineTrainer`.
    """

    algorithm = "f-DPG"

    def __init__(self, config, policy, target, scorer, prompts=None, metrics_fn=None, accelerator=None,
                 **engine_options) -> None:
        super().__init__(config, policy, target, scorer, prompts, metrics_fn, accelerator, **engine_options)
        self.divergence = get_divergence(config.divergence)
        self.moving_baseline = MovingAverageBaseline(config.baseline_decay)
        if config.token_credit:
            self._check_token_credit()
        if config.off_policy:
            self.proposal = {k: v.detach().clone() for k, v in self._policy_trainable().items()}
        #: Under mixed precision the backward takes the pseudo-rewards and pi/q from the training forward's own
        #: log pi, not the sampling pass's (:meth:`rewards_and_weights`).
        #: So too where another engine samples (vLLM: :mod:`fdpg.vllm_generation`).
        self.rewards_from_forward = config.mixed_precision != "no" or not self.generator.exact_policy

    def rewards_and_weights(self, log_pi: torch.Tensor, log_p: torch.Tensor,
                            log_q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        r"""The pseudo-rewards :math:`R_j = -f'(\pi_j/p_j)` and importance weights :math:`w_j = \pi_j/q_j`
        (clipped at ``--importance_weight_clip``), :math:`q` the distribution the samples came from.

        For the batch, :math:`\log\pi_j` is the sampling pass's (or, off-policy, a pass of the current weights).
        Under mixed precision each micro-batch's are recomputed from the training forward's own
        :math:`\log\pi_j`, the function that is differentiated: under bf16 the KV-cached decode and the full
        forward round differently (per sequence 0.04-0.32 nats on SmolLM2-135M, ``bench/bf16_error.py``), so
        :math:`q \ne \pi_\theta`, and taking both from the sampling pass would estimate the gradient of another
        policy's divergence. With them the estimate :math:`E_q[w (R - b)\nabla\log\pi_\theta]` is that of
        :math:`D_f(\pi_\theta\|p)` for the policy trained; the baseline :math:`b_j` (the other samples' rewards,
        from the sampling pass) does not depend on sample j, so it adds no bias."""
        cfg = self.config
        rewards = self.divergence.pseudo_reward(log_pi, log_p, max_log_ratio=cfg.max_log_ratio)
        weights = torch.exp(log_pi - log_q)
        if cfg.importance_weight_clip is not None:
            weights = weights.clamp(max=cfg.importance_weight_clip)
        return rewards, weights

    def _check_token_credit(self) -> None:
        """Token-level credit needs per-token rewards, reverse KL, and components that read no later text."""
        if self.fine_grained is None:
            raise ValueError("--token_credit weights each token by its reward-to-go, which needs a task with a "
                             "fine-grained reward (e.g. --task toxicity --task_args granularity=sentence)")
        if not isinstance(self.divergence, ReverseKL):
            raise ValueError(f"--token_credit is the reverse-KL pseudo-reward split over tokens; --divergence "
                             f"{self.config.divergence} has no such split: drop one of them")
        lagging = [c.name for c in self.fine_grained.components if not c.causal]
        if lagging:
            raise ValueError(f"--token_credit is unbiased only when every segment reward depends on the text up to "
                             f"its segment's end; component(s) {lagging} are declared non-causal (they read later "
                             "text), so their reward-to-go would bias the gradient. Drop --token_credit (the "
                             "sequence-level estimate is right for them)")

    def token_credit_weights(self, batch, token_log_a: torch.Tensor, g_keys: list) -> torch.Tensor:
        """``[B, T]`` this process's :math:`G_{jt} - b_{jt}` (module docstring), over the global batch's baseline."""
        cfg = self.config
        log_ratio = batch.token_log_pi.double() - token_log_a
        to_go = reward_to_go(self.dense_rewards, log_ratio, batch.completion_mask, cfg.beta)
        g_to_go = self.gather_tokens(to_go)
        weights = g_to_go - token_baseline(g_to_go, cfg.baseline, g_keys)
        return weights[self.local_slice(), :to_go.shape[1]]

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
            g_rewards, g_weights = self.rewards_and_weights(g_log_pi, g_log_p, g_log_q)
            g_baseline = self._baseline(g_rewards, g_keys)
            refresh = False
            if self.proposal is not None:  # DPG: keep the proposal until pi is closer to p than it is
                d_pi = float(self.divergence.estimate(g_log_pi, g_log_p, g_log_q))
                d_q = float(self.divergence.estimate(g_log_q, g_log_p))
                refresh = d_pi < d_q
                if refresh:
                    self.proposal = {k: v.detach().clone() for k, v in self._policy_trainable().items()}
            local = self.local_slice()
            rewards, baseline, weights = g_rewards[local], g_baseline[local], g_weights[local]
            log_p, log_q_local = g_log_p[local], g_log_q[local]
            token_weights = self.token_credit_weights(batch, token_log_a, g_keys) if cfg.token_credit else None
            metrics = self.shared_metrics(step, batch, self.divergence, g_features, g_log_pi, g_log_q, g_log_a,
                                          g_log_p, g_rewards)

        with self.timed("backward"):
            for rows, sync in self.accumulation(range(len(batch))):
                lo, hi = rows.start, rows.stop
                part = batch.slice(lo, hi)
                with sync, acc.autocast():
                    if token_weights is not None:  # reward-to-go per token (on-policy, reverse KL)
                        token_log_pi = completion_token_log_probs(self.model, part)
                        w = token_weights[lo:hi, :token_log_pi.shape[1]].to(token_log_pi)
                        loss = -(w * token_log_pi).sum() / self.local_batch
                    else:
                        log_pi = completion_token_log_probs(self.model, part).sum(-1)
                        if self.rewards_from_forward:
                            self.note_proposal_gap(log_q_local[lo:hi], log_pi)
                            r, w = self.rewards_and_weights(log_pi.detach().double().cpu(), log_p[lo:hi],
                                                            log_q_local[lo:hi])
                        else:
                            r, w = rewards[lo:hi], weights[lo:hi] if cfg.proposal_differs else None
                        loss = surrogate_loss(log_pi, r.to(log_pi.device), baseline[lo:hi].to(log_pi.device),
                                              None if w is None else w.to(log_pi.device),
                                              normaliser=self.local_batch)
                    acc.backward(loss)

        with self.timed("optimizer"):
            lr = self.scheduler.get_last_lr()[0]
            grad_norm = self.optimizer_step()
            self.scheduler.step()

        metrics.update({"lr": lr, "grad_norm": grad_norm, "proposal_refreshed": refresh})
        return self.finish_metrics(metrics, started)
