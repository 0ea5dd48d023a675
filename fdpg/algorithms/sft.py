r"""Supervised fine-tuning (the first stage of InstructGPT, Ouyang et al. 2022), on the shared engine.

Minimises the negative log-likelihood of the demonstrations' completion tokens (:func:`objectives.likelihood.
completion_nll`): forward KL from the data distribution, :math:`KL(\mathcal D\|\pi_\theta) + H(\mathcal D)`. The
prompt tokens carry no loss; the loss of a step is the mean over every completion token of its batch (as
transformers' causal-LM loss with ``-100`` labels on the prompt). Each step:

1. the step's ``batch_size`` demonstrations: epoch after epoch of seeded permutations of the training split
   (:class:`fdpg.engine.EpochBatches`);
2. :math:`\log\pi_\theta(y_t\mid c, y_{<t})` of the completion tokens, micro-batched, each micro-batch's share of
   the batch's token mean backpropagated; clipped optimizer step and scheduler step through ``accelerate``;
3. logged: ``loss``, ``perplexity`` (:math:`e^{\text{loss}}`), ``epoch``;
4. every ``eval_every`` steps (and at the first and the last): ``heldout/loss`` and ``heldout/perplexity`` over the
   held-out demonstrations, and ``batch_size`` samples of the policy on the task's prompts with the metrics every
   algorithm logs (``score/...``, ``kl_pi_a``, ...), so that an SFT run lands on the same Pareto plot.

The run directory, checkpoints, resume and the final evaluation (``eval.json``) are the engine's; ``RUN`` can then
be given as ``--model RUN`` to any later stage (:func:`fdpg.models.resolve_model_path`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from contextlib import nullcontext
from typing import Any

import torch

from fdpg.demonstrations import TokenizedDemonstrations
from fdpg.engine import EpochBatches, OnlineTrainer
from fdpg.log_probs import completion_token_log_probs
from fdpg.preferences import split_pairs
from objectives import ForwardKL
from objectives.likelihood import completion_nll


class SFTTrainer(OnlineTrainer):
    """Supervised fine-tuning on ``demonstrations``; see the module docstring.

    Args: those of :class:`fdpg.engine.OnlineTrainer` (the task serves the periodic and final evaluations), and
        demonstrations: the tokenised demonstrations (:func:`fdpg.demonstrations.tokenize_demonstrations`).
    """

    algorithm = "SFT"

    def __init__(self, config, policy, target, scorer, prompts=None, metrics_fn=None, accelerator=None, *,
                 demonstrations: TokenizedDemonstrations, **engine_options) -> None:
        if config.algo != "sft":
            raise ValueError(f"SFTTrainer needs --algo sft, got {config.algo!r}")
        super().__init__(config, policy, target, scorer, prompts, metrics_fn, accelerator, **engine_options)
        self.divergence = ForwardKL()  # d_f of the shared metrics; SFT's own divergence is KL(D || pi)
        self.data = demonstrations
        self.train_index, self.heldout_index = split_pairs(len(demonstrations), config.heldout_fraction, config.seed)
        if len(self.train_index) < config.batch_size:
            raise ValueError(f"{len(self.train_index)} training demonstrations (of {len(demonstrations)}, "
                             f"--heldout_fraction {config.heldout_fraction}) are fewer than --batch_size "
                             f"{config.batch_size}")
        self.pad_id = policy.tokenizer.pad_token_id
        self.batches = EpochBatches(self.train_index, config.batch_size, config.seed)

    # ------------------------------------------------------------------ the loss
    def token_losses(self, index: Sequence[int], grad: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """``[n, T]`` per-token log-probabilities of the rows ``index``' completions and their mask (graph kept when
        ``grad``)."""
        batch = self.data.as_batch(index, self.pad_id)
        with (nullcontext() if grad else torch.no_grad()), self.accelerator.autocast():
            token_log_pi = completion_token_log_probs(self.model, batch)
        return token_log_pi, batch.completion_mask.to(token_log_pi.device)

    def n_tokens(self, index: Sequence[int]) -> int:
        return sum(len(self.data.completion_ids[int(i)]) for i in index)

    # ------------------------------------------------------------------ one step
    def train_step(self, step: int) -> dict[str, Any]:
        """Run optimisation step ``step`` (0-based) and return its metrics."""
        cfg, acc = self.config, self.accelerator
        started = self.begin_step()
        self._last_samples, self._tokens_this_step = None, 0
        metrics: dict[str, Any] = {"step": step + 1}
        if self._evaluates(step):  # before the update: the samples are of the policy the step starts from
            metrics.update(self.evaluate(step))

        global_index = self.batches.step(step)
        index = global_index[self.local_slice()]
        total_tokens = self.n_tokens(global_index)  # the loss is the global batch's token mean
        world = acc.num_processes
        summed = 0.0
        with self.timed("backward"):
            for micro, sync in self.accumulation(index):
                with sync:
                    token_log_pi, mask = self.token_losses(micro, grad=True)
                    # each process's share of the global mean; DDP averages gradients over processes, hence * world
                    loss = completion_nll(token_log_pi, mask, n_tokens=total_tokens / world)
                    acc.backward(loss)
                summed += float(loss.detach()) / world
        with self.timed("optimizer"):
            lr = self.scheduler.get_last_lr()[0]
            grad_norm = self.optimizer_step()
            self.scheduler.step()
        loss = float(self.gather(torch.tensor([summed], dtype=torch.float64)).sum())
        metrics.update({"loss": loss, "perplexity": math.exp(min(loss, 700.0)), "lr": lr, "grad_norm": grad_norm,
                        "epoch": (step + 1) * cfg.batch_size / len(self.train_index)})
        self._tokens_this_step += total_tokens
        return self.finish_metrics(metrics, started)

    def _evaluates(self, step: int) -> bool:
        every = self.config.eval_every
        return bool(every) and (step % every == 0 or step == self.config.steps - 1)

    def evaluate(self, step: int) -> dict[str, Any]:
        """The held-out demonstrations' loss and perplexity, and the policy's samples with the shared metrics (the
        pseudo-reward column holds :math:`\\log\\frac{\\pi_\\theta}{a}` of each sample)."""
        metrics = self.policy_sample_metrics(step, self.divergence, lambda log_pi, log_a: log_pi - log_a)
        if self.heldout_index:
            with self.timed("heldout"):
                metrics.update(self.heldout_metrics())
        return metrics

    def heldout_metrics(self) -> dict[str, float]:
        """``heldout/loss`` (the token mean over every held-out demonstration) and ``heldout/perplexity``."""
        world, rank = self.accelerator.num_processes, self.accelerator.process_index
        mine = self.heldout_index[rank::world]
        nll, tokens = 0.0, 0
        size = self.config.micro_batch_size
        for lo in range(0, len(mine), size):
            token_log_pi, mask = self.token_losses(mine[lo:lo + size], grad=False)
            nll += float(-(token_log_pi.double() * mask).sum())
            tokens += int(mask.sum())
        sums = self.gather(torch.tensor([[nll, float(tokens)]], dtype=torch.float64)).sum(0)
        loss = float(sums[0] / sums[1]) if sums[1] > 0 else float("nan")
        return {"heldout/loss": loss, "heldout/perplexity": math.exp(min(loss, 700.0))}
