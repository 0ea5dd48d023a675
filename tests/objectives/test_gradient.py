"""The f-DPG gradient against the exact toy ground truth.

(2) the sampled gradient estimate (pseudo-rewards, leave-one-out baseline, surrogate loss) is unbiased
    for the exact gradient of D_f(pi||p), with exact Z, with Z estimated by importance sampling, and
    off-policy with importance weights;
(3) plain sampled training drives the exact D_f(pi||p) below 1% of its start;
(4) reverse KL toward a exp(r/beta) is KL-regularised RL and forward KL's pseudo-reward is p/pi.
"""

from __future__ import annotations

import math

import pytest
import torch
from scipy.stats import chi2
from statistics_testing import P_VALUE_FLOOR, hotelling
from toy_model import ToyAutoregressive, ToyProblem, exact_moment, make_problem

from fdpg.config import TrainConfig
from objectives import (
    BASELINES,
    CustomDivergence,
    Divergence,
    LogZEstimator,
    MovingAverageBaseline,
    ZeroTargetError,
    batch_baseline,
    get_divergence,
    surrogate_loss,
)

BUILT_IN = ["rkl", "fkl", "tv", "js", "chi2", "hellinger", "alpha:0.5"]
FINITE_AT_INFINITY = ["fkl", "tv", "js", "hellinger", "alpha:0.5"]


def user_js() -> CustomDivergence:
    """A user's own Jensen-Shannon generator (f' by autograd, f'(inf) = log 2 by a limit)."""
    return CustomDivergence(lambda t: t * torch.log(2 * t / (t + 1)) + torch.log(2 / (t + 1)), name="user_js")


def user_neyman() -> CustomDivergence:
    """Neyman chi-squared, f(t) = (t - 1)^2 / t, f'(inf) = 1."""
    return CustomDivergence(lambda t: (t - 1) ** 2 / t, name="neyman")


def divergence(spec: str) -> Divergence:
    return {"user_js": user_js, "neyman": user_neyman}.get(spec, lambda: get_divergence(spec))()


# ------------------------------------------------------------------------------------- helpers
def batch_gradient(
    problem: ToyProblem,
    div: Divergence,
    idx: torch.Tensor,
    log_z: float,
    proposal: ToyAutoregressive | None = None,
    baseline: str | MovingAverageBaseline = "loo",
    weighted: bool = True,
) -> torch.Tensor:
    """Autograd gradient (w.r.t. the policy logits) of the surrogate loss of one batch ``idx``.

    ``baseline``: a kind of :func:`batch_baseline` (the per-prompt kinds see two groups, even and odd
    positions, as two prompts of a batch would be), or a :class:`MovingAverageBaseline` kept across batches.
    """
    log_pi = problem.policy.log_probs_all()[idx]
    log_p = problem.sampled_log_P(idx) - log_z
    rewards = div.pseudo_reward(log_pi, log_p)
    weights = None
    if proposal is not None and weighted:
        weights = torch.exp(log_pi.detach() - proposal.log_probs_all()[idx])
    if isinstance(baseline, MovingAverageBaseline):
        b = baseline(rewards)
    else:
        b = batch_baseline(rewards, baseline, [j % 2 for j in range(len(idx))])
    loss = surrogate_loss(log_pi, rewards, b, importance_weights=weights)
    (grad,) = torch.autograd.grad(loss, problem.policy.logits)
    return grad.reshape(-1)


def sampled_gradients(
    problem: ToyProblem,
    div: Divergence,
    n_batches: int = 400,
    batch: int = 32,
    seed: int = 0,
    log_z: float | None = None,
    proposal: ToyAutoregressive | None = None,
    **kwargs,
) -> torch.Tensor:
    """``n_batches`` independent batch gradients, shape ``[n_batches, n_params]``."""
    gen = torch.Generator().manual_seed(seed)
    sampler = problem.policy if proposal is None else proposal
    log_z = problem.log_Z if log_z is None else log_z
    if kwargs.get("baseline") == "moving_average":  # one state across the batches, as in training
        kwargs["baseline"] = MovingAverageBaseline(0.5)
    rows = [
        batch_gradient(problem, div, sampler.sample(batch, gen), log_z, proposal, **kwargs)
        for _ in range(n_batches)
    ]
    return torch.stack(rows)


def estimated_log_z(problem: ToyProblem, n: int = 20000, seed: int = 123) -> float:
    """log Z from an independent batch of ``n`` samples of pi, by :class:`LogZEstimator`."""
    idx = problem.policy.sample(n, torch.Generator().manual_seed(seed))
    estimator = LogZEstimator("running")
    estimator.update(problem.sampled_log_P(idx) - problem.policy.log_probs_all().detach()[idx])
    return estimator.log_z()


CASES = [("rl", name) for name in [*BUILT_IN, "user_js", "neyman"]] + [
    ("binary", name) for name in [*FINITE_AT_INFINITY, "user_js", "neyman"]
]


