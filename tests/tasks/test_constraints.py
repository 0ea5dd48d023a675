"""The shared constraint machinery: word tokens, the per-prompt moment fit, and the base-model sampler."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.optimize import brentq

from objectives import UnreachableMomentError, fit_lambdas
from tasks.constraints import base_sampler, contains_any, count_words, fit_moments, words


def test_words_are_lowercase_alphabetic_tokens() -> None:
    assert words("She's a Nobel-prize WINNER (1903).") == ["she", "s", "a", "nobel", "prize", "winner"]
    assert count_words("he said he would", {"he"}) == 2
    assert contains_any("THE END", ["end"]) and not contains_any("ending", ["end"])


def _sigmoid_rate(base: float, lam: float) -> float:
    return base * math.exp(lam) / (base * math.exp(lam) + 1 - base)


def test_per_prompt_fit_matches_the_closed_form() -> None:
    # prompt A: base rate 0.1, prompt B: base rate 0.5, equally many samples
    phi = torch.tensor([1.0] + [0.0] * 9 + [1.0] * 5 + [0.0] * 5)
    groups = ["A"] * 10 + ["B"] * 10
    fit = fit_moments({"f": phi}, {"f": 0.5}, groups=groups)
    exact = brentq(lambda lam: 0.5 * (_sigmoid_rate(0.1, lam) + _sigmoid_rate(0.5, lam)) - 0.5, -20, 20)
    assert fit.lambdas["f"] == pytest.approx(exact, abs=1e-6)
    assert fit.achieved_moments["f"] == pytest.approx(0.5, abs=1e-6)
    # one global normaliser reweights the prompts themselves and gives a smaller lambda
    global_fit = fit_lambdas({"f": phi}, {"f": 0.5})
    assert global_fit.lambdas["f"] < fit.lambdas["f"] - 0.1
    lam = global_fit.lambdas["f"]
    assert lam == pytest.approx(math.log(7 / 3), abs=1e-6)  # pooled base rate 0.3 -> 0.5
    # what a policy would reach with the global fit (it cannot reweight its prompts): 0.453, not 0.5
    assert 0.5 * (_sigmoid_rate(0.1, lam) + _sigmoid_rate(0.5, lam)) < 0.46


def test_single_group_is_fit_lambdas() -> None:
    rng = np.random.default_rng(0)
    phi = {"x": torch.tensor(rng.integers(0, 2, 50), dtype=torch.float64),
           "y": torch.tensor(rng.normal(size=50))}
    moments = {"x": 0.6, "y": 0.2}
    a = fit_moments(phi, moments, groups=["c"] * 50)
    b = fit_lambdas(phi, moments)
    assert a.lambdas == pytest.approx(b.lambdas)
    # independently of both: the samples reweighted by e^(lambda . phi) (self-normalised) meet the moments
    matrix = np.stack([phi["x"].numpy(), phi["y"].numpy()], axis=1)
    logits = matrix @ np.array([a.lambdas["x"], a.lambdas["y"]])
    weights = np.exp(logits - logits.max())
    weights /= weights.sum()
    assert weights @ matrix == pytest.approx([0.6, 0.2], abs=1e-6)
    assert abs(a.lambdas["x"]) > 0.1  # x's base moment is not 0.6: lambda != 0
    # and one feature: lambda is the root of the moment equation (bracketing, not the dual's Newton steps)
    x = phi["x"].numpy()
    exact = brentq(lambda lam: float((x * np.exp(lam * x)).sum() / np.exp(lam * x).sum()) - 0.6, -20, 20, xtol=1e-12)
    assert fit_moments({"x": phi["x"]}, {"x": 0.6}, groups=["c"] * 50).lambdas["x"] == pytest.approx(exact, abs=1e-6)


def test_two_features_grouped_and_reachability() -> None:
    rng = np.random.default_rng(1)
    n = 120
    phi = {"x": torch.tensor(rng.integers(0, 2, n), dtype=torch.float64),
           "y": torch.tensor(rng.integers(0, 2, n), dtype=torch.float64)}
    groups = [i % 3 for i in range(n)]
    fit = fit_moments(phi, {"x": 0.3, "y": 0.7}, groups=groups)
    assert fit.achieved_moments == pytest.approx({"x": 0.3, "y": 0.7}, abs=1e-6)
    assert 1 < fit.ess <= n
    # a prompt whose samples never have x = 1 caps the reachable average below 1
    phi_capped = {"x": torch.tensor([0.0] * 10 + [0.0, 1.0] * 5)}
    with pytest.raises(UnreachableMomentError, match="outside the open range"):
        fit_moments(phi_capped, {"x": 0.6}, groups=["a"] * 10 + ["b"] * 10)
    assert fit_moments(phi_capped, {"x": 0.4}, groups=["a"] * 10 + ["b"] * 10).achieved_moments["x"] == \
        pytest.approx(0.4, abs=1e-6)


@pytest.mark.slow
def test_base_sampler_draws_from_the_reference_with_stratified_prompts(tiny_model_dir) -> None:
    from fdpg.policy import Policy

    policy = Policy.from_pretrained(str(tiny_model_dir))
    with torch.no_grad():  # move the policy away from the reference: samples must not change
        for p in policy.model.parameters():
            p.add_(torch.randn_like(p))
    sample = base_sampler(policy, ["ab", "cd", "ef"], max_new_tokens=6, seed=3, batch_size=4)
    texts, prompts = sample(10)
    assert len(texts) == len(prompts) == 10
    assert sorted(prompts.count(p) for p in ("ab", "cd", "ef")) == [3, 3, 4]
    assert sample(10) == (texts, prompts)  # seeded

    reference_only = Policy.from_pretrained(str(tiny_model_dir))
    assert base_sampler(reference_only, ["ab", "cd", "ef"], 6, seed=3, batch_size=4)(10) == (texts, prompts)
