r"""The mathematics of PPO for language models (Schulman et al. 2017; Ziegler et al. 2019; Ouyang et al. 2022).

Per-token tensors are ``[B, T]`` over completion tokens, with a ``mask`` (1 up to and including the first
end-of-sequence token). Token :math:`t` of completion :math:`i` is the action :math:`y_t` taken in the state
:math:`s_t = (c, y_{<t})`.

- :func:`kl_per_token`: estimators of :math:`KL(\pi\|a)` per token from :math:`\log\pi - \log a` of the sampled
  token (Schulman 2020): k1 :math:`= \log\frac{\pi}{a}` (unbiased), k2 :math:`= \tfrac12(\log\frac{\pi}{a})^2`,
  k3 :math:`= \frac{a}{\pi} - 1 - \log\frac{a}{\pi}` (unbiased, never negative).
- :func:`place_on_last_token`: a sequence score on the completion's last real token (not on a pad after it).
- :func:`generalized_advantages`: GAE(:math:`\gamma, \lambda`),
  :math:`\delta_t = r_t + \gamma V_{t+1} - V_t`, :math:`A_t = \sum_{l\ge0}(\gamma\lambda)^l\delta_{t+l}`,
  returns :math:`G_t = A_t + V_t` (the value after the last real token is 0).
- :func:`masked_whiten`: :math:`(x - \bar x)/\sigma_x` over the real tokens.
- :func:`clipped_policy_loss`: :math:`-\min(\rho_t A_t, \operatorname{clip}(\rho_t, 1\pm\epsilon) A_t)` with
  :math:`\rho_t = \pi_\theta(y_t\mid s_t)/\pi_{old}(y_t\mid s_t)`, optionally dual-clipped at :math:`-c A_t`
  for :math:`A_t < 0` (Ye et al. 2020).
- :func:`clipped_value_loss`: :math:`\tfrac12\max((V - G)^2, (\operatorname{clip}(V, V_{old}\pm\epsilon_V) - G)^2)`.
- :func:`aggregate`: token-mean, or sequence-mean of token sums (a constant normaliser), or of token means.
- :class:`AdaptiveKLController` (Ziegler et al. 2019), :class:`FixedKLController`, :class:`RunningMoments`.

The special case that links PPO to f-DPG: one epoch of one minibatch (so :math:`\rho = 1`), no critic
(:math:`V = 0`), :math:`\gamma = \lambda = 1`, the k1 KL in the reward and the ``seq_mean_token_sum``
normaliser give :math:`A_t = r(x)\,[t = T] - \beta\sum_{t'\ge t}\log\frac{\pi}{a}(y_{t'})`, and the expected
gradient of the loss is :math:`-E_\pi[(r - \beta\log\frac{\pi}{a})\nabla\log\pi] = \beta\,\nabla KL(\pi\|p)` for
:math:`p\propto a\,e^{r/\beta}`: f-DPG's reverse-KL gradient scaled by :math:`\beta` (the reward-to-go keeps it
unbiased because each token's KL term depends only on the tokens up to it). Token-mean aggregation (a
per-batch, length-dependent weight), advantage whitening (a per-batch shift and scale), a learned critic
(a biased baseline while it is wrong) and :math:`\lambda < 1` each move PPO away from it.
"""

from __future__ import annotations

import math
from typing import Literal

import torch

KLEstimator = Literal["k1", "k2", "k3"]
KL_ESTIMATORS = ("k1", "k2", "k3")
Aggregation = Literal["token_mean", "seq_mean_token_sum", "seq_mean_token_mean"]
AGGREGATIONS = ("token_mean", "seq_mean_token_sum", "seq_mean_token_mean")


def kl_per_token(log_pi: torch.Tensor, log_ref: torch.Tensor, kind: str = "k1") -> torch.Tensor:
    r"""Per-token estimate of :math:`KL(\pi\|a)` from the sampled tokens' log-probabilities (see module doc)."""
    log_ratio = log_pi - log_ref
    if kind == "k1":
        return log_ratio
    if kind == "k2":
        return 0.5 * log_ratio**2
    if kind == "k3":
        return torch.expm1(-log_ratio) + log_ratio
    raise ValueError(f"unknown KL estimator {kind!r}; choose one of {', '.join(KL_ESTIMATORS)}")