# ------------------------------------------------------------------------------ (2) unbiasedness
def test_toy_sampling_is_the_exact_distribution() -> None:
    """Multinomial sampling over the enumeration and ancestral sampling both follow pi."""
    policy = ToyAutoregressive(seed=0, scale=1.0)
    probs = policy.probs_all()
    n = 60000
    gen = torch.Generator().manual_seed(0)
    for counts in (
        torch.bincount(policy.sample(n, gen), minlength=policy.n_sequences),
        torch.bincount(policy.index_of(policy.sample_ancestral(n, gen)), minlength=policy.n_sequences),
    ):
        stat = float(((counts - n * probs) ** 2 / (n * probs)).sum())
        assert chi2.sf(stat, policy.n_sequences - 1) > P_VALUE_FLOOR
    assert torch.allclose(probs.sum(), torch.tensor(1.0, dtype=probs.dtype))
    assert torch.equal(policy.index_of(policy.all_sequences()), torch.arange(policy.n_sequences))


@pytest.mark.parametrize(("kind", "name"), CASES)
@pytest.mark.slow
def test_sampled_gradient_is_unbiased_with_exact_z(kind: str, name: str) -> None:
    problem = make_problem(kind)
    div = divergence(name)
    exact = problem.exact_gradient(div)
    assert torch.isfinite(exact).all() and exact.norm() > 1e-3
    grads = sampled_gradients(problem, div)
    t2, rank, p_value = hotelling(grads, exact)
    assert p_value > P_VALUE_FLOOR, f"{kind}/{name}: T^2 = {t2:.1f} on {rank} dof (p = {p_value:.2g})"


@pytest.mark.parametrize(("kind", "name"), CASES)
@pytest.mark.slow
def test_sampled_gradient_is_unbiased_with_estimated_z(kind: str, name: str) -> None:
    """Z from 20000 independent samples of pi: the residual bias is far below the sampling error."""
    problem = make_problem(kind)
    div = divergence(name)
    log_z = estimated_log_z(problem)
    assert abs(log_z - problem.log_Z) < 0.05
    grads = sampled_gradients(problem, div, log_z=log_z, seed=1)
    t2, rank, p_value = hotelling(grads, problem.exact_gradient(div))
    assert p_value > P_VALUE_FLOOR, f"{kind}/{name}: T^2 = {t2:.1f} on {rank} dof (p = {p_value:.2g})"


@pytest.mark.parametrize(
    ("kind", "name"), [c for c in CASES if c[1] in ("rkl", "fkl", "tv", "js", "user_js")]
)
@pytest.mark.slow
def test_off_policy_gradient_is_unbiased_with_importance_weights(kind: str, name: str) -> None:
    problem = make_problem(kind)
    div = divergence(name)
    proposal = ToyAutoregressive(seed=3, scale=0.5)
    grads = sampled_gradients(problem, div, proposal=proposal, seed=2)
    t2, rank, p_value = hotelling(grads, problem.exact_gradient(div))
    assert p_value > P_VALUE_FLOOR, f"{kind}/{name}: T^2 = {t2:.1f} on {rank} dof (p = {p_value:.2g})"


@pytest.mark.parametrize("name", ["rkl", "fkl", "tv", "js"])
@pytest.mark.slow
def test_the_unbiasedness_test_rejects_biased_estimators(rl_problem: ToyProblem, name: str) -> None:
    """Power check: the same test rejects a mean baseline on tiny batches (bias factor 1 - 1/n) and
    off-policy samples without importance weights."""
    div = get_divergence(name)
    exact = rl_problem.exact_gradient(div)
    mean_baseline = sampled_gradients(rl_problem, div, n_batches=2000, batch=4, baseline="mean")
    assert hotelling(mean_baseline, exact)[2] < 1e-6
    unweighted = sampled_gradients(
        rl_problem, div, proposal=ToyAutoregressive(seed=3, scale=0.5), weighted=False
    )
    assert hotelling(unweighted, exact)[2] < 1e-6
    loo = sampled_gradients(rl_problem, div, n_batches=2000, batch=4, baseline="loo")
    assert hotelling(loo, exact)[2] > P_VALUE_FLOOR


#: Every baseline, the trainer's default first, with the factor by which it shrinks the expected gradient
#: (1 for unbiased baselines; 1 - 1/m for a mean over m samples that includes the sample itself).
DEFAULT_BASELINE = TrainConfig.__dataclass_fields__["baseline"].default
BASELINE_BATCH = 4


def baseline_shrinkage(kind: str) -> float:
    return {"mean": 1 - 1 / BASELINE_BATCH, "prompt_mean": 1 - 2 / BASELINE_BATCH}.get(kind, 1.0)


