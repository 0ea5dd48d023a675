r"""PPO for language models (Schulman et al. 2017; Ziegler et al. 2019; InstructGPT, Ouyang et al. 2022).

The RLHF baseline on the shared engine (:class:`fdpg.engine.OnlineTrainer`): the same sampling, scoring,
reference pass, run directory, checkpoints and metric names as f-DPG. It maximises
:math:`E_\pi[r] - \beta\,KL(\pi\|a)`, i.e. minimises :math:`\beta\,KL(\pi\|p)` for :math:`p\propto a\,e^{r/\beta}`
(the f-DPG reverse-KL target; :mod:`objectives.rl` gives the exact correspondence). One step:

1. sample completions from :math:`\pi_{old} = \pi_\theta`, recording :math:`\log\pi_{old}(y_t\mid s_t)` per token;
2. score them with the task (the reward feature :math:`r`), and :math:`\log a(y_t\mid s_t)` from the reference;
3. the critic's values :math:`V_{old}(s_t)`: the value head (on the policy's backbone, the default) applied to the
   hidden states that sampling computed (the weights are those of :math:`\pi_{old}`), or one no-grad pass of a
   separate value model;
4. per-token rewards: :math:`r` on each completion's last real token (after the optional EOS penalty, running
   normalisation and clipping), or the task's fine-grained segment rewards on the tokens that end the segments,
   minus :math:`\beta\,\widehat{KL}_t` (k1, k2 or k3; or the KL in the loss instead);
5. GAE(:math:`\gamma, \lambda`) advantages and returns, advantages whitened over the global batch;
6. ``ppo_epochs`` epochs of ``ppo_minibatches`` shuffled minibatches: the clipped surrogate (optionally
   dual-clipped), plus ``vf_coef`` times the clipped value loss, minus ``entropy_coef`` times the entropy,
   aggregated per ``loss_aggregation``; one optimizer step per minibatch (micro-batched backward);
7. the adaptive KL controller sees the batch's KL; the scheduler steps once per step.

PPO-ptx (InstructGPT): with ``--ptx_data TEXT --ptx_coef G`` every minibatch's loss also has
:math:`G\cdot\mathcal L_{LM}`, the language-modelling loss (:func:`objectives.likelihood.completion_nll`) of as many
pieces of pretraining text as the minibatch has sequences (:func:`fdpg.demonstrations.load_text_pieces`, drawn epoch
after epoch of seeded permutations), so that the policy keeps the pretraining distribution's likelihood while it
maximises the reward.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

import torch

from fdpg.critic import ValueHead, ValueModel, hidden_size_of
from fdpg.engine import EpochBatches, OnlineTrainer, reward_target  # noqa: F401  (reward_target re-exported)
from fdpg.log_probs import completion_token_log_probs, token_entropy
from fdpg.sampling import SampleBatch, eos_token_ids
from objectives import ReverseKL
from objectives.likelihood import completion_nll
from objectives.rl import (
    AdaptiveKLController,
    FixedKLController,
    RunningMoments,
    aggregate,
    clipped_policy_loss,
    clipped_value_loss,
    explained_variance,
    generalized_advantages,
    kl_per_token,
    last_token_index,
    masked_mean,
    masked_whiten,
    place_on_last_token,
)


class PPOTrainer(OnlineTrainer):
    """PPO with a critic, GAE and the KL penalty toward the reference; see the module docstring.

    Args: those of :class:`fdpg.engine.OnlineTrainer`; ``target`` must be :math:`a\\,e^{r/\\beta}`
    (:func:`reward_target`), its feature :math:`r` is the reward.
    """

    algorithm = "PPO"

    def __init__(self, config, policy, target, scorer, prompts=None, metrics_fn=None, accelerator=None,
                 **engine_options) -> None:
        if config.algo != "ppo":
            raise ValueError(f"PPOTrainer needs --algo ppo, got {config.algo!r}")
        target = reward_target(target, None, config.beta)
        self.reward_feature = target.energies[0].reward
        super().__init__(config, policy, target, scorer, prompts, metrics_fn, accelerator, **engine_options)
        if self.local_batch % config.ppo_minibatches:
            raise ValueError(f"--ppo_minibatches ({config.ppo_minibatches}) must divide each process's share of the "
                             f"batch ({self.local_batch})")
        self.divergence = ReverseKL()  # d_f of the shared metrics: KL(pi||p), the objective PPO minimises
        self.kl_controller = (AdaptiveKLController(config.beta, config.target_kl, config.kl_horizon)
                              if config.target_kl is not None else FixedKLController(config.beta))
        self.reward_moments = RunningMoments()
        self.eos_ids = eos_token_ids(self._unwrapped(), policy.tokenizer)
        # A value head on the policy reads the hidden states sampling computes anyway: no old-values pass.
        self.record_hidden = config.critic == "policy_head"
        self.ptx = None
        if config.ptx_data is not None:
            from fdpg.demonstrations import load_text_pieces

            self.ptx = load_text_pieces(config.ptx_data, policy.tokenizer, config.ptx_length)
            size = self.local_batch // config.ppo_minibatches * self.accelerator.num_processes
            if len(self.ptx) < size:
                raise ValueError(f"--ptx_data {config.ptx_data}: {len(self.ptx)} pieces of {config.ptx_length} tokens "
                                 f"are fewer than a minibatch ({size}); give more text or a smaller --ptx_length")
            self.ptx_batches = EpochBatches(list(range(len(self.ptx))), size, config.seed + 7)

    # ------------------------------------------------------------------ the critic and the state
    def build_extra_modules(self) -> dict[str, torch.nn.Module]:
        cfg = self.config
        if cfg.critic == "policy_head":
            return {"value_head": ValueHead(hidden_size_of(self.policy.model))}
        if cfg.critic.startswith("reward_model:"):
            return {"value_model": ValueModel.from_reward_model(cfg.critic.split(":", 1)[1], self.policy.tokenizer)}
        if cfg.critic == "value_model":
            return {"value_model": ValueModel.from_pretrained(cfg.value_model, self.policy.tokenizer,
                                                              cfg.trust_remote_code)}
        return {}

    def algorithm_state(self) -> dict[str, Any]:
        return {"log_z": self.log_z.state_dict(), "kl_controller": self.kl_controller.state_dict(),
                "reward_moments": self.reward_moments.state_dict()}

    def load_algorithm_state(self, state: Mapping[str, Any]) -> None:
        self.log_z.load_state_dict(state["log_z"])
        self.kl_controller.load_state_dict(state["kl_controller"])
        self.reward_moments.load_state_dict(state["reward_moments"])

    def _forward(self, part: SampleBatch, need_hidden: bool) -> tuple[torch.Tensor, torch.Tensor | None,
                                                                       torch.Tensor | None]:
        """Per-token log pi, values (``None`` without a critic) and hidden states (when needed) of ``part``."""
        critic = self.config.critic
        hidden = None
        if critic == "policy_head" or need_hidden:
            token_log_pi, hidden = completion_token_log_probs(self.model, part, return_hidden=True)
        else:
            token_log_pi = completion_token_log_probs(self.model, part)
        values = None
        if critic == "policy_head":
            values = self.extra_modules["value_head"](hidden) * part.completion_mask
        elif "value_model" in self.extra_modules:  # --critic value_model or reward_model:RUN
            values = self.extra_modules["value_model"](part)
        return token_log_pi, values, hidden

    @torch.no_grad()
    def old_values(self, batch: SampleBatch) -> torch.Tensor:
        """``[B, T]`` float64 :math:`V_{old}(s_t)` before the update (zeros without a critic): the value head of the
        sampling pass's hidden states (:attr:`SampleBatch.final_hidden`) when they were recorded, else a forward."""
        if self.config.critic == "none":
            return torch.zeros(batch.completion_mask.shape, dtype=torch.float64)
        if batch.final_hidden is not None:
            head = self.extra_modules["value_head"]
            device = next(head.parameters()).device
            with self.accelerator.autocast():
                values = head(batch.final_hidden.to(device)) * batch.completion_mask.to(device)
            return values.double().cpu()
        out = []
        width = batch.completion_ids.shape[1]
        with self.accelerator.autocast():
            for lo in range(0, len(batch), self.config.micro_batch_size):
                part = batch.slice(lo, lo + self.config.micro_batch_size)
                values = self._forward(part, need_hidden=False)[1]
                out.append(torch.nn.functional.pad(values.double(), (0, width - values.shape[1])))
        return torch.cat(out).cpu()

    # ------------------------------------------------------------------ rewards and advantages
    def sequence_rewards(self, batch: SampleBatch, scores: torch.Tensor) -> torch.Tensor:
        """The task's reward after the EOS penalty, running normalisation and clipping (in that order)."""
        cfg = self.config
        scores = scores.double().clone()
        if cfg.missing_eos_penalty is not None:
            last = batch.completion_ids[torch.arange(len(batch)), last_token_index(batch.completion_mask)]
            ended = torch.isin(last, torch.tensor(self.eos_ids)) & (batch.lengths > 0)
            scores = scores - cfg.missing_eos_penalty * (~ended).double()
        if cfg.normalize_rewards:
            self.reward_moments.update(self.gather(scores))
            scores = (scores - self.reward_moments.mean) / self.reward_moments.std
        if cfg.reward_clip is not None:
            scores = scores.clamp(-cfg.reward_clip, cfg.reward_clip)
        return scores

    def token_scores(self, batch: SampleBatch, scores: torch.Tensor, raw: torch.Tensor) -> torch.Tensor:
        """``[B, T]`` the task's reward per token: on each completion's last real token; with a fine-grained reward
        (the task's per-token reward vector) its segment rewards, and what the EOS penalty, normalisation and
        clipping changed in the sequence's total (``scores - raw``) on the last real token."""
        if self.dense_rewards is not None and self.fine_grained_feature == self.reward_feature:
            return self.dense_rewards + place_on_last_token(scores - raw.double(), batch.completion_mask)
        return place_on_last_token(scores, batch.completion_mask)

    def global_moments(self, x: torch.Tensor, mask: torch.Tensor) -> tuple[float, float]:
        """Mean and unbiased variance of ``x`` over the real tokens of every process."""
        sums = self.gather(torch.stack([(x * mask).sum(), (x * x * mask).sum(), mask.sum()]).reshape(1, 3)).sum(0)
        s, s2, n = (float(v) for v in sums)
        mean = s / max(n, 1.0)
        return mean, max(s2 - n * mean * mean, 0.0) / max(n - 1, 1.0)

    # ------------------------------------------------------------------ one step
    def train_step(self, step: int) -> dict[str, Any]:
        """Run optimisation step ``step`` (0-based) and return its metrics."""
        cfg = self.config
        started = self.begin_step()
        batch, features, token_log_a = self.rollout(step)  # samples, scores, log a per token
        with self.timed("values"):
            old_values = self.old_values(batch)
        batch = dataclasses.replace(batch, final_hidden=None)  # read; not carried into the minibatches

        with self.timed("bookkeeping"):
            mask = batch.completion_mask.double()
            token_log_old = batch.token_log_pi.double()
            scores = self.sequence_rewards(batch, features[self.reward_feature])
            beta = self.kl_controller.value
            kl = kl_per_token(token_log_old, token_log_a, cfg.kl_estimator) * mask
            token_rewards = self.token_scores(batch, scores, features[self.reward_feature])
            if cfg.kl_in == "reward":
                token_rewards = token_rewards - beta * kl
            advantages, returns = generalized_advantages(token_rewards, old_values, mask, cfg.gamma, cfg.gae_lambda)
            raw_advantages = advantages
            if cfg.whiten_advantages:
                advantages = masked_whiten(advantages, mask, moments=self.global_moments(advantages, mask))

            # The shared metrics over the global batch (the same names as f-DPG's), before the weights move.
            log_pi, log_a = token_log_old.sum(-1), token_log_a.sum(-1)
            g_keys = self.gather_list(self.prompt_keys(batch.prompts))
            g_log_P, g_log_pi, g_log_a = (self.gather(x) for x in (self.target.log_P(log_a, features), log_pi,
                                                                    log_a))
            g_features = {k: self.gather(v) for k, v in features.items()}
            g_log_p = self.update_log_z(g_log_P, g_log_pi, g_keys)
            g_total = self.gather(token_rewards.sum(-1))
            metrics = self.shared_metrics(step, batch, self.divergence, g_features, g_log_pi, g_log_pi, g_log_a,
                                          g_log_p, g_total)
            return_mean, return_var = self.global_moments(returns, mask)
            advantage_mean, advantage_var = self.global_moments(raw_advantages, mask)
            metrics.update({
                "ppo/kl_coef": beta, "ppo/reward_mean": float(self.gather(scores).mean()),
                "ppo/return_mean": return_mean, "ppo/return_std": math.sqrt(return_var),
                "ppo/advantage_mean": advantage_mean, "ppo/advantage_std": math.sqrt(advantage_var),
                "ppo/explained_variance": explained_variance(old_values, returns, mask)
                if cfg.critic != "none" else None,
            })

        lr = self.scheduler.get_last_lr()[0]
        stats = self.optimise(step, batch, token_log_old, token_log_a, old_values, advantages, returns, beta)
        self.scheduler.step()
        # Ziegler et al.'s controller reads the sequence KL (k1) of the batch.
        self.kl_controller.update(float(self.gather((token_log_old - token_log_a).mul(mask).sum(-1)).mean()),
                                  cfg.batch_size)
        metrics.update({"lr": lr, **stats})
        return self.finish_metrics(metrics, started)

    def optimise(self, step: int, batch: SampleBatch, old_log_pi: torch.Tensor, log_a: torch.Tensor,
                 old_values: torch.Tensor, advantages: torch.Tensor, returns: torch.Tensor,
                 beta: float) -> dict[str, float]:
        """The epochs of shuffled minibatches (:meth:`fdpg.engine.OnlineTrainer.minibatch_updates`); each loss
        statistic's mean over the minibatches."""
        cfg = self.config
        size = self.local_batch // cfg.ppo_minibatches

        def minibatch_loss(rows, index):
            part = batch.rows(rows)
            w = part.completion_ids.shape[1]
            n_tokens = float(batch.completion_mask[index].sum())
            return self.loss(part, old_log_pi[rows, :w], log_a[rows, :w], old_values[rows, :w], advantages[rows, :w],
                             returns[rows, :w], beta, size, n_tokens)

        def ptx(epoch: int, m: int) -> dict[str, float]:
            draw = (step * cfg.ppo_epochs + epoch) * cfg.ppo_minibatches + m
            with self.timed("ptx"):
                return {"ppo/ptx_loss": self.ptx_backward(self.ptx_batches.step(draw)[self.ptx_slice()])}

        return self.minibatch_updates(step, cfg.ppo_epochs, cfg.ppo_minibatches, minibatch_loss,
                                      ptx if self.ptx is not None else None)

    def ptx_slice(self) -> slice:
        size = self.local_batch // self.config.ppo_minibatches
        return slice(self.accelerator.process_index * size, (self.accelerator.process_index + 1) * size)

    def ptx_backward(self, index: list[int]) -> float:
        """Backpropagate ``ptx_coef`` times the language-modelling loss of the pretraining pieces ``index`` (their
        token mean, micro-batched); its value."""
        cfg, acc = self.config, self.accelerator
        n_tokens = sum(len(self.ptx.completion_ids[i]) for i in index)
        total = 0.0
        for rows, sync in self.accumulation(index):
            part = self.ptx.as_batch(rows, self.policy.tokenizer.pad_token_id)
            with sync, acc.autocast():
                token_log_pi = completion_token_log_probs(self.model, part)
                nll = completion_nll(token_log_pi, part.completion_mask.to(token_log_pi.device), n_tokens=n_tokens)
                acc.backward(cfg.ptx_coef * nll)
            total += float(nll.detach())
        return total

    def loss(self, part: SampleBatch, old_log_pi: torch.Tensor, log_a: torch.Tensor, old_values: torch.Tensor,
             advantages: torch.Tensor, returns: torch.Tensor, beta: float, n_sequences: int,
             n_tokens: float) -> tuple[torch.Tensor, dict[str, float]]:
        """The PPO loss of one micro-batch (normalised over its whole minibatch) and its statistics (this
        micro-batch's share of the minibatch's: they add up over its micro-batches)."""
        cfg = self.config
        device = part.completion_ids.device
        old_log_pi, log_a, old_values, advantages, returns = (
            x.to(device) for x in (old_log_pi, log_a, old_values, advantages, returns))
        mask = part.completion_mask
        token_log_pi, values, hidden = self._forward(part, need_hidden=cfg.entropy_coef > 0)
        token_log_pi = token_log_pi.double()
        if self.first_epoch and not self.generator.exact_policy:
            gap_mask = part.completion_mask.to(token_log_pi.device)
            self.note_proposal_gap((old_log_pi * gap_mask).sum(-1), (token_log_pi * gap_mask).sum(-1))

        def reduce(per_token: torch.Tensor) -> torch.Tensor:
            return aggregate(per_token, mask, cfg.loss_aggregation, n_sequences, n_tokens)

        policy_loss, clipped = clipped_policy_loss(token_log_pi, old_log_pi, advantages, cfg.clip_range, cfg.dual_clip)
        loss = reduce(policy_loss)
        log_ratio = (token_log_pi - old_log_pi).detach()
        share = mask.sum() / n_tokens
        stats = {"ppo/policy_loss": float(reduce(policy_loss.detach())),
                 "ppo/approx_kl": float(masked_mean(torch.expm1(-log_ratio) + log_ratio, mask) * share),
                 "ppo/clip_fraction": float(masked_mean(clipped.double(), mask) * share)}
        if values is not None:
            value_loss, value_clipped = clipped_value_loss(values.double(), old_values, returns, cfg.value_clip)
            loss = loss + cfg.vf_coef * reduce(value_loss)
            stats["ppo/value_loss"] = float(reduce(value_loss.detach()))
            stats["ppo/value_clip_fraction"] = float(masked_mean(value_clipped.double(), mask) * share)
        if cfg.kl_in == "loss":
            kl = kl_per_token(token_log_pi, log_a, cfg.kl_estimator)
            loss = loss + beta * reduce(kl)
            stats["ppo/kl_loss"] = float(reduce(kl.detach()))
        if cfg.entropy_coef > 0:
            entropy = token_entropy(self._unwrapped().get_output_embeddings(), hidden, mask).double()
            loss = loss - cfg.entropy_coef * reduce(entropy)
            stats["ppo/token_entropy"] = float(masked_mean(entropy.detach(), mask) * share)
        return loss, stats
