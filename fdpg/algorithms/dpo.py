r"""DPO and f-DPO: offline preference optimisation (Rafailov et al. 2023; Wang et al. 2023), on the shared engine.

DPO minimises, over preference pairs :math:`(c, y_w, y_l)`, :math:`-\log\sigma\big(\beta(s(y_w) - s(y_l))\big)`
with :math:`s(y) = f'(\pi_\theta(y\mid c)/\pi_{ref}(y\mid c)) - f'(1)` (:mod:`objectives.preference`): reverse KL
gives :math:`s = \log\frac{\pi_\theta}{\pi_{ref}}` (DPO), any other divergence of :mod:`objectives` whose
:math:`f'` is strictly increasing gives f-DPO, from the same object f-DPG uses. On Bradley-Terry preferences
with reward :math:`r` it is minimised at :math:`\pi\propto\pi_{ref}\,e^{r/\beta}`, the f-DPG reverse-KL target.
The reference :math:`\pi_{ref}` is the policy's own reference (:math:`a`: the adapter disabled, or the frozen copy).

Once, before the first step (:meth:`DPOTrainer.prepare_run`): the reference's sequence log-probabilities of every
pair, stored in the run directory (``reference_log_probs.safetensors``; read back on resume), so that training
runs no reference pass. Then each step:

1. the step's ``batch_size`` training pairs: epoch after epoch of seeded permutations of the training split;
2. :math:`\log\pi_\theta(y_w\mid c)` and :math:`\log\pi_\theta(y_l\mid c)` in one forward pass per micro-batch
   (chosen and rejected rows together: ``micro_batch_size`` rows, i.e. half as many pairs), the loss averaged
   over the batch's pairs, backward (micro-batched), clipped optimizer step and scheduler step through
   ``accelerate``;
3. logged: ``loss``, the implicit rewards :math:`\beta s(y_w)` and :math:`\beta s(y_l)`
   (``rewards/chosen``, ``rewards/rejected``), their margin and the fraction of pairs ordered right
   (``rewards/accuracy``);
4. every ``eval_every`` steps (and at the first and the last): ``batch_size`` completions of the policy on the
   task's prompts, scored by the task, with the metrics f-DPG and PPO log under the same names (``score/...``,
   ``kl_pi_a``, ``kl_pi_a_exact``, ``entropy``, ``distinct_*``) so that a DPO run lands on the same Pareto plot;
   and the held-out pairs' ``heldout/loss`` and ``heldout/accuracy``.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import nullcontext
from typing import Any

import torch

from fdpg.engine import EpochBatches, OnlineTrainer
from fdpg.log_probs import completion_token_log_probs
from fdpg.preferences import TokenizedPairs, split_pairs
from objectives import get_divergence
from objectives.preference import BATCH_LOSSES, batch_preference_loss, f_dpo_problem, implicit_rewards, preference_loss
from objectives.reference_free import REFERENCE_FREE_LOSSES, chosen_nll, reference_free_pair_loss

#: The run directory's file of the reference's log-probabilities of every pair (``[N, 2]``: chosen, rejected).
REFERENCE_FILE = "reference_log_probs.safetensors"
#: Where pairs made from the task are saved in the run directory (a ``datasets`` directory, reusable as
#: ``--preferences RUN/preferences``).
PAIRS_DIR = "preferences"


class DPOTrainer(OnlineTrainer):
    """DPO / f-DPO on ``pairs``; see the module docstring.

    Args: those of :class:`fdpg.engine.OnlineTrainer` (the task's target, scorer and prompts serve the periodic
    evaluation), and
        pairs: the tokenised preference pairs (:func:`fdpg.preferences.tokenize_pairs`).
        pair_data: the ``datasets.Dataset`` of pairs made from the task, saved into the run directory (``None``
            for pairs read from elsewhere).
    """

    algorithm = "DPO"
    #: The ``--algo`` this trainer runs.
    algo_name = "dpo"

    def __init__(self, config, policy, target, scorer, prompts=None, metrics_fn=None, accelerator=None, *,
                 pairs: TokenizedPairs, pair_data=None, **engine_options) -> None:
        if config.algo != self.algo_name:
            raise ValueError(f"{type(self).__name__} needs --algo {self.algo_name}, got {config.algo!r}")
        super().__init__(config, policy, target, scorer, prompts, metrics_fn, accelerator, **engine_options)
        self.divergence = get_divergence(config.divergence)
        problem = f_dpo_problem(self.divergence)
        if problem is not None:
            raise ValueError(f"f-DPO is not defined for --divergence {config.divergence}: {problem}")
        self.pairs = pairs
        self.pair_data = pair_data
        self.train_index, self.heldout_index = split_pairs(len(pairs), config.heldout_fraction, config.seed)
        if len(self.train_index) < config.batch_size:
            raise ValueError(f"{len(self.train_index)} training pairs (of {len(pairs)}, --heldout_fraction "
                             f"{config.heldout_fraction}) are fewer than --batch_size {config.batch_size}")
        self.pad_id = policy.tokenizer.pad_token_id
        #: ``[N, 2]`` float64 reference log-probabilities of (chosen, rejected), set by :meth:`prepare_run`.
        self.reference_log_probs: torch.Tensor | None = None
        self.batches = EpochBatches(self.train_index, config.batch_size, config.seed)
        #: Pairs per forward pass: ``--micro_batch_size`` counts sequences, as for the online algorithms (a pair's
        #: chosen and rejected responses are two), so that the default 8 puts 8 rows in each pass there too.
        self.micro_pairs = max(1, config.micro_batch_size // 2)
        #: SimPO, CPO, ORPO: the loss reads the policy alone; no reference pass is made.
        self.reference_free = config.preference_loss in REFERENCE_FREE_LOSSES

    # ------------------------------------------------------------------ once per run
    def prepare_run(self) -> None:
        """The reference's log-probabilities of every pair: read from the run directory, or computed and stored
        there (with the pairs made from the task, when they were)."""
        from safetensors.torch import load_file, save_file

        if self.reference_free:
            if self.is_main and self.pair_data is not None and not (self.run_directory() / PAIRS_DIR).exists():
                self.pair_data.save_to_disk(str(self.run_directory() / PAIRS_DIR))
            self.accelerator.wait_for_everyone()
            return
        path = self.run_directory() / REFERENCE_FILE
        if path.is_file():
            saved = load_file(str(path))["log_probs"]
            if saved.shape != (len(self.pairs), 2):
                raise ValueError(f"{path} holds {tuple(saved.shape)} log-probabilities, not ({len(self.pairs)}, 2): "
                                 "the run's pairs have changed; start a new run")
            self.reference_log_probs = saved.double()
            return
        with self.timed("reference"):
            self.reference_log_probs = self.reference_pass()
        if self.is_main:
            save_file({"log_probs": self.reference_log_probs.contiguous()}, str(path))
            if self.pair_data is not None and not (self.run_directory() / PAIRS_DIR).exists():
                self.pair_data.save_to_disk(str(self.run_directory() / PAIRS_DIR))
        self.accelerator.wait_for_everyone()

    def run_directory(self):
        from pathlib import Path

        return self.run.dir if self.run is not None else Path(self.config.resume or self.config.output_dir)

    def reference_pass(self) -> torch.Tensor:
        """``[N, 2]`` :math:`\\log\\pi_{ref}` of every pair's chosen and rejected response (no grad; every process
        computes all of them, once)."""
        out = []
        n = len(self.pairs)
        step = self.micro_pairs
        for lo in range(0, n, step):
            index = list(range(lo, min(n, lo + step)))
            seq = self.token_log_probs(self.pairs.as_batch(index, self.pad_id), reference=True).sum(-1)
            out.append(torch.stack(seq.chunk(2), dim=1))
        return torch.cat(out).double()

    # ------------------------------------------------------------------ the step's pairs
    def step_pairs(self, step: int) -> list[int]:
        """The global batch of training pairs of ``step`` (:class:`fdpg.engine.EpochBatches`)."""
        return self.batches.step(step)

    # ------------------------------------------------------------------ the loss
    def pair_losses(self, index: Sequence[int], grad: bool, nll_tokens: float | None = None,
                    batch_pairs: int | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per-pair loss, and the log-ratios :math:`\\log\\frac{\\pi_\\theta}{\\pi_{ref}}` of the chosen and rejected
        responses (reference-free losses: :math:`\\log\\pi_\\theta` itself), from one forward pass of ``self.model``
        over both (graph kept when ``grad``). CPO, ORPO and a combined ``sft`` term add an NLL term to each pair's
        loss as its share of the chosen tokens' NLL divided by ``nll_tokens``, the chosen tokens of the
        ``batch_pairs`` pairs whose mean loss is taken (default: these pairs), so that the batch's mean loss carries
        the NLL per chosen token."""
        cfg = self.config
        batch = self.pairs.as_batch(index, self.pad_id)
        with (nullcontext() if grad else torch.no_grad()), self.accelerator.autocast():
            token_log_pi = completion_token_log_probs(self.model, batch)
            log_pi = token_log_pi.sum(-1).double()
        chosen, rejected = log_pi.chunk(2)
        lengths_w, lengths_l = (x.to(log_pi.device) for x in batch.completion_mask.sum(-1).chunk(2))

        def nll_share() -> torch.Tensor:
            """Each pair's share of the chosen tokens' NLL per token of the batch: summed over the batch's pairs and
            divided by ``batch_pairs``, it is the NLL per chosen token however the batch is micro-batched."""
            mask_w = batch.completion_mask.chunk(2)[0].to(token_log_pi.device)
            tokens = nll_tokens if nll_tokens is not None else float(mask_w.sum())
            nll = chosen_nll(token_log_pi.chunk(2)[0].double(), mask_w, tokens)
            return nll * (batch_pairs or len(index)) / len(index)

        if self.reference_free:
            losses = reference_free_pair_loss(cfg.preference_loss, chosen, rejected, lengths_w, lengths_l, cfg.beta,
                                              cfg.label_smoothing, cfg.simpo_gamma)
            if REFERENCE_FREE_LOSSES[cfg.preference_loss]:  # cpo, orpo: + coef * NLL of the chosen tokens
                losses = losses + (cfg.nll_coef if cfg.preference_loss == "cpo" else 1.0) * nll_share()
            return losses, chosen, rejected
        ref = self.reference_log_probs[torch.as_tensor(list(index))].to(log_pi.device)
        log_ratio_w, log_ratio_l = chosen - ref[:, 0], rejected - ref[:, 1]
        losses = torch.zeros_like(log_ratio_w)
        for name, weight in cfg.preference_losses():  # one loss, or a weighted combination (MPO)
            if name == "sft":
                losses = losses + weight * nll_share()
                continue
            if name in BATCH_LOSSES:  # sorted over these pairs (the training step sorts over its whole batch)
                losses = losses + weight * batch_preference_loss(name, log_ratio_w, log_ratio_l, cfg.beta,
                                                                 cfg.label_smoothing, ref[:, 0], ref[:, 1])
                continue
            losses = losses + weight * preference_loss(
                log_ratio_w, log_ratio_l, self.divergence, cfg.beta, name, cfg.label_smoothing, lengths_w, lengths_l,
                length_alpha=cfg.length_alpha, positive_lambda=cfg.positive_lambda, discopop_tau=cfg.discopop_tau)
        return losses, log_ratio_w, log_ratio_l

    def pair_metrics(self, losses: torch.Tensor, log_ratio_w: torch.Tensor, log_ratio_l: torch.Tensor,
                     prefix: str = "") -> dict[str, float]:
        """Loss, implicit rewards, margin and accuracy of the (gathered) pairs."""
        beta = self.config.beta
        r_w, r_l = implicit_rewards(log_ratio_w, self.divergence, beta), implicit_rewards(log_ratio_l, self.divergence,
                                                                                            beta)
        if prefix:
            return {f"{prefix}loss": float(losses.mean()), f"{prefix}accuracy": float((r_w > r_l).double().mean())}
        return {"loss": float(losses.mean()), "rewards/chosen": float(r_w.mean()),
                "rewards/rejected": float(r_l.mean()), "rewards/margins": float((r_w - r_l).mean()),
                "rewards/accuracy": float((r_w > r_l).double().mean()),
                # reference-free losses: log pi itself (there is no reference in their loss)
                f"{'log_pi' if self.reference_free else 'log_ratio'}/chosen": float(log_ratio_w.mean()),
                f"{'log_pi' if self.reference_free else 'log_ratio'}/rejected": float(log_ratio_l.mean())}

    # ------------------------------------------------------------------ one step
    def train_step(self, step: int) -> dict[str, Any]:
        """Run optimisation step ``step`` (0-based) and return its metrics."""
        cfg, acc = self.config, self.accelerator
        started, metrics = self.begin_offline_step(step)

        index = self.step_pairs(step)[self.local_slice()]
        parts: list[tuple[torch.Tensor, ...]] = []
        chosen_tokens = float(sum(len(self.pairs.chosen_ids[j]) for j in index))  # this process's share (NLL)
        tokens = int(chosen_tokens) + sum(len(self.pairs.rejected_ids[j]) for j in index)
        with self.timed("backward"):
            if cfg.preference_loss in BATCH_LOSSES:
                parts = [self.batch_loss_backward(index)]
            for micro, sync in ([] if parts else self.accumulation(index, self.micro_pairs)):
                with sync:
                    losses, log_ratio_w, log_ratio_l = self.pair_losses(micro, grad=True, nll_tokens=chosen_tokens,
                                                                        batch_pairs=self.local_batch)
                    acc.backward(losses.sum() / self.local_batch)
                parts.append((losses.detach(), log_ratio_w.detach(), log_ratio_l.detach()))

        gathered = [self.gather(torch.cat(column).cpu()) for column in zip(*parts)]
        metrics.update(self.pair_metrics(*gathered))
        return self.finish_offline_step(step, metrics, started, tokens)

    def begin_offline_step(self, step: int) -> tuple[float, dict[str, Any]]:
        """The start of a step of the offline trainers (DPO, KTO, the list losses): its clock, no samples logged
        yet, and every ``eval_every`` steps the evaluation of the policy the step starts from (before the update)."""
        started = self.begin_step()
        self._last_samples, self._tokens_this_step = None, 0
        metrics: dict[str, Any] = {"step": step + 1}
        if self._evaluates(step):
            metrics.update(self.evaluate(step))
        return started, metrics

    def finish_offline_step(self, step: int, metrics: dict[str, Any], started: float, tokens: int) -> dict[str, Any]:
        """The optimizer and scheduler step after the step's backward (timed ``optimizer``), ``lr``, ``grad_norm``,
        ``epoch`` and the throughput of this process's ``tokens`` (summed over processes)."""
        with self.timed("optimizer"):
            lr = self.scheduler.get_last_lr()[0]
            grad_norm = self.optimizer_step()
            self.scheduler.step()
        metrics.update({"lr": lr, "grad_norm": grad_norm,
                        "epoch": (step + 1) * self.config.batch_size / len(self.train_index)})
        self._tokens_this_step += int(self.gather(torch.tensor([tokens])).sum())
        return self.finish_metrics(metrics, started)

    def batch_loss_backward(self, index: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Backpropagate a loss of the whole batch (:data:`objectives.preference.BATCH_LOSSES`, sorted over the
        batch) however it is micro-batched: a no-grad pass gives every pair's log-ratios :math:`\\rho`, autograd
        gives :math:`\\partial L/\\partial\\rho` of the batch loss :math:`L(\\rho)`, and each micro-batch then
        backpropagates :math:`\\sum_i \\frac{\\partial L}{\\partial\\rho_i}\\rho_i(\\theta)`: the chain rule, the exact
        gradient, for one extra forward pass. Returns the batch's losses and log-ratios."""
        cfg, acc = self.config, self.accelerator
        columns = [self.pair_losses(index[lo:lo + self.micro_pairs], grad=False)[1:]
                   for lo in range(0, len(index), self.micro_pairs)]
        rho_w = torch.cat([c[0] for c in columns]).detach().requires_grad_(True)
        rho_l = torch.cat([c[1] for c in columns]).detach().requires_grad_(True)
        ref = self.reference_log_probs[torch.as_tensor(list(index))].to(rho_w.device)
        losses = batch_preference_loss(cfg.preference_loss, rho_w, rho_l, cfg.beta, cfg.label_smoothing,
                                       ref[:, 0], ref[:, 1])
        grad_w, grad_l = torch.autograd.grad(losses.sum() / self.local_batch, [rho_w, rho_l])
        offset = 0
        for micro, sync in self.accumulation(index, self.micro_pairs):
            with sync:
                _, log_ratio_w, log_ratio_l = self.pair_losses(micro, grad=True)
                k = slice(offset, offset + len(micro))
                acc.backward((grad_w[k].to(log_ratio_w) * log_ratio_w).sum()
                             + (grad_l[k].to(log_ratio_l) * log_ratio_l).sum())
            offset += len(micro)
        return losses.detach(), rho_w.detach(), rho_l.detach()

    def _evaluates(self, step: int) -> bool:
        every = self.config.eval_every
        return bool(every) and (step % every == 0 or step == self.config.steps - 1)

    def evaluate(self, step: int) -> dict[str, Any]:
        """The policy's samples on the task's prompts, with the metrics every algorithm logs (the "pseudo-reward"
        columns hold the implicit reward :math:`\\beta s` of the samples), and the held-out pairs' loss and
        accuracy."""
        beta = self.config.beta
        metrics = self.policy_sample_metrics(
            step, self.divergence, lambda log_pi, log_a: implicit_rewards(log_pi - log_a, self.divergence, beta))
        if self.heldout_index:
            with self.timed("heldout"):
                metrics.update(self.heldout_metrics())
        return metrics

    def heldout_metrics(self) -> dict[str, float]:
        """``heldout/loss`` and ``heldout/accuracy`` over every held-out pair (each process a share, gathered)."""
        world, rank = self.accelerator.num_processes, self.accelerator.process_index
        mine = self.heldout_index[rank::world]
        parts = []
        size = self.micro_pairs
        for lo in range(0, len(mine), size):
            parts.append(self.pair_losses(mine[lo:lo + size], grad=False))
        columns = [torch.cat(c).cpu() for c in zip(*parts)] if parts else [torch.zeros(0, dtype=torch.float64)] * 3
        if world > 1:
            columns = [torch.cat(self.gather_list([c])) for c in columns]
        return self.pair_metrics(*columns, prefix="heldout/")
