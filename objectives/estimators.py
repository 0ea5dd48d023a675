r"""The f-DPG gradient estimator: baselines and the surrogate loss.

With samples :math:`x_j \sim q` (:math:`q = \pi_\theta` on-policy), importance weights
:math:`w_j = \pi_\theta(x_j)/q(x_j)` and pseudo-rewards :math:`R_j = -f'(\pi_\theta(x_j)/p(x_j))`,

.. math::  \widehat{\nabla D_f} = -\frac1n\sum_j w_j\,(R_j - b_j)\,\nabla_\theta\log\pi_\theta(x_j),

which is unbiased for :math:`\nabla_\theta D_f(\pi_\theta\|p)` whenever the baseline :math:`b_j` does
not depend on :math:`x_j` (since :math:`E_q[w\nabla\log\pi] = \nabla\sum_x\pi(x) = 0`). The
leave-one-out baseline (RLOO) has that property exactly; the batch mean is the common, very slightly
biased (by a factor :math:`1 - 1/n`) choice. :func:`surrogate_loss` is the scalar whose autograd
gradient is this estimate.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from typing import Literal

import torch

BaselineKind = Literal["none", "mean", "loo", "prompt_mean", "prompt_loo", "moving_average"]
BASELINES: tuple[str, ...] = ("none", "mean", "loo", "prompt_mean", "prompt_loo", "moving_average")


def _loo(values: torch.Tensor) -> torch.Tensor:
    n = values.numel()
    if n < 2:
        return torch.zeros_like(values)
    return (values.sum() - values) / (n - 1)


def batch_baseline(
    rewards: torch.Tensor, kind: str = "loo", groups: Sequence[Hashable] | None = None
) -> torch.Tensor:
    r"""Per-sample baseline :math:`b_j` from the batch's pseudo-rewards.

    ``"none"``: 0; ``"mean"``: :math:`\bar R`; ``"loo"``: :math:`\frac{1}{n-1}\sum_{k\ne j}R_k`;
    ``"prompt_mean"`` / ``"prompt_loo"``: the same within the samples sharing ``groups[j]`` (one
    prompt), the right choice for conditional targets where reward scales differ across prompts.
    """
    rewards = rewards.detach()
    if kind == "none":
        return torch.zeros_like(rewards)
    if kind == "mean":
        return torch.full_like(rewards, float(rewards.mean()))
    if kind == "loo":
        return _loo(rewards)
    if kind in ("prompt_mean", "prompt_loo"):
        if groups is None or len(groups) != rewards.numel():
            raise ValueError(f"baseline {kind!r} needs one group key per sample (got {groups!r:.60})")
        out = torch.empty_like(rewards)
        for key in dict.fromkeys(groups):
            idx = torch.tensor([i for i, g in enumerate(groups) if g == key], device=rewards.device)
            vals = rewards[idx]
            out[idx] = _loo(vals) if kind == "prompt_loo" else vals.mean().expand_as(vals)
        return out
    raise ValueError(f"unknown baseline {kind!r}; choose one of {', '.join(BASELINES)}")


def token_baseline(
    rewards_to_go: torch.Tensor, kind: str = "loo", groups: Sequence[Hashable] | None = None
) -> torch.Tensor:
    r"""``[B, T]`` per-token baseline of token-level credit: :func:`batch_baseline` of each position's column,
    :math:`b_{jt}` from the other samples' :math:`G_{kt}` (0 past their end). A baseline that does not depend on
    sample :math:`j` itself leaves the gradient unbiased (``loo``, ``prompt_loo``, ``none``)."""
    columns = [batch_baseline(rewards_to_go[:, t], kind, groups) for t in range(rewards_to_go.shape[1])]
    return torch.stack(columns, 1) if columns else torch.zeros_like(rewards_to_go)


class MovingAverageBaseline:
    r"""Moving average of past batches' mean pseudo-reward, :math:`b \leftarrow \gamma b + (1-\gamma)\bar R`.

    Independent of the current samples (so unbiased), returned before it is updated with them.
    """

    def __init__(self, decay: float = 0.9) -> None:
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"moving-average decay must be in [0, 1), got {decay!r}")
        self.decay = decay
        self.value: float | None = None

    def __call__(self, rewards: torch.Tensor) -> torch.Tensor:
        current = 0.0 if self.value is None else self.value
        out = torch.full_like(rewards, current)
        mean = float(rewards.detach().mean())
        self.value = mean if self.value is None else self.decay * self.value + (1 - self.decay) * mean
        return out

    def state_dict(self) -> dict:
        return {"decay": self.decay, "value": self.value}

    def load_state_dict(self, state: dict) -> None:
        self.decay, self.value = float(state["decay"]), state["value"]


def surrogate_loss(
    log_pi: torch.Tensor,
    pseudo_rewards: torch.Tensor,
    baseline: torch.Tensor | float = 0.0,
    importance_weights: torch.Tensor | None = None,
    normaliser: float | None = None,
) -> torch.Tensor:
    r"""The scalar :math:`-\frac1n\sum_j w_j (R_j - b_j)\log\pi_\theta(x_j)` (rewards, weights detached).

    Its gradient is the f-DPG estimate of :math:`\nabla_\theta D_f(\pi_\theta\|p)`, so *minimising*
    it with any optimiser descends the divergence. ``log_pi`` is the sequence log-probability (sum
    over completion tokens) with its autograd graph. ``normaliser`` replaces :math:`n` (e.g. the
    global batch size in data-parallel or accumulated steps, so the sum of shards is the mean).
    """
    advantage = (pseudo_rewards.detach() - (baseline.detach() if torch.is_tensor(baseline) else baseline))
    advantage = advantage.to(log_pi.dtype)
    if importance_weights is not None:
        advantage = advantage * importance_weights.detach().to(log_pi.dtype)
    n = float(log_pi.numel()) if normaliser is None else float(normaliser)
    return -(advantage * log_pi).sum() / n
