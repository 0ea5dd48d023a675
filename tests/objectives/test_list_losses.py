"""RRHF, PRO and LiPO-λ equal their papers' formulas written out here independently, element by element, in plain
floats (TRL has none of them)."""

from __future__ import annotations

import math

import pytest
import torch

from objectives.list_losses import lipo_lambda_loss, pro_loss, ranking_labels, rrhf_loss

P = [-1.2, -0.4, -2.0, -0.9]  # per-token log-likelihoods of a ranking of 4, best first (not in order: hinges bind)


def test_rrhf_is_the_sum_of_hinges_over_every_ordered_pair_plus_the_best_nll():
    written = sum(max(0.0, P[j] - P[i]) for i in range(4) for j in range(i + 1, 4)) + 0.7 * 5.5
    assert float(rrhf_loss(torch.tensor(P, dtype=torch.float64), torch.tensor(5.5), 0.7)) == pytest.approx(written)


def test_pro_is_plackett_luce_over_the_ranking_plus_the_best_nll_per_token():
    written = -sum(P[k] - math.log(sum(math.exp(P[i]) for i in range(k, 4))) for k in range(3)) + 0.3 * (-P[0])
    assert float(pro_loss(torch.tensor(P, dtype=torch.float64), 0.3)) == pytest.approx(written)


def test_lipo_lambda_is_the_lambda_weighted_dpo_terms_of_every_ordered_pair():
    s = [0.3, 1.1, -0.2, 0.5]
    psi = [1.0, 0.6, 0.6, 0.0]  # a tie (0.6, 0.6): no term
    order = sorted(range(4), key=lambda i: -s[i])
    tau = {i: order.index(i) + 1 for i in range(4)}
    written = 0.0
    for i in range(4):
        for j in range(4):
            if psi[i] > psi[j]:
                delta = abs((2 ** psi[i] - 1) - (2 ** psi[j] - 1)) * abs(1 / math.log2(1 + tau[i])
                                                                        - 1 / math.log2(1 + tau[j]))
                written += delta * -math.log(1 / (1 + math.exp(-(s[i] - s[j]))))
    got = lipo_lambda_loss(torch.tensor(s, dtype=torch.float64), torch.tensor(psi, dtype=torch.float64))
    assert written > 0.1 and float(got) == pytest.approx(written)


def test_the_losses_fall_when_the_scores_follow_the_ranking():
    ordered, reversed_ = torch.tensor([0.0, -1.0, -2.0]), torch.tensor([-2.0, -1.0, 0.0])
    assert float(rrhf_loss(ordered, torch.tensor(0.0))) == 0 < float(rrhf_loss(reversed_, torch.tensor(0.0)))
    assert float(pro_loss(ordered, 0.0)) < float(pro_loss(reversed_, 0.0))
    labels = ranking_labels(3)
    assert float(lipo_lambda_loss(ordered, labels)) < float(lipo_lambda_loss(reversed_, labels))


def test_labels_by_position_and_from_scores_and_bad_rankings():
    assert ranking_labels(3).tolist() == [1.0, 0.5, 0.0]
    assert ranking_labels(2, [3.0, 1.0]).tolist() == [3.0, 1.0]
    with pytest.raises(ValueError, match="2 finite scores"):
        ranking_labels(2, [1.0])
    with pytest.raises(ValueError, match="at least 2 responses"):
        pro_loss(torch.tensor([0.1]))
