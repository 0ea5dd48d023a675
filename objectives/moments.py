r"""Fitting :math:`\lambda` of an exponential-family target to moment constraints.

The distributional GDC target (Khalifa et al. 2021) is the information projection of the base model
:math:`a` onto :math:`\{p : E_p[\phi_i] = \bar\mu_i\}`, which is
:math:`p_\lambda(x) \propto a(x)\exp(\lambda\cdot\phi(x))` with :math:`\lambda` minimising the convex dual

.. math::  L(\lambda) = \log E_{x\sim a}\big[e^{\lambda\cdot\phi(x)}\big] - \lambda\cdot\bar\mu,
           \qquad \nabla L = E_{p_\lambda}[\phi] - \bar\mu,\quad \nabla^2 L = \mathrm{Cov}_{p_\lambda}[\phi].

From samples :math:`x_j \sim q` the expectation is self-normalised importance sampling with
:math:`\log w_j = \log a(x_j) - \log q(x_j)` (zero when the samples come from :math:`a`); with an
enumerated support and :math:`\log w = \log a` the fit is exact. ``scipy.optimize`` (trust-region
Newton with the exact gradient and Hessian) minimises :math:`L`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from scipy.optimize import minimize
from scipy.special import logsumexp

from objectives.errors import ScoreError, UnreachableMomentError
from objectives.targets import ExponentialFamily, Target


@dataclass(frozen=True)
class MomentFit:
    """Result of :func:`fit_lambdas`.

    Attributes:
        lambdas: fitted coefficient per feature.
        target_moments: the requested :math:`\\bar\\mu`.
        achieved_moments: :math:`E_{p_\\lambda}[\\phi]` under the (self-normalised) sample estimate.
        ess: effective sample size of the final weights :math:`w_j e^{\\lambda\\cdot\\phi_j}`, out of ``n``.
        n: number of samples used.
        iterations: optimiser iterations.
    """

    lambdas: dict[str, float]
    target_moments: dict[str, float]
    achieved_moments: dict[str, float]
    ess: float
    n: int
    iterations: int

    @property
    def max_error(self) -> float:
        return max(abs(self.achieved_moments[k] - self.target_moments[k]) for k in self.lambdas)

    def energy(self) -> ExponentialFamily:
        """The fitted factor :math:`\\exp(\\lambda\\cdot\\phi)`."""
        return ExponentialFamily(dict(self.lambdas))

    def target(self, conditional: bool = False) -> Target:
        """:math:`P = a\\exp(\\lambda\\cdot\\phi)` with the fitted coefficients."""
        return Target((self.energy(),), conditional=conditional)

    def report(self) -> str:
        rows = [
            f"  {k}: lambda = {self.lambdas[k]:+.4f}, target {self.target_moments[k]:.4f}, "
            f"achieved {self.achieved_moments[k]:.4f}"
            for k in self.lambdas
        ]
        return "\n".join([f"moment fit on {self.n} samples (ESS {self.ess:.1f}):", *rows])


def _as_matrix(phi: Mapping[str, torch.Tensor | Sequence[float]]) -> tuple[list[str], np.ndarray]:
    names = list(phi)
    if not names:
        raise ScoreError("fit_lambdas needs at least one feature")
    cols = []
    for name in names:
        col = np.asarray(torch.as_tensor(phi[name], dtype=torch.float64).cpu(), dtype=np.float64).reshape(-1)
        if np.isnan(col).any():
            raise ScoreError(f"feature {name!r} contains NaN; fix its scorer before fitting lambda")
        cols.append(col)
    lengths = {len(c) for c in cols}
    if len(lengths) != 1:
        raise ScoreError(f"features have different numbers of samples: { {n: len(c) for n, c in zip(names, cols)} }")
    return names, np.stack(cols, axis=1)


def fit_lambdas(
    phi: Mapping[str, torch.Tensor | Sequence[float]],
    target_moments: Mapping[str, float],
    log_weights: torch.Tensor | Sequence[float] | None = None,
    tol: float = 1e-6,
) -> MomentFit:
    r"""Fit :math:`\lambda` such that :math:`E_{p_\lambda}[\phi_i] = \bar\mu_i` (see the module docstring).

    Args:
        phi: feature name -> values on the samples (shape ``[n]``).
        target_moments: feature name -> :math:`\bar\mu_i` (same names as ``phi``).
        log_weights: :math:`\log a(x_j) - \log q(x_j)` per sample; ``None`` when the samples are from ``a``.
        tol: required accuracy of the achieved moments on the samples.

    Raises:
        UnreachableMomentError: a :math:`\bar\mu_i` outside the open range of the sampled
            :math:`\phi_i` (no finite :math:`\lambda` reaches it), or the optimiser stopping short.
    """
    names, matrix = _as_matrix(phi)
    if set(target_moments) != set(names):
        raise ScoreError(f"target_moments names {sorted(target_moments)} must equal the features {sorted(names)}")
    mu = np.array([float(target_moments[k]) for k in names])
    n = matrix.shape[0]
    lw = np.zeros(n) if log_weights is None else np.asarray(torch.as_tensor(log_weights, dtype=torch.float64).cpu())
    if lw.shape != (n,):
        raise ScoreError(f"log_weights has shape {lw.shape}, expected ({n},) (one per sample)")
    support = lw > -np.inf
    for i, name in enumerate(names):
        lo, hi = matrix[support, i].min(), matrix[support, i].max()
        if not lo < mu[i] < hi:
            raise UnreachableMomentError(
                f"target moment {name} = {mu[i]:g} is outside the open range ({lo:g}, {hi:g}) of the "
                f"{int(support.sum())} "
                "samples: no finite lambda reaches it. Draw more (or more diverse) samples, or pick a moment inside."
            )

    def objective(lam: np.ndarray) -> tuple[float, np.ndarray]:
        logits = lw + matrix @ lam
        lse = logsumexp(logits)
        probs = np.exp(logits - lse)
        return lse - lam @ mu, probs @ matrix - mu

    def hessian(lam: np.ndarray) -> np.ndarray:
        logits = lw + matrix @ lam
        probs = np.exp(logits - logsumexp(logits))
        mean = probs @ matrix
        centred = matrix - mean
        return (centred * probs[:, None]).T @ centred

    result = minimize(objective, np.zeros(len(names)), jac=True, hess=hessian, method="trust-exact",
                      options={"gtol": tol * 1e-2, "maxiter": 1000})
    lam = result.x
    logits = lw + matrix @ lam
    probs = np.exp(logits - logsumexp(logits))
    return checked_fit(names, lam, mu, probs, matrix, int(result.nit), str(result.message), tol)


def checked_fit(names: Sequence[str], lambdas: np.ndarray, target: np.ndarray, probs: np.ndarray,
                matrix: np.ndarray, iterations: int, message: str, tol: float) -> MomentFit:
    """The :class:`MomentFit` of a solved dual (``probs``: final weights of the samples, summing to 1).

    Raises :class:`UnreachableMomentError` when the achieved moments miss the target by more than ``tol``.
    Shared by every solver of the dual (e.g. the per-prompt normalised fit of conditional tasks).
    """
    fit = MomentFit(
        lambdas={k: float(v) for k, v in zip(names, lambdas)},
        target_moments={k: float(v) for k, v in zip(names, target)},
        achieved_moments={k: float(v) for k, v in zip(names, probs @ matrix)},
        ess=float(1.0 / np.sum(probs**2)),
        n=int(matrix.shape[0]),
        iterations=iterations,
    )
    if fit.max_error > tol:
        raise UnreachableMomentError(
            f"lambda fitting stopped {fit.max_error:.3g} away from the target moments ({message}).\n"
            f"{fit.report()}\nThe moments may be jointly unreachable from these samples; draw more samples."
        )
    return fit
