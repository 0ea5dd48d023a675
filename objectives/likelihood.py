r"""Likelihood objectives: supervised fine-tuning and rejection-sampling fine-tuning (RAFT), in the f-divergence view.

**Supervised fine-tuning** on demonstrations :math:`(c, y) \sim \mathcal D` minimises the negative log-likelihood
of the completion tokens, :math:`-\sum_{t} \log\pi_\theta(y_t\mid c, y_{<t})`, averaged over the batch's completion
tokens (:func:`completion_nll`; the prompt tokens carry no loss, as transformers' causal-LM loss with ``-100``
labels on them). Over whole sequences it is :math:`KL(\mathcal D\|\pi_\theta) + H(\mathcal D)`: forward KL from
the data, the divergence f-DPG calls ``fkl``, with the empirical distribution as the target.

**RAFT** (Dong et al. 2023; ReST, Gulcehre et al. 2023, online): at each step :math:`k` completions per prompt
from the current policy :math:`\pi_t`, the best kept (:func:`keep_best_of_k`; or every sample above a quantile of
the batch's scores, :func:`keep_above_quantile`), and a likelihood step on the kept ones
(:func:`rejection_sampling_loss`: :math:`-\frac1{|K|}\sum_{j\in K}\log\pi_\theta(y_j\mid c_j)`). The kept sample of
a prompt is distributed as the best-of-:math:`k` distribution of :math:`\pi_t`,

.. math::

    q_k(y\mid c) = \big(F(r(y))^k - F^-(r(y))^k\big)\,\frac{\pi_t(y\mid c)}{\pi_t(r = r(y)\mid c)},
    \qquad F(s) = \pi_t(r\le s\mid c),\ F^-(s) = \pi_t(r < s\mid c)

(:func:`best_of_k_log_probs`; ties split in proportion to :math:`\pi_t`, which is exactly what keeping the first of
the tied best samples does), so the expected RAFT gradient at :math:`\theta = \theta_t` is

.. math::

    -E_{y\sim q_k}[\nabla_\theta\log\pi_\theta(y)] = \nabla_\theta\,KL(q_k\|\pi_\theta)\big|_{\theta_t}:

a forward-KL step toward the frozen target :math:`p_t = q_k` (an energy-based target
:math:`P_t(y) = \pi_t(y)\,w_k(r(y))`, :math:`w_k` the increasing weight above). Each step moves the target with the
policy, and nothing anchors it to the base model :math:`a`: iterated, RAFT climbs toward the reward's maximisers,
its KL from :math:`a` bounded only by the number of steps (unlike f-DPG's fixed :math:`p \propto a e^{r/\beta}`).
With a quantile the target is :math:`\pi_t` restricted to the top of the score distribution,
:math:`P_t = \pi_t\cdot 1[r \ge \tau_t]` (GDC's binary-constraint target, with :math:`a = \pi_t`), :math:`\tau_t` the
batch's quantile.
"""

from __future__ import annotations

import torch


def completion_nll(token_log_probs: torch.Tensor, mask: torch.Tensor, n_tokens: float | None = None) -> torch.Tensor:
    r"""Supervised fine-tuning's loss: :math:`-\frac1N\sum_{j,t} m_{jt}\log\pi_\theta(y_{jt}\mid c_j, y_{j,<t})`.

    ``token_log_probs`` and ``mask`` are ``[B, T]`` over the completion tokens (``mask`` 1 on real tokens); ``N``
    is ``n_tokens`` when given (a whole batch's count, for a micro-batch's share of it), else ``mask.sum()``."""
    if token_log_probs.shape != mask.shape:
        raise ValueError(f"token_log_probs {tuple(token_log_probs.shape)} and mask {tuple(mask.shape)} differ in shape")
    n = float(mask.sum()) if n_tokens is None else float(n_tokens)
    if n <= 0:
        raise ValueError("completion_nll: no completion tokens (every mask entry is 0)")
    return -(token_log_probs * mask.to(token_log_probs.dtype)).sum() / n


def keep_best_of_k(scores: torch.Tensor) -> torch.Tensor:
    r"""``[n, k]`` scores of ``k`` samples for each of ``n`` prompts -> a ``[n, k]`` boolean mask keeping each prompt's
    best sample (the first of tied ones: over i.i.d. samples, the first of those tied at the top is distributed as
    :math:`\pi` restricted to that score, as :func:`best_of_k_log_probs` assumes). NaN scores are never kept."""
    if scores.dim() != 2 or scores.shape[1] < 1:
        raise ValueError(f"scores must be [prompts, k] with k >= 1, got shape {tuple(scores.shape)}")
    filled = torch.where(torch.isnan(scores), torch.full_like(scores, -torch.inf), scores)
    keep = torch.zeros(scores.shape, dtype=torch.bool)
    keep[torch.arange(scores.shape[0]), filled.argmax(dim=1)] = True
    return keep & ~torch.isnan(scores)


def keep_above_quantile(scores: torch.Tensor, quantile: float) -> torch.Tensor:
    r"""``[N]`` scores -> a boolean mask keeping the samples whose score is at least the batch's ``quantile``
    (:math:`\tau` = ``torch.quantile``, linear interpolation; at least the best sample is kept)."""
    if not 0 <= quantile < 1:
        raise ValueError(f"quantile must be in [0, 1), got {quantile!r}")
    finite = scores[~torch.isnan(scores)]
    if finite.numel() == 0:
        raise ValueError("keep_above_quantile: every score is NaN")
    tau = torch.quantile(finite.double(), quantile)
    keep = scores.double() >= tau
    if not keep.any():
        keep = scores == finite.max()
    return keep & ~torch.isnan(scores)


def rejection_sampling_loss(log_pi: torch.Tensor, keep: torch.Tensor, n_kept: float | None = None) -> torch.Tensor:
    r"""RAFT's loss: :math:`-\frac1{|K|}\sum_{j\in K}\log\pi_\theta(y_j\mid c_j)` over the kept samples (``keep``;
    :math:`|K|` is ``n_kept`` when given, a whole batch's count for a micro-batch's share)."""
    if log_pi.shape != keep.shape:
        raise ValueError(f"log_pi {tuple(log_pi.shape)} and keep {tuple(keep.shape)} differ in shape")
    n = float(keep.sum()) if n_kept is None else float(n_kept)
    if n <= 0:
        raise ValueError("rejection_sampling_loss: no sample kept")
    return -(log_pi * keep.to(log_pi.dtype)).sum() / n


def best_of_k_log_probs(log_pi: torch.Tensor, scores: torch.Tensor, k: int) -> torch.Tensor:
    r"""Exact :math:`\log q_k(y)` of the best-of-``k`` distribution of :math:`\pi` (module docstring) over an enumerated
    support: ``log_pi`` and ``scores`` are ``[S]`` over every sequence; sequences of equal score share their score's
    mass in proportion to :math:`\pi`. Differentiable in ``log_pi``."""
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    probs = log_pi.exp()
    same = scores.unsqueeze(0) == scores.unsqueeze(1)  # [S, S]: y' has y's score
    below = scores.unsqueeze(0) < scores.unsqueeze(1)  # [S, S]: y' scores less than y
    mass_at = (same * probs.unsqueeze(0)).sum(-1)
    f_minus = (below * probs.unsqueeze(0)).sum(-1)
    f = f_minus + mass_at
    return torch.log(f ** k - f_minus ** k) + log_pi - torch.log(mass_at)
