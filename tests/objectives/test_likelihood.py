"""SFT's and RAFT's losses in the f-divergence view, on the exact enumerable toy model.

RAFT's expected gradient is computed exactly by enumerating every k-tuple of samples of the toy policy (weighted by
its probability), applying the library's selection and loss to each: it must equal the exact gradient of
KL(q_k || pi_theta) with q_k the best-of-k distribution of the (frozen) current policy.
"""

from __future__ import annotations

import itertools

import pytest
import torch
from toy_model import ToyAutoregressive

from objectives.likelihood import (
    best_of_k_log_probs,
    completion_nll,
    keep_above_quantile,
    keep_best_of_k,
    rejection_sampling_loss,
)


def tuples(n_sequences: int, k: int) -> torch.Tensor:
    """Every ordered k-tuple of sequence indices, ``[S**k, k]``."""
    return torch.tensor(list(itertools.product(range(n_sequences), repeat=k)), dtype=torch.long)


@pytest.mark.parametrize("tied", [False, True])
def test_the_kept_sample_is_distributed_as_the_best_of_k_distribution(tied: bool) -> None:
    """Summing the probability of every k-tuple onto the sample keep_best_of_k keeps gives q_k exactly, ties too
    (integer scores: several sequences share a score, the first of the tied best is kept)."""
    policy = ToyAutoregressive(vocab=2, length=3, seed=4, scale=1.0)
    log_pi = policy.log_probs_all().detach()
    gen = torch.Generator().manual_seed(7)
    scores = torch.randint(0, 3, (policy.n_sequences,), generator=gen).double() if tied else \
        torch.randn(policy.n_sequences, generator=gen, dtype=torch.float64)
    k = 3
    every = tuples(policy.n_sequences, k)
    weight = log_pi[every].sum(-1).exp()  # P(tuple) = prod pi
    keep = keep_best_of_k(scores[every])
    assert (keep.sum(-1) == 1).all()
    kept = every[keep]
    enumerated = torch.zeros(policy.n_sequences, dtype=torch.float64).index_add_(0, kept, weight)
    assert torch.allclose(enumerated, best_of_k_log_probs(log_pi, scores, k).exp(), atol=1e-12)
    assert abs(float(enumerated.sum()) - 1.0) < 1e-12
    # the best-of-k distribution is not the policy (the test can fail)
    assert (enumerated - log_pi.exp()).abs().max() > 0.05


def test_the_raft_gradient_is_a_forward_kl_step_toward_best_of_k_of_the_current_policy() -> None:
    r"""E over k-tuples of grad rejection_sampling_loss = grad KL(q_k || pi_theta) at theta_t, q_k frozen
    (= -sum_y q_k(y) grad log pi_theta(y))."""
    policy = ToyAutoregressive(vocab=2, length=3, seed=5, scale=1.0)
    scores = torch.randn(policy.n_sequences, generator=torch.Generator().manual_seed(11), dtype=torch.float64)
    k = 3
    every = tuples(policy.n_sequences, k)
    log_pi_all = policy.log_probs_all()
    weight = log_pi_all.detach()[every].sum(-1).exp()
    keep = keep_best_of_k(scores[every])
    losses = torch.stack([rejection_sampling_loss(log_pi_all[t], m) for t, m in zip(every, keep)])
    (applied,) = torch.autograd.grad((weight * losses).sum(), policy.logits)

    q = best_of_k_log_probs(log_pi_all.detach(), scores, k).exp()
    log_pi = policy.log_probs_all()
    kl = (q * (q.log() - log_pi)).sum()  # KL(q_k || pi_theta)
    (exact,) = torch.autograd.grad(kl, policy.logits)
    assert torch.allclose(applied, exact, atol=1e-12), float((applied - exact).abs().max())
    assert exact.abs().max() > 1e-3  # a real step
    # keeping every sample instead (no rejection) would be a step toward pi itself: zero expected gradient
    log_pi_all = policy.log_probs_all()
    all_losses = torch.stack([rejection_sampling_loss(log_pi_all[t], torch.ones(k, dtype=torch.bool)) for t in every])
    (none_rejected,) = torch.autograd.grad((weight * all_losses).sum(), policy.logits)
    assert none_rejected.abs().max() < 1e-12


def test_completion_nll_is_the_mean_over_completion_tokens() -> None:
    log_probs = torch.tensor([[-1.0, -2.0, -5.0], [-0.5, -7.0, -9.0]], dtype=torch.float64)
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    assert float(completion_nll(log_probs, mask)) == pytest.approx((1.0 + 2.0 + 0.5) / 3)
    assert float(completion_nll(log_probs, mask, n_tokens=6)) == pytest.approx(3.5 / 6)
    with pytest.raises(ValueError, match="no completion tokens"):
        completion_nll(log_probs, torch.zeros_like(mask))


def test_selection_rules() -> None:
    scores = torch.tensor([[0.1, 0.9, 0.9], [float("nan"), -1.0, -2.0]])
    assert keep_best_of_k(scores).tolist() == [[False, True, False], [False, True, False]]
    flat = torch.tensor([1.0, 2.0, 3.0, 4.0, float("nan")])
    assert keep_above_quantile(flat, 0.5).tolist() == [False, False, True, True, False]
    assert keep_above_quantile(flat, 0.0).tolist() == [True, True, True, True, False]
    with pytest.raises(ValueError, match="quantile must be in"):
        keep_above_quantile(flat, 1.0)
    with pytest.raises(ValueError, match="no sample kept"):
        rejection_sampling_loss(torch.zeros(3), torch.zeros(3, dtype=torch.bool))
