r"""Reward collapse: the optimal rewards of one prompt in the interpolating regime, and their limit laws.

When the reward model can fit any rewards (the *interpolating regime*), training on the ranking
:math:`y_1 \succ y_2 \succ \dots \succ y_n` of a prompt's :math:`n` completions with utility :math:`U` gives
(Song, Cai, Lee, Su 2023) the rewards :math:`r_i = R(\text{prompt}, y_i)` that solve

.. math::  \max_{1 \ge r_1 \ge r_2 \ge \dots \ge r_n \ge 0}\ \sum_{1 \le i < j \le n} U(r_i - r_j).

The solution does not depend on the prompt: every prompt gets the same reward distribution (*reward
collapse*). A :class:`~objectives.utilities.PromptAwareUtility` gives prompts of different kinds different
utilities, hence different distributions; the prompts decouple in this regime
(:func:`prompt_aware_optimal_rewards`).

**Limits.** As :math:`n \to \infty` the empirical distribution of :math:`r_1, \dots, r_n` converges to

- :math:`\mathrm{Beta}\big(\frac{1-\gamma}{2}, \frac{1-\gamma}{2}\big)` for :math:`U(x) = x^\gamma`,
  :math:`0 < \gamma < 1`;
- :math:`\mathrm{Beta}\big(\frac{1+\gamma}{2}, \frac{1+\gamma}{2}\big)` for :math:`U(x) = -x^{-\gamma}`,
  :math:`0 < \gamma \le 1` (uniform for :math:`-1/x`);
- :math:`\mathrm{Beta}(\frac12, \frac12)` (the arcsine law) for :math:`U(x) = \log x`;
- :math:`\frac12\delta_0 + \frac12\delta_1` for :math:`U(x) = x`, exactly so for every even :math:`n`.

(:func:`limit_distribution`, :func:`ks_distance`.) When :math:`U'(0) < \infty`, as for ``log_sigmoid``, the
optimum has atoms at 0 and 1: moving one point of a cluster of mass :math:`m` at 0 up by :math:`\delta` gains
:math:`m\,U'(0)\,\delta` from the pairs within the cluster and loses :math:`\delta\int_{y>0} U'(y)\,d\mu(y)` from
the others, so the cluster is stable with :math:`m\,U'(0) = \int_{y>0} U'(y)\,d\mu(y) > 0` (and symmetrically at
1). An infinite :math:`U'(0)` (power, log, neg_power) rules atoms out.

**Solver** (:func:`optimal_rewards`). The unknowns are the gaps :math:`g_k = r_k - r_{k+1} \ge 0`,
:math:`k = 1, \dots, n-1`, with :math:`r_i - r_j = \sum_{k=i}^{j-1} g_k` (evaluated as a difference of partial
sums from the nearer end, so that tiny differences keep their relative precision). For a nondecreasing
:math:`U`, stretching the rewards to span :math:`[0, 1]` never lowers the objective, so :math:`\sum_k g_k = 1`
(:math:`r_1 = 1`, :math:`r_n = 0`) and the feasible set is a simplex. The normalised objective
:math:`F(g) = \binom n2^{-1}\sum_{i<j} U(r_i - r_j)` is concave for concave :math:`U`, with

.. math::  \frac{\partial F}{\partial g_k} \propto \sum_{i \le k < j} U'(r_i - r_j), \qquad
           \frac{\partial^2 F}{\partial g_k\,\partial g_l} \propto \sum_{i \le \min(k,l),\ j > \max(k,l)}
           U''(r_i - r_j),

sums of terms of one sign, obtained in :math:`O(n^2)` by two-dimensional cumulative sums from the library's
closed-form :math:`U', U''` (autograd or finite differences for users' functions). It is maximised by

1. a log-barrier interior-point method: Newton's method with the exact Hessian (Cholesky from
   :mod:`scipy.linalg`, in variables scaled by :math:`g`) on :math:`-F(g) - \mu\sum_k\log g_k` subject to
   :math:`\sum_k g_k = 1`, with a backtracking line search, for :math:`\mu = \frac{1}{n-1}, \frac{1}{100(n-1)},
   \dots` until the duality-gap bound :math:`(n-1)\mu` is below ``tol``. The iterates stay inside, where
   :math:`\log x` and :math:`-x^{-\gamma}` are finite, so their values at 0 never matter;
2. a polishing step, once :math:`(n-1)\mu \le 10^{-9}`: the gaps that shrink in proportion to :math:`\mu` along
   the central path are set to exactly 0 and the others solved for by Newton's method on that face of the
   simplex; the result is kept only if it satisfies the KKT conditions and is no worse, else the barrier
   continues. So optimal ties are exact: the atoms of ``log_sigmoid`` sit at exactly 0 and 1, and ``linear``
   with even :math:`n` gives exactly :math:`g_{n/2} = 1` (half the rewards 1, half 0) -- the LP's unique vertex,
   reached without a special case. For odd :math:`n` the optimal face of ``linear`` is an edge and the barrier
   returns its centre, the symmetric solution with the middle reward :math:`1/2`.

Bounded families and ``eps``: with ``exact=True`` (the default) the library's bounded families are solved
with their tangent line moved down to :data:`EXACT_EPS` :math:`= 10^{-16}` (below which a float64 reward near
1 cannot resolve a gap anyway), i.e. the closed forms of the paper; ``exact=False`` solves the utility as
given, whose tangent line below ``eps`` merges the rewards lying within about ``eps`` of 0 (or 1) into an atom
of the same mass. That only matters where the exact optimum has gaps below ``eps``: the extreme rewards of
``power`` (for ``power:0.5`` at :math:`n = 400` the smallest gap is about :math:`10^{-9}`; with the default
``eps`` an atom of mass 1.75% forms at 0 and 1, and the Kolmogorov-Smirnov distance to the limit stalls at
about that mass).

Cost: :math:`O(n^2)` evaluations of :math:`U, U', U''` and an :math:`O(n^3)` Cholesky per Newton step, 20 to 90
steps in all; on one CPU thread :math:`n = 200` takes 0.1-0.5 s and :math:`n = 400` 0.6-2 s.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Hashable, Iterator
from typing import Any

import numpy as np
import scipy.linalg
import scipy.stats
import torch

from objectives.errors import ObjectiveError
from objectives.utilities import (
    BoundedUtility,
    Log,
    NegPower,
    Power,
    PromptAwareUtility,
    Utility,
    get_utility,
    utility_from_function,
)

UtilityLike = Utility | str | Callable[[Any], Any]

EXACT_EPS = 1e-16
"""The tangent-line threshold of the bounded families when :func:`optimal_rewards` solves them exactly."""
MU_FACTOR = 100.0
"""The barrier parameter is divided by this after each centring."""
DECREMENT_TOL = 1e-13
"""A centring stops when the squared Newton decrement is below this."""
POLISH_FROM = 1e-9
r"""Polishing is tried once the duality-gap bound :math:`(n-1)\mu` is below this."""
POLISH_STEPS = 10
"""The most Newton steps of one polishing attempt."""


class SolverError(ObjectiveError):
    """A bad argument of :func:`optimal_rewards` (size, utility) or a solve that did not converge."""


# --------------------------------------------------------------------------------------------- utilities
def as_utility(utility: UtilityLike) -> Utility:
    """A :class:`Utility` from a utility, a :func:`get_utility` spec, or a torch/NumPy elementwise function."""
    if isinstance(utility, Utility):
        return utility
    if isinstance(utility, PromptAwareUtility):
        raise SolverError(
            f"{utility.name} chooses a utility per prompt; solve one of its utilities (utility.utilities[key]) or "
            "use prompt_aware_optimal_rewards"
        )
    if isinstance(utility, str):
        return get_utility(utility)
    if callable(utility):
        return utility_from_function(utility, name=getattr(utility, "__name__", "custom"))
    raise SolverError(f"utility={utility!r} must be a Utility, a name such as 'log', or a function of differences")


def _numpy(fn: Callable[[torch.Tensor], torch.Tensor], x: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        out = fn(torch.from_numpy(x))
    return out.detach().cpu().numpy().astype(np.float64, copy=False)


def _check_increasing_concave(utility: Utility) -> None:
    """Raise :class:`SolverError` unless :math:`U` is finite, nondecreasing and concave on a grid of (0, 1]."""
    x = np.linspace(1.0 / 64, 1.0, 64)
    u = _numpy(utility, x)
    if not np.all(np.isfinite(u)):
        raise SolverError(f"utility {utility.name!r} is not finite on (0, 1] (e.g. U({x[~np.isfinite(u)][0]:g}))")
    scale = max(1.0, float(np.abs(u).max()))
    du = np.diff(u)
    if np.any(du < -1e-9 * scale):
        k = int(np.argmin(du))
        raise SolverError(
            f"utility {utility.name!r} decreases on (0, 1] (U({x[k + 1]:g}) < U({x[k]:g})); the reward-collapse "
            "problem needs a nondecreasing concave U"
        )
    if np.any(np.diff(du) > 1e-9 * scale):
        k = int(np.argmax(np.diff(du)))
        raise SolverError(
            f"utility {utility.name!r} is not concave on (0, 1] (around x={x[k + 1]:g}); the solver needs a concave "
            "U for the problem to be convex"
        )


def objective(utility: UtilityLike, rewards: np.ndarray | list[float]) -> float:
    r""":math:`\sum_{i<j} U(r_i - r_j)` for rewards sorted best first (the unnormalised objective)."""
    u = as_utility(utility)
    r = np.asarray(rewards, dtype=np.float64)
    i, j = np.triu_indices(r.size, 1)
    return float(np.sum(_numpy(u, r[i] - r[j])))


# --------------------------------------------------------------------------------------------- the problem
class _GapProblem:
    """:math:`F(g)`, its gradient and Hessian in the gaps, all in :math:`O(n^2)` (plus the Hessian's :math:`m^2`)."""

    def __init__(self, utility: Utility, n: int) -> None:
        self.utility = utility
        self.n = n
        self.m = n - 1
        self.rows, self.cols = np.triu_indices(n, 1)
        k = np.arange(self.m)
        self.lo = np.minimum.outer(k, k)
        self.hi = np.maximum.outer(k, k) + 1
        self.scale = 2.0 / (n * (n - 1))

    def diffs(self, g: np.ndarray) -> np.ndarray:
        """:math:`r_i - r_j = \\sum_{k=i}^{j-1} g_k` for all :math:`i < j`, to a small relative error.

        Differences of partial sums from the top (:math:`1 - r`) or from the bottom (:math:`r`), whichever is
        the smaller: a tiny difference sits near one end, where that end's partial sums are tiny too.
        """
        top = np.concatenate(([0.0], np.cumsum(g)))  # top[k] = g_0 + ... + g_{k-1} = 1 - r_k
        bottom = np.concatenate((np.cumsum(g[::-1])[::-1], [0.0]))  # bottom[k] = r_k
        from_top = top[self.cols] - top[self.rows]
        from_bottom = bottom[self.rows] - bottom[self.cols]
        return np.where(top[self.cols] < bottom[self.rows], from_top, from_bottom)

    def value(self, g: np.ndarray) -> float:
        return self.scale * float(np.sum(_numpy(self.utility, self.diffs(g))))

    def _corner_sums(self, values: np.ndarray) -> np.ndarray:
        """:math:`S[a, b] = \\sum_{i \\le a,\\ j \\ge b} A_{ij}` for the upper-triangular :math:`A` of ``values``."""
        a = np.zeros((self.n, self.n))
        a[self.rows, self.cols] = values
        s = np.cumsum(a, axis=0)
        return np.cumsum(s[:, ::-1], axis=1)[:, ::-1]

    def gradient_hessian(self, g: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        d = self.diffs(g)
        s1 = self._corner_sums(_numpy(self.utility.derivative, d))
        s2 = self._corner_sums(_numpy(self.utility.second_derivative, d))
        k = np.arange(self.m)
        return self.scale * s1[k, k + 1], self.scale * s2[self.lo, self.hi]


def _newton_step(grad: np.ndarray, hess: np.ndarray, g: np.ndarray) -> np.ndarray:
    r"""The Newton step :math:`\Delta` of a convex function on :math:`\{\sum g = 1\}` (:math:`\sum\Delta = 0`).

    Solved in the scaled variables :math:`\Delta = g \odot y`, where the barrier's Hessian becomes
    :math:`\mu I`, which keeps the Cholesky factorisation well conditioned as :math:`\mu \to 0`.
    """
    scaled = g[:, None] * hess * g[None, :]
    rhs = g * grad
    try:
        factor = scipy.linalg.cho_factor(scaled, lower=True, check_finite=False)
    except np.linalg.LinAlgError:
        jitter = 1e-12 * max(float(np.trace(scaled)) / g.size, 1e-300)
        factor = scipy.linalg.cho_factor(scaled + jitter * np.eye(g.size), lower=True, check_finite=False)
    y_grad = scipy.linalg.cho_solve(factor, rhs, check_finite=False)
    y_ones = scipy.linalg.cho_solve(factor, g, check_finite=False)
    nu = -float(g @ y_grad) / float(g @ y_ones)
    return -g * (y_grad + nu * y_ones)


def _central_path(problem: _GapProblem, tol: float, max_iter: int) -> Iterator[tuple[np.ndarray, float]]:
    """The log-barrier method on the simplex of gaps: each centre (gaps summing to 1) and its :math:`\\mu`."""
    m = problem.m
    g = np.full(m, 1.0 / m)
    mu = 1.0 / m
    iterations = 0
    while True:
        phi = -problem.value(g) - mu * float(np.sum(np.log(g)))
        for _ in range(100):
            grad_f, hess_f = problem.gradient_hessian(g)
            grad = -grad_f - mu / g
            hess = -hess_f + np.diag(mu / g**2)
            step = _newton_step(grad, hess, g)
            step -= g * (step.sum() / g.sum())  # keep sum(g) = 1 exactly despite the solve's rounding
            decrement = -float(grad @ step)
            iterations += 1
            if iterations > max_iter:
                raise SolverError(
                    f"optimal_rewards({problem.utility.name!r}, n={problem.n}) did not converge in {max_iter} Newton "
                    "steps; raise max_iter or loosen tol"
                )
            if decrement <= DECREMENT_TOL:
                break
            shrinking = step < 0
            t = min(1.0, 0.99 * float(np.min(-g[shrinking] / step[shrinking]))) if shrinking.any() else 1.0
            while t > 1e-12:
                trial = g + t * step
                trial_phi = -problem.value(trial) - mu * float(np.sum(np.log(trial)))
                # Armijo, up to the rounding noise of phi (lest centring stall once the decrement is that small).
                if trial_phi <= phi - 0.25 * t * decrement + 1e-15 * max(1.0, abs(phi)):
                    break
                t *= 0.5
            else:
                break  # no progress at the precision of phi: this centring is done
            g, phi = trial, trial_phi
        yield g, mu
        if m * mu <= tol:
            return
        mu /= MU_FACTOR


def _polish(problem: _GapProblem, g: np.ndarray, previous: np.ndarray) -> np.ndarray | None:
    r"""Set the gaps that vanish with :math:`\mu` to exactly 0 and solve for the others by Newton's method.

    Along the central path a gap that is 0 at the optimum shrinks like :math:`\mu/z_k` (:math:`z_k > 0` its
    multiplier) while the others converge, so the gaps that shrank by more than :math:`\sqrt{\text{MU\_FACTOR}}`
    since the ``previous`` centre are taken as active. The free ones then solve the equality-constrained
    problem on their face of the simplex. The result is returned only if it satisfies the KKT conditions of
    the full problem (:math:`\partial F/\partial g_k = \nu` on the free gaps, :math:`\le \nu` on the active
    ones) and is not worse than ``g``; otherwise ``None``.
    """
    free = g * math.sqrt(MU_FACTOR) >= previous
    if not free.any():
        return None
    x = np.where(free, g, 0.0)
    x /= x.sum()
    start = problem.value(g)
    value = problem.value(x)
    ones = np.ones(int(free.sum()))
    noise = 1e-14 * max(1.0, abs(start))
    for _ in range(POLISH_STEPS):
        grad, hess = problem.gradient_hessian(x)
        gf, hf = grad[free], hess[np.ix_(free, free)]
        slack = 1e-10 * max(1.0, float(np.abs(gf).max()))
        if float(gf.max() - gf.min()) <= slack:
            break
        kkt = np.block([[-hf, ones[:, None]], [ones[None, :], np.zeros((1, 1))]])
        rhs = np.append(gf, 0.0)
        try:
            step = np.linalg.solve(kkt, rhs)[:-1]
        except np.linalg.LinAlgError:  # a flat face (linear U, odd n): the least-norm step
            step = np.linalg.lstsq(kkt, rhs, rcond=None)[0][:-1]
        t = 1.0
        while t > 1e-6:
            trial = x.copy()
            trial[free] += t * step
            if np.all(trial[free] > 0) and (trial_value := problem.value(trial)) >= value - noise:
                break
            t *= 0.5
        else:
            return None
        x, value = trial, trial_value
    grad, _ = problem.gradient_hessian(x)
    gf = grad[free]
    nu = float(np.mean(gf))
    slack = 1e-9 * max(1.0, abs(nu))
    if float(np.abs(gf - nu).max()) > slack or np.any(grad[~free] > nu + slack) or value < start - noise:
        return None
    return x / x.sum()


def optimal_rewards(
    utility: UtilityLike,
    n: int,
    *,
    exact: bool = True,
    tol: float = 1e-11,
    max_iter: int = 2000,
    polish: bool = True,
) -> np.ndarray:
    r"""The rewards :math:`1 = r_1 \ge \dots \ge r_n = 0` maximising :math:`\sum_{i<j} U(r_i - r_j)`.

    Args:
        utility: a :class:`~objectives.utilities.Utility`, a spec such as ``"neg_power:1"``, or a nondecreasing
            concave elementwise function (torch: exact autograd derivatives; NumPy: finite differences).
        n: the number of ranked completions, at least 2.
        exact: solve the library's bounded families with their closed form down to :data:`EXACT_EPS` rather
            than with their own ``eps`` (see the module docstring).
        tol: the bound on the optimality gap of the normalised objective :math:`\binom n2^{-1}\sum U` at which
            the barrier stops (the polishing step usually stops it earlier, at machine precision).
        max_iter: the most Newton steps, over all barrier parameters.
        polish: try to make the optimal ties (atoms at 0 and 1) exact; ``False`` returns the barrier's iterate,
            whose zero gaps are then of order ``tol``.

    Returns:
        A float64 array sorted best first, with :math:`r_1 = 1` and :math:`r_n = 0`.
    """
    u = as_utility(utility)
    if isinstance(n, bool) or not isinstance(n, int | np.integer) or n < 2:
        raise SolverError(f"optimal_rewards: n={n!r} must be an integer >= 2 (the number of ranked completions)")
    if not (isinstance(tol, int | float) and 0 < tol < 1):
        raise SolverError(f"optimal_rewards: tol={tol!r} must lie in (0, 1), e.g. 1e-11")
    if exact and isinstance(u, BoundedUtility) and u.eps > EXACT_EPS:
        u = dataclasses.replace(u, eps=EXACT_EPS)
    _check_increasing_concave(u)
    n = int(n)
    if n == 2:
        return np.array([1.0, 0.0])
    problem = _GapProblem(u, n)
    previous = None
    for gaps, mu in _central_path(problem, tol, max_iter):
        if polish and previous is not None and problem.m * mu <= POLISH_FROM:
            polished = _polish(problem, gaps, previous)
            if polished is not None:
                gaps = polished
                break
        previous = gaps
    top = np.concatenate(([0.0], np.cumsum(gaps)))  # 1 - r_k, precise near the top
    bottom = np.concatenate((np.cumsum(gaps[::-1])[::-1], [0.0]))  # r_k, precise near the bottom
    rewards = np.where(bottom <= top, bottom, 1.0 - top)
    return np.clip(rewards, 0.0, 1.0)


def prompt_aware_optimal_rewards(utility: PromptAwareUtility, n: int, **kwargs: Any) -> dict[Hashable, np.ndarray]:
    """The optimal rewards of a prompt of each kind: in the interpolating regime the prompts decouple."""
    if not isinstance(utility, PromptAwareUtility):
        raise SolverError(f"prompt_aware_optimal_rewards: {utility!r} is not a PromptAwareUtility; use optimal_rewards")
    return {key: optimal_rewards(u, n, **kwargs) for key, u in utility.utilities.items()}


# --------------------------------------------------------------------------------------------- limits
def limit_distribution(utility: UtilityLike) -> Any | None:
    r"""The :math:`n \to \infty` law of the optimal rewards as a frozen ``scipy.stats`` distribution.

    ``power:gamma`` gives :math:`\mathrm{Beta}(\frac{1-\gamma}2, \frac{1-\gamma}2)`, ``neg_power:gamma``
    :math:`\mathrm{Beta}(\frac{1+\gamma}2, \frac{1+\gamma}2)`, ``log`` :math:`\mathrm{Beta}(\frac12, \frac12)`.
    ``None`` for the others: ``linear`` (the two-point law :math:`\frac12\delta_0 + \frac12\delta_1`, not a
    continuous distribution), ``log_sigmoid`` (atoms at 0 and 1, no closed form) and users' utilities.
    """
    u = as_utility(utility)
    if isinstance(u, Power):
        a = (1.0 - u.gamma) / 2.0
    elif isinstance(u, NegPower):
        a = (1.0 + u.gamma) / 2.0
    elif isinstance(u, Log):
        a = 0.5
    else:
        return None
    return scipy.stats.beta(a, a)


def ks_distance(rewards: np.ndarray | list[float], distribution: Any) -> float:
    """The Kolmogorov-Smirnov statistic :math:`\\sup_x |F_n(x) - F(x)|` of the rewards against a distribution."""
    r = np.asarray(rewards, dtype=np.float64)
    if r.size == 0 or not np.all(np.isfinite(r)):
        raise SolverError(f"ks_distance: rewards must be a non-empty array of finite numbers, got {r!r:.80}")
    if not hasattr(distribution, "cdf"):
        raise SolverError(f"ks_distance: distribution={distribution!r} has no cdf; pass a frozen scipy.stats law")
    return float(scipy.stats.kstest(r, distribution.cdf).statistic)


__all__ = [
    "EXACT_EPS",
    "SolverError",
    "as_utility",
    "ks_distance",
    "limit_distribution",
    "objective",
    "optimal_rewards",
    "prompt_aware_optimal_rewards",
]
