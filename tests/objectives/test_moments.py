"""Fitting lambda of a exp(lambda . phi) to moment constraints, against the exact enumeration."""

from __future__ import annotations

import math

import pytest
import torch
from scipy.optimize import brentq
from toy_model import ToyAutoregressive, base_model, contains_token, exact_moment

from objectives import ExponentialFamily, ScoreError, Target, UnreachableMomentError, fit_lambdas


@pytest.fixture
def enumeration() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """log a, phi = "contains token 0" and psi = "contains token 1" over every toy sequence."""
    base = base_model()
    seqs = base.all_sequences()
    return base.log_probs_all().detach(), contains_token(seqs, 0), contains_token(seqs, 1)


@pytest.mark.parametrize("moment", [0.2, 0.5, 0.95])
def test_exact_fit_reaches_the_moment(enumeration, moment: float) -> None:
    log_a, phi, _ = enumeration
    fit = fit_lambdas({"phi": phi}, {"phi": moment}, log_weights=log_a)
    assert fit.max_error < 1e-6
    assert fit.n == phi.numel() and fit.target_moments == {"phi": moment}
    lam = fit.lambdas["phi"]
    # independently: E_p[phi] by enumeration, and lambda by bracketing root-finding
    assert abs(exact_moment(log_a, phi, lam) - moment) < 1e-6
    brute = brentq(lambda x: exact_moment(log_a, phi, x) - moment, -50.0, 50.0, xtol=1e-12)
    assert lam == pytest.approx(brute, abs=1e-5)
    # and the fitted target is a exp(lambda phi)
    target = fit.target()
    assert isinstance(target, Target) and isinstance(target.energies[0], ExponentialFamily)
    torch.testing.assert_close(target.log_P(log_a, {"phi": phi}), log_a + lam * phi)
    assert fit.target(conditional=True).conditional
    assert "phi" in fit.report() and f"{moment:.4f}" in fit.report()


def test_the_base_moment_needs_lambda_zero(enumeration) -> None:
    log_a, phi, _ = enumeration
    base_moment = exact_moment(log_a, phi, 0.0)
    fit = fit_lambdas({"phi": phi}, {"phi": base_moment}, log_weights=log_a)
    assert fit.lambdas["phi"] == pytest.approx(0.0, abs=1e-6)


def test_two_features_at_once(enumeration) -> None:
    log_a, phi, psi = enumeration
    moments = {"phi": 0.5, "psi": 0.6}
    fit = fit_lambdas({"phi": phi, "psi": psi}, moments, log_weights=log_a)
    assert fit.max_error < 1e-6
    logits = log_a + fit.lambdas["phi"] * phi + fit.lambdas["psi"] * psi
    p = torch.softmax(logits, 0)
    assert float((p * phi).sum()) == pytest.approx(0.5, abs=1e-6)
    assert float((p * psi).sum()) == pytest.approx(0.6, abs=1e-6)


def _sampling_tolerance(fit, moment: float) -> float:
    """Five standard errors of a self-normalised mean of a 0/1 feature with the fit's ESS."""
    return 5 * math.sqrt(moment * (1 - moment) / fit.ess)


def test_fit_from_samples_of_a_and_of_another_proposal(enumeration) -> None:
    log_a, phi, _ = enumeration
    base = base_model()
    moment, n = 0.5, 50_000
    exact_lam = fit_lambdas({"phi": phi}, {"phi": moment}, log_weights=log_a).lambdas["phi"]
    gen = torch.Generator().manual_seed(0)
    idx = base.sample(n, gen)
    from_a = fit_lambdas({"phi": phi[idx]}, {"phi": moment})
    assert from_a.max_error < 1e-6 and from_a.n == n
    assert abs(exact_moment(log_a, phi, from_a.lambdas["phi"]) - moment) < _sampling_tolerance(from_a, moment)
    proposal = ToyAutoregressive(seed=6, scale=0.5)
    log_q = proposal.log_probs_all().detach()
    idx = proposal.sample(n, gen)
    from_q = fit_lambdas({"phi": phi[idx]}, {"phi": moment}, log_weights=log_a[idx] - log_q[idx])
    assert from_q.max_error < 1e-6 and from_q.ess < n
    assert abs(exact_moment(log_a, phi, from_q.lambdas["phi"]) - moment) < _sampling_tolerance(from_q, moment)
    # without the importance weights the fit is wrong: it fits q's tilt, not a's
    unweighted = fit_lambdas({"phi": phi[idx]}, {"phi": moment})
    assert abs(exact_moment(log_a, phi, unweighted.lambdas["phi"]) - moment) > _sampling_tolerance(
        unweighted, moment
    )
    assert abs(from_q.lambdas["phi"] - exact_lam) < abs(unweighted.lambdas["phi"] - exact_lam)


@pytest.mark.slow
def test_unreachable_moments(enumeration) -> None:
    log_a, phi, _ = enumeration
    with pytest.raises(UnreachableMomentError, match=r"phi = 1\.2 is outside the open range \(0, 1\)"):
        fit_lambdas({"phi": phi}, {"phi": 1.2}, log_weights=log_a)
    with pytest.raises(UnreachableMomentError, match="outside the open range"):
        fit_lambdas({"phi": phi}, {"phi": 1.0}, log_weights=log_a)  # only reached as lambda -> inf
    graded = torch.tensor([0.1, 0.4, 0.9, 0.3])
    with pytest.raises(UnreachableMomentError, match=r"\(0\.1, 0\.9\)"):
        fit_lambdas({"score": graded}, {"score": 0.0})
    # samples with zero weight do not count towards the reachable range
    with pytest.raises(UnreachableMomentError, match=r"of the 2 samples"):
        fit_lambdas(
            {"score": graded}, {"score": 0.2}, log_weights=torch.tensor([-math.inf, 0.0, 0.0, -math.inf])
        )
    # each moment reachable alone, not jointly: the same feature twice with two different targets
    with pytest.raises(UnreachableMomentError, match="jointly unreachable"):
        fit_lambdas({"phi": phi, "copy": phi.clone()}, {"phi": 0.4, "copy": 0.6}, log_weights=log_a)


def test_input_errors(enumeration) -> None:
    log_a, phi, psi = enumeration
    with pytest.raises(ScoreError, match="at least one feature"):
        fit_lambdas({}, {})
    with pytest.raises(ScoreError, match="'phi' contains NaN"):
        fit_lambdas({"phi": torch.tensor([0.0, math.nan, 1.0])}, {"phi": 0.5})
    with pytest.raises(ScoreError, match="must equal the features"):
        fit_lambdas({"phi": phi}, {"psi": 0.5})
    with pytest.raises(ScoreError, match="different numbers of samples"):
        fit_lambdas({"phi": phi, "psi": psi[:5]}, {"phi": 0.5, "psi": 0.5})
    with pytest.raises(ScoreError, match="log_weights has shape"):
        fit_lambdas({"phi": phi}, {"phi": 0.5}, log_weights=log_a[:5])
