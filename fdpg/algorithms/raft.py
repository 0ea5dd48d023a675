r"""RAFT: online rejection-sampling fine-tuning (Dong et al. 2023; ReST, Gulcehre et al. 2023), on the shared engine.

Each step is a likelihood step toward the best-of-:math:`k` distribution of the current policy, i.e. a forward-KL
step :math:`\nabla_\theta KL(q_k\|\pi_\theta)` (:mod:`objectives.likelihood`, where the target and its lack of an
anchor to the base model are derived):

1. draw ``batch_size / samples_per_prompt`` prompts and sample :math:`k` = ``samples_per_prompt`` completions of
   each from :math:`\pi_\theta` (the engine's rollout: the task's scores and :math:`\log a` come with them);
2. keep each prompt's best completion by the task's reward (:func:`objectives.likelihood.keep_best_of_k`), or with
   ``--raft_quantile Q`` every completion whose reward is at least the batch's Q-quantile
   (:func:`objectives.likelihood.keep_above_quantile`);
3. :math:`\mathcal L = -\frac1{|K|}\sum_{j\in K}\log\pi_\theta(y_j\mid c_j)` over the kept completions
   (:func:`objectives.likelihood.rejection_sampling_loss`), backward (micro-batched), clipped optimizer step and
   scheduler step through ``accelerate``;
4. logged: the metrics every algorithm logs over the whole batch (``score/...``, ``kl_pi_a``, ...; the
   pseudo-reward column holds 1 for a kept sample, 0 otherwise), and ``raft/kept_fraction``,
   ``raft/kept_reward`` (the kept samples' mean reward), ``raft/loss``.
"""

from __future__ import annotations

from typing import Any

import torch

from fdpg.engine import OnlineTrainer, reward_target
from fdpg.log_probs import completion_token_log_probs
from objectives import ForwardKL
from objectives.likelihood import keep_above_quantile, keep_best_of_k, rejection_sampling_loss


class RAFTTrainer(OnlineTrainer):
    """Rejection-sampling fine-tuning; see the module docstring.

    Args: those of :class:`fdpg.engine.OnlineTrainer`; the task's reward :math:`r` (of a target
    :math:`a\\,e^{r/\\beta}`, or ``--reward_feature``) ranks the samples.
    """

    algorithm = "RAFT"

    def __init__(self, config, policy, target, scorer, prompts=None, metrics_fn=None, accelerator=None,
                 **engine_options) -> None:
        if config.algo != "raft":
            raise ValueError(f"RAFTTrainer needs --algo raft, got {config.algo!r}")
        self.reward_feature = reward_target(target, config.reward_feature, config.beta, algo="raft").energies[0].reward
        super().__init__(config, policy, target, scorer, prompts, metrics_fn, accelerator, **engine_options)
        if config.raft_quantile is None and config.samples_per_prompt < 2:
            raise ValueError("--algo raft keeps the best of --samples_per_prompt completions per prompt: give it at "
                             "least 2 (or --raft_quantile Q to keep the top of the batch)")
        self.divergence = ForwardKL()  # each step: KL(q_k || pi_theta), q_k the best-of-k distribution of pi

    def kept(self, g_scores: torch.Tensor) -> torch.Tensor:
        """``[B]`` boolean: the samples of the global batch RAFT learns from."""
        cfg = self.config
        if cfg.raft_quantile is not None:
            return keep_above_quantile(g_scores, cfg.raft_quantile)
        return keep_best_of_k(g_scores.view(-1, cfg.samples_per_prompt)).view(-1)

    def train_step(self, step: int) -> dict[str, Any]:
        """Run optimisation step ``step`` (0-based) and return its metrics."""
        acc = self.accelerator
        started = self.begin_step()
        batch, features, token_log_a = self.rollout(step)  # samples, scores, log a per token

        with self.timed("bookkeeping"):
            log_a, log_pi = token_log_a.sum(-1), batch.log_pi.double()
            g_keys = self.gather_list(self.prompt_keys(batch.prompts))
            g_log_P, g_log_pi, g_log_a = (self.gather(x) for x in (self.target.log_P(log_a, features), log_pi,
                                                                    log_a))
            g_features = {k: self.gather(v) for k, v in features.items()}
            g_log_p = self.update_log_z(g_log_P, g_log_pi, g_keys)
            g_scores = g_features[self.reward_feature].double()
            g_keep = self.kept(g_scores)
            n_kept = int(g_keep.sum())
            metrics = self.shared_metrics(step, batch, self.divergence, g_features, g_log_pi, g_log_pi, g_log_a,
                                          g_log_p, g_keep.double())
            metrics.update({"raft/kept_fraction": n_kept / len(g_keep),
                            "raft/kept_reward": float(g_scores[g_keep].mean())})
            keep = g_keep[self.local_slice()]

        world = acc.num_processes
        loss_sum = 0.0
        with self.timed("backward"):
            for rows, sync in self.accumulation(range(len(batch))):
                lo, hi = rows.start, rows.stop
                part_keep = keep[lo:hi]
                with sync, acc.autocast():
                    seq_log_pi = completion_token_log_probs(self.model, batch.slice(lo, hi)).sum(-1)
                    # each process's share of the global mean over kept samples (DDP averages over processes)
                    loss = rejection_sampling_loss(seq_log_pi, part_keep.to(seq_log_pi.device), n_kept=n_kept / world)
                    acc.backward(loss)
                loss_sum += float(loss.detach()) / world

        with self.timed("optimizer"):
            lr = self.scheduler.get_last_lr()[0]
            grad_norm = self.optimizer_step()
            self.scheduler.step()
        metrics.update({"raft/loss": float(self.gather(torch.tensor([loss_sum], dtype=torch.float64)).sum()),
                        "lr": lr, "grad_norm": grad_norm})
        return self.finish_metrics(metrics, started)
