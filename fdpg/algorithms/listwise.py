r"""List-wise preference optimisation from K-wise rankings: RRHF, PRO and LiPO-λ (:mod:`objectives.list_losses`), on
DPO's engine.

The data are rankings (:mod:`fdpg.ranked_lists`), not pairs, and the loss reads a whole list; the rest is DPO's
(:class:`fdpg.algorithms.dpo.DPOTrainer`): seeded epochs of batches of rankings, a held-out split, the periodic
samples of the policy under the shared metric names. LiPO reads the reference: its log-probabilities of every
response are computed once and stored in the run directory; RRHF and PRO read none and make no reference pass.
Each step:

1. the step's ``batch_size`` rankings;
2. one forward pass with gradients over all responses of a micro-batch of rankings (about ``micro_batch_size``
   responses), their sequence log-likelihoods and lengths;
3. each ranking's loss (RRHF: hinges of the per-token log-likelihoods plus the best response's NLL; PRO:
   Plackett-Luce of them plus the best's NLL per token; LiPO: λ-weighted DPO terms of every ordered pair),
   averaged over the batch's rankings, backward, clipped optimizer step, scheduler step;
4. logged: ``loss`` and ``list/top1_accuracy``, the fraction of rankings whose best response has the highest score
   (:math:`p_i` for RRHF and PRO, :math:`s_i` for LiPO); the held-out rankings' ``heldout/loss`` and
   ``heldout/accuracy`` (the same fraction).
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import nullcontext
from typing import Any

import torch

from fdpg.algorithms.dpo import REFERENCE_FILE, DPOTrainer
from fdpg.log_probs import completion_token_log_probs
from objectives.list_losses import REFERENCE_FREE_LIST_LOSSES, lipo_lambda_loss, pro_loss, rrhf_loss
from objectives.preference import implicit_rewards


class ListwiseTrainer(DPOTrainer):
    """RRHF, PRO or LiPO-λ on ``pairs``, a :class:`fdpg.ranked_lists.TokenizedLists`; see the module docstring."""

    algorithm = "list-wise"
    algo_name = "listwise"

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.reference_free = self.config.list_loss in REFERENCE_FREE_LIST_LOSSES
        widest = max(len(r) for r in self.pairs.response_ids)
        #: Rankings per forward pass: about ``--micro_batch_size`` responses (at least one ranking).
        self.micro_lists = max(1, self.config.micro_batch_size // widest)

    # ------------------------------------------------------------------ once per run
    def prepare_run(self) -> None:
        """LiPO: the reference's log-probability of every response, read from the run directory or computed once
        and stored there; RRHF and PRO read no reference."""
        from safetensors.torch import load_file, save_file

        if self.reference_free:
            return
        path = self.run_directory() / REFERENCE_FILE
        if path.is_file():
            saved = load_file(str(path))["log_probs"]
            if saved.shape != (self.pairs.n_responses,):
                raise ValueError(f"{path} holds {tuple(saved.shape)} log-probabilities, not "
                                 f"({self.pairs.n_responses},): the run's rankings have changed; start a new run")
            self.reference_log_probs = saved.double()
            return
        with self.timed("reference"):
            self.reference_log_probs = self.reference_pass()
        if self.is_main:
            save_file({"log_probs": self.reference_log_probs.contiguous()}, str(path))
        self.accelerator.wait_for_everyone()

    def reference_pass(self) -> torch.Tensor:
        r"""``[R]`` :math:`\log\pi_{ref}` of every response of every ranking, in the flat order (no grad)."""
        out = []
        for lo in range(0, len(self.pairs), self.micro_lists):
            groups = list(range(lo, min(len(self.pairs), lo + self.micro_lists)))
            out.append(self.token_log_probs(self.pairs.as_batch(groups, self.pad_id), reference=True).sum(-1))
        return torch.cat(out).double()

    # ------------------------------------------------------------------ the loss
    def list_losses(self, groups: Sequence[int], grad: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-ranking loss and whether its best response scores highest, from one forward pass over every response
        of the rankings ``groups`` (graph kept when ``grad``)."""
        cfg = self.config
        batch = self.pairs.as_batch(groups, self.pad_id)
        with (nullcontext() if grad else torch.no_grad()), self.accelerator.autocast():
            log_pi = completion_token_log_probs(self.model, batch).sum(-1).double()
        lengths = batch.completion_mask.sum(-1).to(log_pi)
        if not self.reference_free:
            reference = self.reference_log_probs[torch.as_tensor(self.pairs.flat(groups))].to(log_pi)
        losses, top1, start = [], [], 0
        for g in groups:
            k = len(self.pairs.response_ids[g])
            rows = slice(start, start + k)
            start += k
            if cfg.list_loss == "lipo":
                scores = implicit_rewards(log_pi[rows] - reference[rows], self.divergence, cfg.beta)
                losses.append(lipo_lambda_loss(scores, self.pairs.labels[g].to(scores)))
            else:
                scores = log_pi[rows] / lengths[rows].clamp(min=1)
                losses.append(rrhf_loss(scores, -log_pi[rows][0], cfg.nll_coef) if cfg.list_loss == "rrhf"
                              else pro_loss(scores, cfg.nll_coef))
            top1.append(bool(scores.detach().argmax() == 0))
        return torch.stack(losses), torch.tensor(top1)

    # ------------------------------------------------------------------ one step
    def train_step(self, step: int) -> dict[str, Any]:
        """Run optimisation step ``step`` (0-based) and return its metrics."""
        acc = self.accelerator
        started, metrics = self.begin_offline_step(step)
        groups = self.step_pairs(step)[self.local_slice()]
        tokens = sum(len(ids) for g in groups for ids in self.pairs.response_ids[g])
        parts = []
        with self.timed("backward"):
            for micro, sync in self.accumulation(groups, self.micro_lists):
                with sync:
                    losses, top1 = self.list_losses(micro, grad=True)
                    acc.backward(losses.sum() / self.local_batch)
                parts.append((losses.detach().cpu(), top1))
        losses, top1 = (self.gather(torch.cat(c)) for c in zip(*parts))
        metrics.update({"loss": float(losses.mean()), "list/top1_accuracy": float(top1.double().mean())})
        return self.finish_offline_step(step, metrics, started, tokens)

    def heldout_metrics(self) -> dict[str, float]:
        """``heldout/loss`` and ``heldout/accuracy`` (best response scored highest) of every held-out ranking."""
        world, rank = self.accelerator.num_processes, self.accelerator.process_index
        mine = self.heldout_index[rank::world]
        parts = [self.list_losses(mine[lo:lo + self.micro_lists], grad=False)
                 for lo in range(0, len(mine), self.micro_lists)]
        losses, top1 = ([torch.cat(c).cpu() for c in zip(*parts)] if parts
                        else [torch.zeros(0, dtype=torch.float64), torch.zeros(0, dtype=torch.bool)])
        if world > 1:
            losses, top1 = (torch.cat(self.gather_list([c])) for c in (losses, top1))
        return {"heldout/loss": float(losses.mean()), "heldout/accuracy": float(top1.double().mean())}