def last_token_index(mask: torch.Tensor) -> torch.Tensor:
    """``[B]`` index of each row's last real token (0 for an empty row)."""
    return (mask.long().sum(-1) - 1).clamp(min=0)


def place_on_last_token(scores: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``[B, T]`` zeros with ``scores[i]`` on row i's last real token (the EOS when it has one)."""
    out = torch.zeros(mask.shape, dtype=scores.dtype, device=scores.device)
    rows = torch.arange(mask.shape[0], device=mask.device)
    out[rows, last_token_index(mask)] = scores * (mask.sum(-1) > 0).to(scores.dtype)
    return out


def _masked(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``x`` on the real tokens, 0 elsewhere, by selection: padding may hold anything (NaN, inf) and stays out."""
    return torch.where(mask.bool(), x, torch.zeros((), dtype=x.dtype, device=x.device))


def generalized_advantages(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0,
                           lam: float = 0.95) -> tuple[torch.Tensor, torch.Tensor]:
    r"""GAE advantages and returns ``([B, T], [B, T])``; masked positions get 0 and do not propagate.

    Masked positions are selected out, not multiplied by 0: a NaN reward or an infinite value on padding (beyond
    a sequence's end) leaves the real tokens' advantages as they are (``nan * 0`` would be NaN)."""
    rewards, values = _masked(rewards, mask), _masked(values, mask)
    live = mask.bool()
    advantages = torch.zeros_like(rewards)
    running = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(rewards.shape[1])):
        next_value = values[:, t + 1] if t + 1 < rewards.shape[1] else torch.zeros_like(running)
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        running = torch.where(live[:, t], delta + gamma * lam * running, torch.zeros_like(running))
        advantages[:, t] = running
    return advantages, _masked(advantages + values, mask)


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over the real tokens (padding, whatever it holds, selected out)."""
    return _masked(x, mask).sum() / mask.to(x.dtype).sum().clamp(min=1)


def masked_var(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Unbiased variance over the real tokens."""
    n = mask.to(x.dtype).sum()
    mean = _masked(x, mask).sum() / n.clamp(min=1)
    return _masked((x - mean) ** 2, mask).sum() / (n - 1).clamp(min=1)


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, eps: float = 1e-8,
                  moments: tuple[float, float] | None = None) -> torch.Tensor:
    """``(x - mean) / std`` over the real tokens (mean kept when ``shift_mean`` is false); 0 where masked.

    ``moments``: ``(mean, variance)`` to use instead of those of ``x`` (e.g. over all processes' tokens).
    """
    mean, var = (masked_mean(x, mask), masked_var(x, mask)) if moments is None else map(torch.tensor, moments)
    out = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return _masked(out, mask)


def clipped_policy_loss(log_pi: torch.Tensor, log_pi_old: torch.Tensor, advantages: torch.Tensor,
                        clip_range: float = 0.2, dual_clip: float | None = None
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    r"""Per-token clipped surrogate loss and where the clip binds (``[B, T]`` each); see the module doc.

    Where the clip binds the loss is constant in :math:`\theta` (zero gradient). ``dual_clip`` :math:`c > 1`
    bounds the loss of negative advantages at :math:`-c A_t`.
    """
    ratio = torch.exp(log_pi - log_pi_old)
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1 - clip_range, 1 + clip_range)
    loss = torch.maximum(unclipped, clipped)
    binds = clipped > unclipped
    if dual_clip is not None:
        if dual_clip <= 1:
            raise ValueError(f"dual_clip must be > 1, got {dual_clip!r}")
        capped = torch.minimum(loss, -dual_clip * advantages)
        binds = binds | ((advantages < 0) & (capped < loss))
        loss = torch.where(advantages < 0, capped, loss)
    return loss, binds


def clipped_value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor,
                       clip_range: float | None = 0.2) -> tuple[torch.Tensor, torch.Tensor]:
    r"""Per-token value loss :math:`\tfrac12\max((V-G)^2, (V_{clip}-G)^2)` and where the clipped term wins."""
    loss = (values - returns) ** 2
    if clip_range is None:
        return 0.5 * loss, torch.zeros_like(loss, dtype=torch.bool)
    clipped = old_values + (values - old_values).clamp(-clip_range, clip_range)
    loss_clipped = (clipped - returns) ** 2
    return 0.5 * torch.maximum(loss, loss_clipped), loss_clipped > loss


def aggregate(per_token: torch.Tensor, mask: torch.Tensor, mode: str = "token_mean",
              n_sequences: int | None = None, n_tokens: float | None = None) -> torch.Tensor:
    r"""Reduce a per-token loss to a scalar.

    ``token_mean``: :math:`\sum_{i,t}\ell_{it}/N_{tokens}`; ``seq_mean_token_sum``: :math:`\frac1B\sum_i\sum_t
    \ell_{it}` (a constant normaliser: the special case of the module doc); ``seq_mean_token_mean``:
    :math:`\frac1B\sum_i\frac{1}{T_i}\sum_t\ell_{it}`. ``n_sequences`` / ``n_tokens`` replace :math:`B` and
    :math:`N_{tokens}` (the whole minibatch's, when it is split into micro-batches).
    """
    mask = mask.to(per_token.dtype)
    b = float(per_token.shape[0] if n_sequences is None else n_sequences)
    if mode == "token_mean":
        n = float(mask.sum().clamp(min=1)) if n_tokens is None else float(n_tokens)
        return (per_token * mask).sum() / n
    if mode == "seq_mean_token_sum":
        return (per_token * mask).sum() / b
    if mode == "seq_mean_token_mean":
        return ((per_token * mask).sum(-1) / mask.sum(-1).clamp(min=1)).sum() / b
    raise ValueError(f"unknown loss aggregation {mode!r}; choose one of {', '.join(AGGREGATIONS)}")


def explained_variance(predicted: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> float:
    """:math:`1 - Var[G - V]/Var[G]` over the real tokens (nan when the returns do not vary)."""
    var = float(masked_var(target, mask))
    return 1.0 - float(masked_var(target - predicted, mask)) / var if var > 0 else math.nan


class FixedKLController:
    """A constant KL coefficient :math:`\\beta`."""

    def __init__(self, beta: float) -> None:
        self.value = float(beta)

    def update(self, kl: float, n_samples: int) -> None:
        pass

    def state_dict(self) -> dict:
        return {"value": self.value}

    def load_state_dict(self, state: dict) -> None:
        self.value = float(state["value"])


class AdaptiveKLController(FixedKLController):
    r"""Ziegler et al. (2019): :math:`e = \operatorname{clip}(KL/KL_{target} - 1, -0.2, 0.2)`,
    :math:`\beta \leftarrow \beta\,(1 + e\,n/H)` after a batch of :math:`n` samples (horizon :math:`H`)."""

    def __init__(self, beta: float, target: float, horizon: int) -> None:
        super().__init__(beta)
        if not target > 0 or not horizon > 0:
            raise ValueError(f"the adaptive KL controller needs target > 0 and horizon > 0, got {target}, {horizon}")
        self.target, self.horizon = float(target), int(horizon)

    def update(self, kl: float, n_samples: int) -> None:
        error = min(max(kl / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + error * n_samples / self.horizon


class RunningMoments:
    """Running mean and standard deviation of every value seen (Chan et al.'s parallel update)."""

    def __init__(self) -> None:
        self.mean, self.var, self.count = 0.0, 1.0, 0

    def update(self, x: torch.Tensor) -> None:
        x = x.detach().double().reshape(-1)
        n = x.numel()
        if n == 0:
            return
        batch_mean, batch_var = float(x.mean()), float(x.var(unbiased=False))
        total = self.count + n
        delta = batch_mean - self.mean
        m2 = self.var * self.count + batch_var * n + delta**2 * self.count * n / total
        self.mean += delta * n / total
        self.var, self.count = m2 / total, total

    @property
    def std(self) -> float:
        return math.sqrt(max(self.var, 1e-12))

    def state_dict(self) -> dict:
        return {"mean": self.mean, "var": self.var, "count": self.count}

    def load_state_dict(self, state: dict) -> None:
        self.mean, self.var, self.count = float(state["mean"]), float(state["var"]), int(state["count"])
