r"""The baselines of :mod:`objectives.estimators`, value by value (exact, no sampling).

The unbiasedness of the f-DPG gradient needs a baseline :math:`b_j` that does not depend on sample :math:`j`
(:math:`E_q[w\,b_j\nabla\log\pi_\theta(x_j)] = 0` only then). The statistical tests in ``test_gradient.py``
check that in the slow suite; these check the same contracts exactly, in the fast one.
"""

from __future__ import annotations

import pytest
import torch

from objectives import MovingAverageBaseline, batch_baseline

# Three prompts of unequal sizes (3, 2 and 1 samples), interleaved as a gathered batch can be.
GROUPS = ["x", "y", "x", "z", "y", "x"]
REWARDS = torch.tensor([1.0, -2.0, 4.0, 7.0, 5.0, 10.0], dtype=torch.float64)


def test_prompt_loo_is_the_mean_of_the_other_samples_of_the_same_prompt() -> None:
    r"""``prompt_loo``, the trainer's default: :math:`b_j = \frac{1}{n_c - 1}\sum_{k \ne j,\,c_k = c_j} R_k`,
    with :math:`n_c` the number of samples of prompt :math:`c_j` (0 for a prompt with one sample), so that
    :math:`\partial b_j/\partial R_j = 0`: changing :math:`R_j` alone leaves :math:`b_j` unchanged and moves every
    other :math:`b_k` of its prompt by :math:`\Delta/(n_c - 1)`. A baseline averaging over the whole prompt
    (:math:`j` included) gives :math:`\bar R_c` instead and fails both."""
    b = batch_baseline(REWARDS, "prompt_loo", GROUPS)
    expected = []
    for j, c in enumerate(GROUPS):
        others = [float(REWARDS[k]) for k, g in enumerate(GROUPS) if g == c and k != j]
        expected.append(sum(others) / len(others) if others else 0.0)
    torch.testing.assert_close(b, torch.tensor(expected, dtype=torch.float64), rtol=0, atol=1e-12)
    assert b.tolist() == pytest.approx([7.0, 5.0, 5.5, 0.0, -2.0, 2.5])  # the same, by hand

    for j, c in enumerate(GROUPS):
        moved = REWARDS.clone()
        moved[j] += 100.0
        shifted = batch_baseline(moved, "prompt_loo", GROUPS)
        n_c = GROUPS.count(c)
        delta = torch.tensor([0.0 if k == j or g != c else 100.0 / (n_c - 1) for k, g in enumerate(GROUPS)],
                             dtype=torch.float64)
        torch.testing.assert_close(shifted - b, delta, rtol=0, atol=1e-9)


def test_moving_average_returns_the_past_batches_average_before_updating() -> None:
    r"""``MovingAverageBaseline(decay=γ)``: the baseline returned for batch :math:`t` is computed from batches
    :math:`1..t-1` only, then updated with batch :math:`t`: :math:`b_1 = 0`, :math:`b_2 = \bar R_1`,
    :math:`b_{t+1} = \gamma b_t + (1-\gamma)\bar R_t` for :math:`t \ge 2`. So two baselines with the same history
    return the same value whatever the current batch is. One that updates first (returns
    :math:`\gamma b + (1-\gamma)\bar R_t`, the current batch included) fails every line."""
    gamma = 0.75
    baseline = MovingAverageBaseline(gamma)
    batches = [torch.tensor([1.0, 3.0]), torch.tensor([10.0, 20.0, 30.0]), torch.tensor([-8.0]),
               torch.tensor([4.0, 4.0, 6.0, 6.0])]
    means = [float(r.mean()) for r in batches]  # 2, 20, -8, 5
    expected = [0.0, means[0], gamma * means[0] + (1 - gamma) * means[1]]
    expected.append(gamma * expected[2] + (1 - gamma) * means[2])
    for rewards, want in zip(batches, expected):
        out = baseline(rewards)
        assert out.shape == rewards.shape
        torch.testing.assert_close(out, torch.full_like(rewards, want), rtol=0, atol=1e-6)
    assert baseline.value == pytest.approx(gamma * expected[3] + (1 - gamma) * means[3])

    # Independent of the current batch: the same history, two different current batches.
    twins = [MovingAverageBaseline(gamma), MovingAverageBaseline(gamma)]
    for twin in twins:
        twin(batches[0])
        twin(batches[1])
    low, high = twins[0](torch.tensor([-1000.0, -1000.0])), twins[1](torch.tensor([1000.0, 1000.0]))
    torch.testing.assert_close(low, high, rtol=0, atol=0)
    assert float(low[0]) == pytest.approx(expected[2])
