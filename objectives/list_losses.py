r"""List-wise preference losses from K-wise rankings :math:`y_1 \succ y_2 \succ \dots \succ y_K` of one prompt.

Each function takes one ranking's per-response tensors (``[K]``, best first) and returns its scalar loss; the batch's
loss is their mean over rankings.

- **RRHF** (Yuan et al. 2023, Eq. 2-4), reference-free: with the length-normalised log-likelihood
  :math:`p_i = \frac1{|y_i|}\log\pi_\theta(y_i\mid x)`, :math:`\mathcal L = \sum_{i<j}\max(0, p_j - p_i)
  + \alpha\,\mathcal L_{ft}`, :math:`\mathcal L_{ft} = -\log\pi_\theta(y_1\mid x)` (the best response's NLL, a sum
  over its tokens) (:func:`rrhf_loss`).
- **PRO** (Song et al. 2023, Eq. 5-6; without its reward-difference temperatures), reference-free: Plackett-Luce
  over the ranking with :math:`p_i` as the score, :math:`\mathcal L = -\sum_{k=1}^{K-1}\log\frac{e^{p_k}}
  {\sum_{i\ge k}e^{p_i}} + \alpha\,\mathcal L_{SFT}`, :math:`\mathcal L_{SFT} = -p_1` (the best response's NLL per
  token) (:func:`pro_loss`).
- **LiPO-λ** (Liu et al. 2024, Eq. 9-10), with the reference: the implicit rewards :math:`s_i = \beta\,(f'(\pi/
  \pi_{ref}) - f'(1))` (DPO's :math:`\beta\log\frac{\pi}{\pi_{ref}}` for reverse KL, f-DPO's for another f), graded
  labels :math:`\psi_i`, :math:`\mathcal L = -\sum_{\psi_i > \psi_j}\Delta_{ij}\log\sigma(s_i - s_j)` with the
  LambdaLoss weight :math:`\Delta_{ij} = |G_i - G_j|\,|\frac1{D(\tau_i)} - \frac1{D(\tau_j)}|`,
  :math:`G_i = 2^{\psi_i} - 1`, :math:`D(\tau) = \log_2(1 + \tau)` and :math:`\tau_i` the rank of :math:`s_i` in
  the current (detached) order, 1 the highest (:func:`lipo_lambda_loss`).

**Their f-divergence reading.** LiPO's pairwise terms are DPO's on every ordered pair of the list, weighted by how
much swapping them changes the list's NDCG: on Bradley-Terry (or Plackett-Luce) preferences of a reward :math:`r`
its optimum is DPO's, the f-DPG target :math:`p\propto\pi_{ref}e^{r/\beta}` (reverse KL) or
:math:`f'(\pi/\pi_{ref}) = r/\beta + c` (another f). RRHF and PRO read no reference: their scores are
:math:`\log\pi` per token, i.e. the reverse-KL implicit reward toward a *uniform* reference (as SimPO's), and the
SFT term keeps :math:`\pi` on the best responses instead of a KL to :math:`a`; PRO is the Plackett-Luce
(list) form of that reward, RRHF its hinge on every pair.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

#: ``--list_loss``: the list-wise losses.
LIST_LOSSES = ("rrhf", "pro", "lipo")
#: The list losses that read no reference model.
REFERENCE_FREE_LIST_LOSSES = ("rrhf", "pro")


def _check_ranking(scores: torch.Tensor) -> None:
    if scores.dim() != 1 or scores.numel() < 2:
        raise ValueError(f"a list loss needs one ranking of at least 2 responses, got scores of shape "
                         f"{tuple(scores.shape)}")


def rrhf_loss(per_token_log_likelihood: torch.Tensor, best_nll: torch.Tensor, nll_coef: float = 1.0) -> torch.Tensor:
    r"""RRHF's loss of one ranking: ``per_token_log_likelihood`` :math:`p_i` (``[K]``, best first), ``best_nll``
    :math:`-\log\pi(y_1\mid x)` (summed over its tokens)."""
    _check_ranking(per_token_log_likelihood)
    p = per_token_log_likelihood
    i, j = torch.triu_indices(len(p), len(p), offset=1, device=p.device)
    return F.relu(p[j] - p[i]).sum() + nll_coef * best_nll


def pro_loss(per_token_log_likelihood: torch.Tensor, nll_coef: float = 1.0) -> torch.Tensor:
    r"""PRO's loss of one ranking: Plackett-Luce of :math:`p_i` (``[K]``, best first) plus ``nll_coef`` times the
    best response's NLL per token, :math:`-p_1`."""
    _check_ranking(per_token_log_likelihood)
    p = per_token_log_likelihood
    # log sum_{i >= k} exp(p_i) for every k: a reversed cumulative logsumexp
    tails = torch.logcumsumexp(p.flip(0), 0).flip(0)
    return -(p[:-1] - tails[:-1]).sum() + nll_coef * (-p[0])


def lipo_lambda_loss(implicit_rewards: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    r"""LiPO-λ's loss of one list: the implicit rewards :math:`s_i` (``[K]``) and graded labels :math:`\psi_i`
    (``[K]``, higher is better; ties contribute nothing)."""
    _check_ranking(implicit_rewards)
    s, psi = implicit_rewards, labels.to(implicit_rewards)
    if psi.shape != s.shape:
        raise ValueError(f"LiPO needs one label per response: {tuple(psi.shape)} labels for {tuple(s.shape)} rewards")
    order = torch.argsort(s.detach(), descending=True)
    rank = torch.empty_like(order)
    rank[order] = torch.arange(1, len(s) + 1, device=s.device)
    inverse_discount = 1.0 / torch.log2(1.0 + rank.to(s))
    gain = 2.0 ** psi - 1.0
    delta = (gain[:, None] - gain[None, :]).abs() * (inverse_discount[:, None] - inverse_discount[None, :]).abs()
    better = psi[:, None] > psi[None, :]
    pairwise = -F.logsigmoid(s[:, None] - s[None, :])
    return (delta * pairwise * better.to(s)).sum()


def ranking_labels(k: int, scores: list[float] | None = None) -> torch.Tensor:
    r"""LiPO's graded labels of a ranking of ``k``: its ``scores`` when given, else by position,
    :math:`\psi_i = (K - i)/(K - 1)` for the i-th best (1 for the best, 0 for the worst)."""
    if scores is not None:
        if len(scores) != k or not all(math.isfinite(float(v)) for v in scores):
            raise ValueError(f"LiPO's labels: {k} finite scores expected, got {scores!r}")
        return torch.tensor([float(v) for v in scores], dtype=torch.float64)
    return torch.tensor([(k - 1 - i) / (k - 1) for i in range(k)], dtype=torch.float64)
