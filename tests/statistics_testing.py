"""Statistical tests shared by the test directories: is the mean of many sampled gradients the exact one?

Importable from every test module (``tests/conftest.py`` puts this directory on ``sys.path``).
"""

from __future__ import annotations

import torch
from scipy.stats import f as f_distribution

#: Reject "unbiased" below this p-value (about 4 standard errors).
P_VALUE_FLOOR = 1e-4


def hotelling(grads: torch.Tensor, exact: torch.Tensor) -> tuple[float, int, float]:
    """Hotelling's T^2 test that the mean of the rows of ``grads`` [K, d] equals ``exact``.

    The gradient of a softmax row sums to zero, so the covariance can be singular: the test works in the
    span of its eigenvectors with non-negligible eigenvalues (``rank`` of them) and the component of
    the difference outside that span must vanish. Under the null, (K - r) T^2 / ((K - 1) r) follows
    the F distribution with (r, K - r) degrees of freedom (r = rank; close to chi^2_r / r for K >> r).
    Returns ``(T^2, rank, p-value)``.
    """
    k = grads.shape[0]
    diff = grads.mean(0) - exact
    evals, evecs = torch.linalg.eigh(torch.cov(grads.T))
    keep = evals > evals.max() * 1e-10
    null_part = float((evecs[:, ~keep].T @ diff).norm())
    assert null_part <= 1e-8 * float(exact.norm()) + 1e-12, (
        f"difference outside the gradient span: {null_part}"
    )
    proj = evecs[:, keep].T @ diff
    t2 = k * float((proj**2 / evals[keep]).sum())
    rank = int(keep.sum())
    return t2, rank, float(f_distribution.sf(t2 * (k - rank) / ((k - 1) * rank), rank, k - rank))


def projection_directions(exact: torch.Tensor, n_random: int, seed: int = 0) -> torch.Tensor:
    """``[d, 1 + n_random]`` orthonormal directions: the exact gradient's own, then random ones.

    The first catches a wrong scale or sign of the estimate (a dropped ``Z``, an ascending loss); the
    random ones catch a bias in any other direction.
    """
    gen = torch.Generator().manual_seed(seed)
    random = torch.randn(exact.numel(), n_random, generator=gen, dtype=exact.dtype)
    q, _ = torch.linalg.qr(torch.cat([exact.reshape(-1, 1), random], dim=1))
    return q


def projected_hotelling(grads: torch.Tensor, exact: torch.Tensor, n_random: int = 4,
                        seed: int = 0) -> tuple[float, int, float]:
    """:func:`hotelling` on the projections of ``grads`` and ``exact`` onto :func:`projection_directions`.

    For gradients of many parameters (a neural network's), where K samples cannot estimate a d x d
    covariance: the projected means must agree in each of the ``1 + n_random`` directions.
    """
    directions = projection_directions(exact, n_random, seed)
    return hotelling(grads @ directions, exact @ directions)