@pytest.mark.parametrize("kind", [DEFAULT_BASELINE, *[b for b in BASELINES if b != DEFAULT_BASELINE]])
@pytest.mark.slow
def test_every_baseline_is_unbiased_or_shrinks_by_its_known_factor(rl_problem: ToyProblem, kind: str) -> None:
    """On batches of 4 (two groups of 2 for the per-prompt kinds): ``none``, ``loo``, ``prompt_loo`` and the
    moving average (which only sees past batches; decay 0.5) are unbiased; ``mean`` and ``prompt_mean`` include
    the sample itself and shrink the expected gradient by 1 - 1/m exactly, so they are rejected as they are and
    accepted once rescaled by 1/(1 - 1/m). A baseline that peeks at its own sample fails here."""
    div = get_divergence("rkl")
    exact = rl_problem.exact_gradient(div)
    grads = sampled_gradients(rl_problem, div, n_batches=1500, batch=BASELINE_BATCH, seed=7, baseline=kind)
    shrink = baseline_shrinkage(kind)
    t2, rank, p_value = hotelling(grads / shrink, exact)
    assert p_value > P_VALUE_FLOOR, f"{kind}: T^2 = {t2:.1f} on {rank} dof (p = {p_value:.2g})"
    if shrink != 1.0:
        assert hotelling(grads, exact)[2] < 1e-6


# ------------------------------------------------------------------------------ (3) convergence
STEPS, BATCH, LR_START, LR_END = 1000, 256, 0.1, 0.01


def train(problem: ToyProblem, div: Divergence, seed: int = 0) -> tuple[float, float]:
    """Plain sampled f-DPG: on-policy batches, running log Z, loo baseline, Adam with an exponentially
    decaying learning rate. Returns the exact D_f(pi||p) before and after."""
    policy = problem.policy
    optimiser = torch.optim.Adam(policy.parameters(), lr=LR_START)
    schedule = torch.optim.lr_scheduler.ExponentialLR(optimiser, (LR_END / LR_START) ** (1 / STEPS))
    log_z = LogZEstimator("running")
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        start = float(problem.exact_divergence(div))
    for _ in range(STEPS):
        idx = policy.sample(BATCH, gen)
        log_pi = policy.log_probs_all()[idx]
        log_P = problem.sampled_log_P(idx)
        log_z.update(log_P - log_pi.detach())
        rewards = div.pseudo_reward(log_pi, log_P - log_z.log_z())
        loss = surrogate_loss(log_pi, rewards, batch_baseline(rewards, "loo"))
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        schedule.step()
    with torch.no_grad():
        end = float(problem.exact_divergence(div))
    return start, end


TRAIN_CASES = (
    [("rl", name) for name in [*BUILT_IN, "user_js"]]
    + [("binary", name) for name in FINITE_AT_INFINITY]
    + [("expfam", name) for name in BUILT_IN]
)


@pytest.mark.parametrize(("kind", "name"), TRAIN_CASES)
@pytest.mark.slow
def test_sampled_training_reaches_one_percent_of_the_start(kind: str, name: str) -> None:
    problem = make_problem(kind)
    if kind == "expfam":
        fit = problem.extra["fit"]
        achieved = exact_moment(problem.log_a, problem.features["phi"], fit.lambdas["phi"])
        assert abs(achieved - 0.5) < 1e-3
    div = divergence(name)
    start, end = train(problem, div)
    assert start > 0.1
    assert -1e-12 < end < 0.01 * start, (
        f"{kind}/{name}: D_f went from {start:.4f} to {end:.4g} ({end / start:.2%})"
    )


@pytest.mark.parametrize("name", ["rkl", "chi2"])
def test_infinite_divergence_to_a_binary_target_is_refused(binary_problem: ToyProblem, name: str) -> None:
    div = get_divergence(name)
    with torch.no_grad():
        assert math.isinf(float(binary_problem.exact_divergence(div)))
    with pytest.raises(ZeroTargetError, match="max_log_ratio"):
        train(binary_problem, div)


# ----------------------------------------------------------------------- (4) recovered objectives
def test_reverse_kl_pseudo_reward_is_kl_regularised_reward(rl_problem: ToyProblem) -> None:
    """R = r/beta - log(pi/a) + const (the RLHF reward with its KL penalty), const = -(log Z + 1)."""
    beta = rl_problem.target.energies[0].beta
    log_pi = rl_problem.policy.log_probs_all().detach()
    for log_z in (rl_problem.log_Z, estimated_log_z(rl_problem, n=500)):
        rewards = get_divergence("rkl").pseudo_reward(log_pi, rl_problem.log_P - log_z)
        rlhf = rl_problem.features["reward"] / beta - log_pi + rl_problem.log_a
        offset = rewards - rlhf
        assert float(offset.max() - offset.min()) < 1e-12
        assert float(offset[0]) == pytest.approx(-(log_z + 1.0), abs=1e-12)


def test_forward_kl_pseudo_reward_is_p_over_pi(rl_problem: ToyProblem, binary_problem: ToyProblem) -> None:
    for problem in (rl_problem, binary_problem):
        log_pi = problem.policy.log_probs_all().detach()
        rewards = get_divergence("fkl").pseudo_reward(log_pi, problem.log_p)
        torch.testing.assert_close(rewards, problem.log_p.exp() / log_pi.exp(), rtol=1e-13, atol=0)
    assert bool((rewards == 0).any())  # p = 0 under the binary constraint gives p/pi = 0
