"""Energy-based targets P = a * prod_k Phi_k: composition, validation and descriptions."""

from __future__ import annotations

import math

import pytest
import torch
from toy_model import ToyProblem

from objectives import (
    BinaryConstraint,
    ExponentialFamily,
    KLRegularisedReward,
    ScoreError,
    Target,
    binary_constraint,
    exponential_family,
    rl_with_kl,
)

LOG_A = torch.tensor([-1.0, -2.0, -0.5, -3.0], dtype=torch.float64)
REWARD = torch.tensor([0.3, -1.2, 2.0, 0.0], dtype=torch.float64)
B = torch.tensor([1.0, 0.0, 1.0, 1.0], dtype=torch.float64)
PHI = torch.tensor([0.0, 1.0, 1.0, 0.5], dtype=torch.float64)
SCORES = {"reward": REWARD, "b": B, "phi": PHI}


def test_rl_with_kl_is_log_a_plus_reward_over_beta() -> None:
    target = rl_with_kl("reward", 0.25)
    torch.testing.assert_close(target.log_P(LOG_A, SCORES), LOG_A + REWARD / 0.25)
    assert target.features == ("reward",)
    assert not target.conditional and target.include_base


def test_binary_constraint_is_log_a_or_minus_infinity() -> None:
    log_P = binary_constraint("b").log_P(LOG_A, SCORES)
    assert log_P[1] == -math.inf
    torch.testing.assert_close(log_P[B == 1], LOG_A[B == 1])
    as_bool = binary_constraint("b").log_P(LOG_A, {"b": torch.tensor([True, False, True, True])})
    torch.testing.assert_close(as_bool, log_P)


def test_binary_constraint_rejects_graded_scores() -> None:
    with pytest.raises(ScoreError, match=r"'b'.*0 or 1.*0\.5"):
        binary_constraint("b").log_P(LOG_A, {"b": torch.tensor([1.0, 0.5, 0.0, 1.0])})


def test_exponential_family() -> None:
    target = exponential_family({"phi": 0.7, "reward": -0.2})
    torch.testing.assert_close(target.log_P(LOG_A, SCORES), LOG_A + 0.7 * PHI - 0.2 * REWARD)
    assert target.features == ("phi", "reward")
    zero = exponential_family(["phi"])
    assert zero.energies[0].lambdas == {"phi": 0.0}
    torch.testing.assert_close(zero.log_P(LOG_A, SCORES), LOG_A)


def test_product_composes_energies_and_keeps_conditional() -> None:
    rl, b = rl_with_kl("reward", 0.5), binary_constraint("b")
    product = rl * b
    torch.testing.assert_close(product.log_P(LOG_A, SCORES), LOG_A + REWARD / 0.5 + torch.log(B))
    assert product.features == ("reward", "b")
    assert not product.conditional
    assert (rl.as_conditional() * b).conditional and (b * rl.as_conditional()).conditional
    assert not rl.as_conditional().as_conditional(False).conditional
    with_energy = product * ExponentialFamily({"phi": 1.5})
    torch.testing.assert_close(
        with_energy.log_P(LOG_A, SCORES), LOG_A + REWARD / 0.5 + torch.log(B) + 1.5 * PHI
    )
    assert with_energy.features == ("reward", "b", "phi")
    # a factor used twice counts twice; the base model only once
    twice = rl * rl
    torch.testing.assert_close(twice.log_P(LOG_A, SCORES), LOG_A + 2 * REWARD / 0.5)
    with pytest.raises(TypeError):
        rl * 3  # type: ignore[operator]


def test_energy_without_base_model() -> None:
    energy_only = Target((KLRegularisedReward("reward", 2.0),), include_base=False)
    torch.testing.assert_close(energy_only.log_P(LOG_A, SCORES), REWARD / 2.0)
    assert energy_only.describe() == "P(x) = exp(reward/2)"
    assert (energy_only * binary_constraint("b")).include_base
    torch.testing.assert_close(Target().log_P(LOG_A, {}), LOG_A)


def test_log_P_dtype_and_lists() -> None:
    log_P = rl_with_kl("reward", 1.0).log_P(LOG_A.float(), {"reward": REWARD.tolist()})
    assert log_P.dtype == torch.float64
    torch.testing.assert_close(log_P, (LOG_A.float().double() + REWARD))


def test_score_errors_name_the_problem() -> None:
    target = rl_with_kl("reward", 0.5) * binary_constraint("b")
    with pytest.raises(ScoreError, match=r"needs scores \['b'\]"):
        target.log_P(LOG_A, {"reward": REWARD})
    with pytest.raises(ScoreError, match=r"score 'reward' has shape \(3,\).*log_a has shape \(4,\)"):
        target.log_P(LOG_A, {"reward": REWARD[:3], "b": B})
    with pytest.raises(ScoreError, match=r"score 'b' contains NaN.*index \(2,\)"):
        target.log_P(LOG_A, {"reward": REWARD, "b": torch.tensor([1.0, 0.0, math.nan, 1.0])})
    with pytest.raises(ScoreError, match="log_a contains NaN"):
        target.log_P(torch.tensor([math.nan, 0.0, 0.0, 0.0]), SCORES)
    with pytest.raises(ScoreError, match="'reward' must be numbers"):
        target.log_P(LOG_A, {"reward": ["high", "low", "x", "y"], "b": B})


def test_invalid_parameters() -> None:
    for beta in (0.0, -1.0, math.inf, math.nan):
        with pytest.raises(ValueError, match="beta"):
            KLRegularisedReward("reward", beta)
    with pytest.raises(ValueError, match="at least one feature"):
        ExponentialFamily({})
    with pytest.raises(ValueError, match="'phi'"):
        ExponentialFamily({"phi": math.inf})


def test_describe() -> None:
    assert rl_with_kl("reward", 0.1).describe() == "P(x) = a * exp(reward/0.1)"
    assert binary_constraint("polite").describe() == "P(x) = a * polite"
    assert (
        rl_with_kl("r", 0.5) * binary_constraint("b")
    ).as_conditional().describe() == "P(x|c) = a * exp(r/0.5) * b"
    assert exponential_family({"phi": 0.25, "psi": -1.0}).describe() == "P(x) = a * exp(0.25*phi + -1*psi)"
    assert Target(include_base=False).describe() == "P(x) = 1"
    assert BinaryConstraint("b").describe() == "b"


def test_toy_targets_compose_over_the_enumeration(rl_problem: ToyProblem) -> None:
    """On the toy: log P of every sequence, and of sampled ones, is log a + r/beta (+ log b + lambda phi)."""
    p = rl_problem
    beta = p.target.energies[0].beta
    torch.testing.assert_close(p.log_P, p.log_a + p.features["reward"] / beta)
    composed = p.target * binary_constraint("b") * exponential_family({"phi": 0.3})
    expected = p.log_a + p.features["reward"] / beta + torch.log(p.features["b"]) + 0.3 * p.features["phi"]
    torch.testing.assert_close(composed.log_P(p.log_a, p.features), expected)
    idx = torch.tensor([4, 0, 26, 4])
    # the target on sampled scores (a repeated index included) against log a + r / beta written out
    sampled = p.sampled_log_P(idx)
    torch.testing.assert_close(sampled, p.log_a[idx] + p.features["reward"][idx] / beta)
    assert sampled[0] == sampled[3] and len(set(sampled.tolist())) == 3
    assert math.isclose(float(torch.logsumexp(p.log_p, 0)), 0.0, abs_tol=1e-12)
