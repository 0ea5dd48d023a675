r"""KTO: offline alignment from unpaired desirable/undesirable completions (Ethayarajh et al. 2024), on DPO's engine.

The data differ from DPO's (labelled singles, :mod:`fdpg.labelled_feedback`; each example carries a mismatched
completion, another example's, for the reference point) and so does the loss (:mod:`objectives.kto`); the rest is
DPO's (:class:`fdpg.algorithms.dpo.DPOTrainer`): the reference's log-probabilities of every example's completion and
mismatched completion computed once and stored in the run directory, seeded epochs of batches, the periodic samples
of the policy under the shared metric names, the held-out examples. Each step:

1. the step's ``batch_size`` examples;
2. the reference point :math:`z_0 = \max(0, \operatorname{mean}_j\log\frac{\pi_\theta}{\pi_{ref}}(y'_j\mid x_j))`
   over the mismatched completions of the whole (global) batch, in a no-grad pass (TRL estimates it per
   micro-batch, gathered over the processes: the same with one micro-batch per process);
3. :math:`\log\frac{\pi_\theta}{\pi_{ref}}(y_j\mid x_j)` with gradients, micro-batched, the loss
   :math:`\lambda_D(1 - \sigma(\beta(r - z_0)))` / :math:`\lambda_U(1 - \sigma(\beta(z_0 - r)))` averaged over the
   batch, backward, clipped optimizer step and scheduler step;
4. logged: ``loss``, ``kto/reference_point``, the implicit rewards :math:`\beta r` of the desirable and undesirable
   completions (``rewards/chosen``, ``rewards/rejected``), their margin, and ``rewards/accuracy``: the fraction of
   examples on the right side of :math:`z_0` (desirable above, undesirable below).
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import nullcontext
from typing import Any

import torch

from fdpg.algorithms.dpo import DPOTrainer
from fdpg.log_probs import completion_token_log_probs
from objectives.kto import kto_losses, reference_point


class KTOTrainer(DPOTrainer):
    """KTO on labelled completions; see the module docstring.

    Args: those of :class:`fdpg.algorithms.dpo.DPOTrainer` (``pairs``: each example's completion as ``chosen``, its
    mismatched completion as ``rejected``), and
        labels: ``[N]`` bool, true where the example's completion is desirable.
    """

    algorithm = "KTO"
    algo_name = "kto"

    def __init__(self, config, policy, target, scorer, prompts=None, metrics_fn=None, accelerator=None, *,
                 pairs, labels: torch.Tensor, pair_data=None, **engine_options) -> None:
        super().__init__(config, policy, target, scorer, prompts, metrics_fn, accelerator, pairs=pairs,
                         pair_data=pair_data, **engine_options)
        if len(labels) != len(pairs):
            raise ValueError(f"{len(labels)} labels for {len(pairs)} examples")
        self.labels = torch.as_tensor(labels, dtype=torch.bool)

    # ------------------------------------------------------------------ the loss
    def log_ratios(self, index: Sequence[int], column: str, grad: bool) -> torch.Tensor:
        r"""``[n]`` :math:`\log\frac{\pi_\theta}{\pi_{ref}}` of the examples' completions (``chosen``) or mismatched
        completions (``rejected``), from one forward pass (graph kept when ``grad``)."""
        batch = self.pairs.responses(index, self.pad_id, column)
        with (nullcontext() if grad else torch.no_grad()), self.accelerator.autocast():
            log_pi = completion_token_log_probs(self.model, batch).sum(-1).double()
        ref = self.reference_log_probs[torch.as_tensor(list(index)), 0 if column == "chosen" else 1]
        return log_pi - ref.to(log_pi.device)

    def reference_point_of(self, index: Sequence[int], gather: bool = True) -> torch.Tensor:
        """:math:`z_0` of the examples ``index`` (this process's; with ``gather``, over every process's)."""
        size = self.config.micro_batch_size
        mismatched = torch.cat([self.log_ratios(index[lo:lo + size], "rejected", grad=False).cpu()
                                for lo in range(0, len(index), size)])
        return reference_point(self.gather(mismatched) if gather else mismatched)

    def example_losses(self, index: Sequence[int], z0: torch.Tensor, grad: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-example KTO loss and log-ratio of the examples ``index`` against the reference point ``z0``."""
        cfg = self.config
        ratios = self.log_ratios(index, "chosen", grad)
        labels = self.labels[torch.as_tensor(list(index))].to(ratios.device)
        return kto_losses(ratios, labels, z0.to(ratios.device), cfg.beta, cfg.desirable_weight,
                          cfg.undesirable_weight, cfg.kto_loss), ratios

    def example_metrics(self, losses: torch.Tensor, ratios: torch.Tensor, labels: torch.Tensor, z0: float,
                        prefix: str = "") -> dict[str, float]:
        """Loss, implicit rewards of each kind, margin and accuracy (the right side of the reference point)."""
        beta = self.config.beta
        right = torch.where(labels, ratios > z0, ratios < z0).double()
        if prefix:
            return {f"{prefix}loss": float(losses.mean()), f"{prefix}accuracy": float(right.mean())}
        good, bad = beta * ratios[labels], beta * ratios[~labels]
        mean = lambda x: float(x.mean()) if len(x) else None  # noqa: E731
        return {"loss": float(losses.mean()), "kto/reference_point": float(z0), "rewards/chosen": mean(good),
                "rewards/rejected": mean(bad),
                "rewards/margins": mean(good) - mean(bad) if len(good) and len(bad) else None,
                "rewards/accuracy": float(right.mean()), "kto/desirable_fraction": float(labels.double().mean())}

    # ------------------------------------------------------------------ one step
    def train_step(self, step: int) -> dict[str, Any]:
        """Run optimisation step ``step`` (0-based) and return its metrics."""
        acc = self.accelerator
        started, metrics = self.begin_offline_step(step)

        index = self.step_pairs(step)[self.local_slice()]
        tokens = sum(len(self.pairs.chosen_ids[j]) + len(self.pairs.rejected_ids[j]) for j in index)
        with self.timed("reference_point"):
            z0 = self.reference_point_of(index)
        parts = []
        with self.timed("backward"):
            for micro, sync in self.accumulation(index):
                with sync:
                    losses, ratios = self.example_losses(micro, z0, grad=True)
                    acc.backward(losses.sum() / self.local_batch)
                parts.append((losses.detach().cpu(), ratios.detach().cpu()))

        losses, ratios = (self.gather(torch.cat(column)) for column in zip(*parts))
        labels = self.gather(self.labels[torch.as_tensor(list(index))])
        metrics.update(self.example_metrics(losses, ratios, labels, float(z0)))
        return self.finish_offline_step(step, metrics, started, tokens)

    def heldout_metrics(self) -> dict[str, float]:
        """``heldout/loss`` and ``heldout/accuracy`` of every held-out example, against the held-out set's own
        reference point (each process a share, gathered)."""
        world, rank = self.accelerator.num_processes, self.accelerator.process_index
        mine = self.heldout_index[rank::world]
        size = self.config.micro_batch_size
        with torch.no_grad():
            z0 = self.reference_point_of(mine, gather=world > 1) if mine else torch.zeros((), dtype=torch.float64)
            parts = [self.example_losses(mine[lo:lo + size], z0, grad=False) for lo in range(0, len(mine), size)]
        losses, ratios = ([torch.cat(c).cpu() for c in zip(*parts)] if parts
                          else [torch.zeros(0, dtype=torch.float64)] * 2)
        labels = self.labels[torch.as_tensor(mine, dtype=torch.long)]
        if world > 1:
            losses, ratios, labels = (torch.cat(self.gather_list([c])) for c in (losses, ratios, labels))
        return self.example_metrics(losses, ratios, labels, float(z0), prefix="heldout/")
