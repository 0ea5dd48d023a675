"""The interpolating-regime optimum of Song et al. (2023): independent checks, symmetry, limits, atoms."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.optimize
import scipy.stats
import torch

from objectives.errors import ObjectiveError
from objectives.reward_collapse import (
    EXACT_EPS,
    SolverError,
    ks_distance,
    limit_distribution,
    objective,
    optimal_rewards,
    prompt_aware_optimal_rewards,
)
from objectives.utilities import Log, PromptAwareUtility, get_utility, utility_from_function

BETA_SPECS = ["power:0.25", "power:0.5", "neg_power:0.5", "neg_power:1", "log"]
ALL_SPECS = [*BETA_SPECS, "log_sigmoid:1", "log_sigmoid:0.1", "linear"]


# ------------------------------------------------------------------------------------------ independent solutions
def _stationary_rewards(d1, n: int) -> np.ndarray:
    """Solve d/dr_i sum_{a<b} U(r_a - r_b) = 0 for the interior r_2..r_{n-1} (r_1 = 1, r_n = 0) with fsolve."""

    def stationarity(inner: np.ndarray) -> np.ndarray:
        r = np.concatenate(([1.0], inner, [0.0]))
        d = r[:, None] - r[None, :]
        return np.array(
            [sum(d1(d[i, j]) for j in range(i + 1, n)) - sum(d1(d[j, i]) for j in range(i)) for i in range(1, n - 1)]
        )

    inner, _, ok, msg = scipy.optimize.fsolve(stationarity, np.linspace(1, 0, n)[1:-1], xtol=1e-13, full_output=True)
    assert ok == 1, msg
    return np.concatenate(([1.0], inner, [0.0]))


@pytest.mark.parametrize("spec,d1", [("log", lambda x: 1 / x), ("neg_power:1", lambda x: x**-2.0)])
def test_n8_matches_the_first_order_conditions_solved_by_fsolve(spec, d1):
    expected = _stationary_rewards(d1, 8)
    got = optimal_rewards(spec, 8)
    np.testing.assert_allclose(got, expected, atol=1e-3)
    assert np.abs(got - expected).max() < 1e-8  # what is actually observed: both are exact
    assert objective(spec, got) >= objective(spec, expected) - 1e-12


@pytest.mark.parametrize("sigma", [1.0, 0.1])
def test_n8_log_sigmoid_matches_slsqp_on_the_rewards(sigma):
    n = 8
    iu = np.triu_indices(n, 1)

    def minus_objective(r: np.ndarray) -> float:
        d = (r[:, None] - r[None, :])[iu]
        return float(np.sum(np.logaddexp(0.0, -d / sigma)))

    res = scipy.optimize.minimize(
        minus_objective,
        np.linspace(1, 0, n),
        method="SLSQP",
        bounds=[(0, 1)] * n,
        constraints=[{"type": "ineq", "fun": lambda r: r[:-1] - r[1:]}],
        options={"ftol": 1e-14, "maxiter": 1000},
    )
    assert res.success, res.message
    got = optimal_rewards(f"log_sigmoid:{sigma}", n)
    np.testing.assert_allclose(got, res.x, atol=1e-5)
    assert -minus_objective(got) >= -res.fun - 1e-10


def test_n8_linear_matches_the_linear_program():
    n = 8
    # sum_{i<j} (r_i - r_j) = sum_i (n - 1 - 2i) r_i; ordering r_{i+1} - r_i <= 0; 0 <= r <= 1
    ordering = np.eye(n, k=1)[:-1] - np.eye(n)[:-1]
    lp = scipy.optimize.linprog(-(n - 1 - 2 * np.arange(n)), A_ub=ordering, b_ub=np.zeros(n - 1), bounds=[(0, 1)] * n)
    np.testing.assert_allclose(optimal_rewards("linear", n), lp.x, atol=1e-9)


@pytest.mark.slow
def test_n8_no_feasible_perturbation_improves_the_optimum():
    rng = np.random.default_rng(0)
    for spec in ALL_SPECS:
        r = optimal_rewards(spec, 8)
        best = objective(spec, r)
        for _ in range(200):
            trial = np.clip(np.sort(r + rng.normal(0, 1e-3, r.size))[::-1], 0, 1)
            assert objective(spec, trial) <= best + 1e-12, spec


# ------------------------------------------------------------------------------------------ structure
@pytest.mark.parametrize("n", [3, 8, 9, 31])
@pytest.mark.parametrize("spec", ALL_SPECS)
def test_optimum_is_sorted_spans_unit_interval_and_is_symmetric(spec, n):
    r = optimal_rewards(spec, n)
    assert r.shape == (n,) and r.dtype == np.float64
    assert r[0] == 1.0 and r[-1] == 0.0
    assert np.all(np.diff(r) <= 0)
    np.testing.assert_allclose(r + r[::-1], 1.0, atol=1e-3)
    assert np.abs(r + r[::-1] - 1).max() < 1e-9  # observed: ~1e-13


@pytest.mark.parametrize("n", [2, 8, 50, 200])
def test_linear_is_exactly_polarised_for_even_n(n):
    r = optimal_rewards("linear", n)
    assert np.all(r[: n // 2] == 1.0) and np.all(r[n // 2 :] == 0.0), r


def test_linear_odd_n_puts_the_middle_reward_at_one_half():
    r = optimal_rewards("linear", 9)
    np.testing.assert_allclose(r, [1, 1, 1, 1, 0.5, 0, 0, 0, 0], atol=1e-8)


@pytest.mark.parametrize("sigma,at_least", [(1.0, 0.3), (0.1, 0.05)])
@pytest.mark.slow
def test_log_sigmoid_has_atoms_at_zero_and_one(sigma, at_least):
    for n in (50, 200):
        r = optimal_rewards(f"log_sigmoid:{sigma}", n)
        zeros, ones = np.mean(r <= 1e-6), np.mean(r >= 1 - 1e-6)
        assert zeros == ones >= at_least, (n, zeros, ones)
        assert np.all(r[r <= 1e-6] == 0.0) and np.all(r[r >= 1 - 1e-6] == 1.0)  # exact ties, not just close
        assert np.unique(r).size >= 0.1 * n  # and a spread-out part between the atoms


@pytest.mark.parametrize("spec", BETA_SPECS)
def test_infinite_slope_at_zero_means_no_atoms(spec):
    r = optimal_rewards(spec, 100)
    assert np.sum(r == 0.0) == 1 and np.sum(r == 1.0) == 1
    assert np.all(-np.diff(r) > 0)


def test_prompt_aware_utilities_give_prompt_dependent_distributions():
    pa = PromptAwareUtility.from_column({"open": "neg_power:1", "closed": "linear"})
    rewards = prompt_aware_optimal_rewards(pa, 40)
    assert set(rewards) == {"open", "closed"}
    assert np.all(np.isin(rewards["closed"], [0.0, 1.0]))  # polarised: right or wrong
    assert ks_distance(rewards["open"], scipy.stats.uniform()) < 0.05  # spread out
    assert ks_distance(rewards["closed"], scipy.stats.uniform()) > 0.4


# ------------------------------------------------------------------------------------------ limits
def test_limit_distribution_parameters():
    cases = {"power:0.5": 0.25, "power:0.25": 0.375, "neg_power:0.5": 0.75, "neg_power:1": 1.0, "log": 0.5}
    for spec, a in cases.items():
        dist = limit_distribution(spec)
        assert dist.dist.name == "beta" and dist.args == (a, a), spec
    for spec in ("linear", "log_sigmoid:1"):
        assert limit_distribution(spec) is None
    assert limit_distribution(utility_from_function(torch.log1p)) is None


def test_ks_distance_is_the_kolmogorov_smirnov_statistic():
    x = np.array([0.1, 0.4, 0.45, 0.9])
    assert ks_distance(x, scipy.stats.uniform()) == pytest.approx(scipy.stats.kstest(x, "uniform").statistic)
    assert ks_distance(x, scipy.stats.uniform()) == pytest.approx(0.3)  # D+ at x = 0.45: 3/4 - 0.45
    with pytest.raises(SolverError, match="finite"):
        ks_distance([np.nan], scipy.stats.uniform())
    with pytest.raises(SolverError, match="cdf"):
        ks_distance([0.5], "uniform")


def _ks(spec: str, n: int) -> float:
    return ks_distance(optimal_rewards(spec, n), limit_distribution(spec))


@pytest.mark.parametrize("spec", ["power:0.5", "log"])
@pytest.mark.slow
def test_limit_law_fast(spec):
    ks_100, ks_200 = _ks(spec, 100), _ks(spec, 200)
    # observed: exactly 1/n, the least possible with r_n = 0 (the empirical CDF jumps by 1/n at 0)
    assert ks_200 < ks_100 < 0.02
    assert ks_200 <= 1.5 / 200
    # and the law is specific: another family's limit is far off
    assert ks_distance(optimal_rewards(spec, 200), scipy.stats.uniform()) > 0.1


@pytest.mark.slow
@pytest.mark.parametrize("spec", BETA_SPECS)
def test_limit_law_shrinks_with_n(spec):
    ks = [_ks(spec, n) for n in (50, 200, 400)]
    # observed (n = 50, 200, 400): 1/n for power:0.25, power:0.5, log; neg_power:0.5 0.022, 0.0078, 0.0048;
    # neg_power:1 0.037, 0.020, 0.016 (the -1/x optimum approaches the uniform law slowly near the ends)
    assert ks[0] > ks[1] > ks[2], ks
    assert ks[1] < 0.03 and ks[2] < 0.02, ks


def test_exact_flag_moves_the_tangent_of_bounded_families():
    coarse = get_utility("log", eps=1e-2)  # the n = 50 optimum has gaps of ~1.5e-3 < eps near 0 and 1
    exact = optimal_rewards(coarse, 50)
    np.testing.assert_allclose(exact, optimal_rewards(Log(eps=EXACT_EPS), 50), atol=1e-12)
    as_given = optimal_rewards(coarse, 50, exact=False)
    assert np.sum(as_given == 0.0) > 1 and np.sum(exact == 0.0) == 1  # the tangent line creates an atom
    assert objective(coarse, as_given) >= objective(coarse, exact)  # each is optimal for its own U


# ------------------------------------------------------------------------------------------ users' U, errors
def test_user_functions_torch_and_numpy():
    reference = optimal_rewards("log", 20)
    np.testing.assert_allclose(optimal_rewards(torch.log, 20), reference, atol=1e-12)
    np.testing.assert_allclose(optimal_rewards(np.log, 20), reference, atol=1e-7)  # finite-difference derivatives
    np.testing.assert_allclose(optimal_rewards(utility_from_function(np.sqrt), 20), optimal_rewards("power:0.5", 20))


def test_polish_off_leaves_the_barrier_iterate_close():
    r = optimal_rewards("log_sigmoid:1", 20, polish=False)
    np.testing.assert_allclose(r, optimal_rewards("log_sigmoid:1", 20), atol=1e-6)


def test_solver_errors():
    for n in (1, 0, 2.5, True):
        with pytest.raises(SolverError, match="n="):
            optimal_rewards("log", n)
    assert list(optimal_rewards("log", 2)) == [1.0, 0.0]
    with pytest.raises(SolverError, match="decreases"):
        optimal_rewards(lambda x: -x, 5)
    with pytest.raises(SolverError, match="not concave"):
        optimal_rewards(lambda x: x**2, 5)
    with pytest.raises(SolverError, match="prompt"):
        optimal_rewards(PromptAwareUtility.from_column({"a": "log"}), 5)
    with pytest.raises(SolverError, match="tol"):
        optimal_rewards("log", 5, tol=0)
    with pytest.raises(SolverError, match="max_iter"):
        optimal_rewards("log", 50, max_iter=3)
    assert issubclass(SolverError, ObjectiveError)
