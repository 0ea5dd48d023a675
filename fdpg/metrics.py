r"""Per-step metrics of a batch of samples: divergence estimates, diversity, entropy.

With samples :math:`x_j\sim q` and weights :math:`w_j = \pi(x_j)/q(x_j)` (1 on-policy):

- :math:`KL(\pi\|a) \approx \frac1n\sum_j w_j(\log\pi(x_j) - \log a(x_j))`, the "distance from the base
  model" axis of the Pareto frontier;
- :math:`KL(p\|\pi)` and :math:`D_f(\pi\|p)` by :meth:`objectives.Divergence.estimate`;
- entropy :math:`H(\pi) \approx -\frac1n\sum_j w_j\log\pi(x_j)` (per sequence, and per token);
- Distinct-n: unique n-grams of completion tokens over all n-grams in the batch (Li et al. 2016).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from objectives import Divergence, ForwardKL


def distinct_n(token_rows: Sequence[Sequence[int]], n: int) -> float:
    """Distinct-n of a batch: |unique n-grams| / |n-grams| over all rows (0 when there are none)."""
    total = 0
    unique: set[tuple[int, ...]] = set()
    for row in token_rows:
        grams = [tuple(row[i:i + n]) for i in range(len(row) - n + 1)]
        total += len(grams)
        unique.update(grams)
    return len(unique) / total if total else 0.0


def _finite(value: float) -> float | None:
    return value if math.isfinite(value) else None


def batch_metrics(
    divergence: Divergence,
    log_pi: torch.Tensor,
    log_q: torch.Tensor,
    log_a: torch.Tensor,
    log_p: torch.Tensor,
    completion_tokens: Sequence[Sequence[int]],
    pseudo_rewards: torch.Tensor,
    texts: Sequence[str],
) -> dict[str, float | None]:
    """The divergence, entropy and diversity metrics of one (gathered) batch; non-finite -> ``None``."""
    log_pi, log_q, log_a, log_p = (x.double().cpu() for x in (log_pi, log_q, log_a, log_p))
    w = torch.exp(log_pi - log_q)
    lengths = torch.tensor([len(r) for r in completion_tokens], dtype=torch.float64)
    zero_p = log_p == -math.inf
    out: dict[str, float | None] = {
        "kl_pi_a": float((w * (log_pi - log_a)).mean()),
        "kl_p_pi": _finite(float(ForwardKL().estimate(log_pi, log_p, log_q))),
        "d_f": _finite(float(divergence.estimate(log_pi, log_p, log_q))),
        "entropy": float(-(w * log_pi).mean()),
        "entropy_per_token": float(-(w * log_pi).sum() / lengths.clamp(min=1).sum()),
        "pseudo_reward_mean": float(pseudo_rewards.double().mean()),
        "pseudo_reward_std": float(pseudo_rewards.double().std()) if pseudo_rewards.numel() > 1 else 0.0,
        "target_zero_fraction": float(zero_p.double().mean()),
        "completion_length": float(lengths.mean()),
        "empty_fraction": sum(not t.strip() for t in texts) / max(len(texts), 1),
        "is_ess": float(w.sum() ** 2 / (w**2).sum()) if bool((w > 0).any()) else 0.0,
    }
    for n in (1, 2, 3):
        out[f"distinct_{n}"] = distinct_n(completion_tokens, n)
    return out
