"""Utilities U of ranking-based reward training: families, extensions, registry, prompt-aware U, the loss."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from objectives.errors import ObjectiveError, ScoreError
from objectives.utilities import (
    DEFAULT_EPS,
    BoundedUtility,
    Linear,
    Log,
    LogSigmoid,
    NegPower,
    Power,
    PromptAwareUtility,
    UnknownUtilityError,
    Utility,
    UtilityError,
    available_utilities,
    describe_utilities,
    get_utility,
    ranking_loss,
    utility_from_function,
)


def _logsig(x: np.ndarray, s: float) -> np.ndarray:
    return -np.logaddexp(0.0, -x / s)


# (spec, U, U', U'') as NumPy closed forms on (0, 1]
CLOSED_FORMS = [
    ("power:0.25", lambda x: x**0.25, lambda x: 0.25 * x**-0.75, lambda x: -0.1875 * x**-1.75),
    ("power:0.5", np.sqrt, lambda x: 0.5 / np.sqrt(x), lambda x: -0.25 * x**-1.5),
    ("power:0.9", lambda x: x**0.9, lambda x: 0.9 * x**-0.1, lambda x: -0.09 * x**-1.1),
    ("neg_power:0.5", lambda x: -(x**-0.5), lambda x: 0.5 * x**-1.5, lambda x: -0.75 * x**-2.5),
    ("neg_power:1", lambda x: -1 / x, lambda x: x**-2.0, lambda x: -2 * x**-3.0),
    ("log", np.log, lambda x: 1 / x, lambda x: -(x**-2.0)),
    (
        "log_sigmoid:1",
        lambda x: _logsig(x, 1.0),
        lambda x: 1 / (1 + np.exp(x)),
        lambda x: -np.exp(x) / (1 + np.exp(x)) ** 2,
    ),
    (
        "log_sigmoid:0.1",
        lambda x: _logsig(x, 0.1),
        lambda x: 10 / (1 + np.exp(10 * x)),
        lambda x: -100 * np.exp(10 * x) / (1 + np.exp(10 * x)) ** 2,
    ),
    ("linear", lambda x: x, np.ones_like, np.zeros_like),
]
SPECS = [c[0] for c in CLOSED_FORMS]
BOUNDED_SPECS = ["power:0.25", "power:0.5", "power:0.9", "neg_power:0.5", "neg_power:1", "log"]


def _t(x) -> torch.Tensor:
    return torch.as_tensor(np.asarray(x, dtype=np.float64))


def _autograd(u: Utility, x: np.ndarray) -> np.ndarray:
    xt = _t(x).requires_grad_(True)
    u(xt).sum().backward()
    return xt.grad.numpy()


# ------------------------------------------------------------------------------------------ closed forms
@pytest.mark.parametrize("spec,f,f1,f2", CLOSED_FORMS, ids=SPECS)
def test_values_and_derivatives_match_closed_forms_on_unit_interval(spec, f, f1, f2):
    u = get_utility(spec)
    x = np.linspace(0.01, 1.0, 100)
    np.testing.assert_allclose(u(_t(x)).numpy(), f(x), rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(_autograd(u, x), f1(x), rtol=1e-10)
    np.testing.assert_allclose(u.derivative(_t(x)).numpy(), f1(x), rtol=1e-12)
    np.testing.assert_allclose(u.second_derivative(_t(x)).numpy(), f2(x), rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("spec", SPECS)
def test_dtype_is_preserved_and_lists_are_accepted(spec):
    u = get_utility(spec)
    assert u(torch.tensor([0.5], dtype=torch.float32)).dtype == torch.float32
    assert u([0.25, 0.5]).dtype == torch.float64


def test_bounded_flag_and_names():
    assert {s for s in SPECS if get_utility(s).bounded} == set(BOUNDED_SPECS)
    for spec in SPECS:
        u = get_utility(spec)
        assert u.name == spec
        assert get_utility(u.name) == u  # the name parses back
    assert str(get_utility("power", gamma=0.5)) == "power:0.5"


# ------------------------------------------------------------------------------------------ extension
@pytest.mark.parametrize("eps", [DEFAULT_EPS, 1e-2])
@pytest.mark.parametrize("spec", BOUNDED_SPECS)
def test_extension_below_eps_is_the_tangent_line(spec, eps):
    u = get_utility(spec, eps=eps)
    assert isinstance(u, BoundedUtility) and u.eps == eps
    f = next(c for c in CLOSED_FORMS if c[0] == spec)
    x = np.array([-1.0, -0.3, 0.0, eps / 2, eps])
    tangent = f[1](eps) + f[2](eps) * (x - eps)
    np.testing.assert_allclose(u(_t(x)).numpy(), tangent, rtol=1e-12)
    np.testing.assert_allclose(_autograd(u, x), np.full(x.shape, f[2](eps)), rtol=1e-12)
    np.testing.assert_allclose(u.derivative(_t(x)).numpy(), np.full(x.shape, f[2](eps)), rtol=1e-12)
    assert np.all(u.second_derivative(_t(x[:-1])).numpy() == 0.0)


@pytest.mark.parametrize("eps", [DEFAULT_EPS, 1e-2])
@pytest.mark.parametrize("spec", BOUNDED_SPECS)
def test_extension_is_continuous_and_c1_at_eps(spec, eps):
    u = get_utility(spec, eps=eps)
    slope = float(u.derivative(eps))
    for h in (eps * 1e-2, eps * 1e-4):
        left = (float(u(eps)) - float(u(eps - h))) / h
        right = (float(u(eps + h)) - float(u(eps))) / h
        # concavity pins the right quotient between U'(eps + h) and U'(eps); both tend to U'(eps)
        assert float(u.derivative(eps + h)) * (1 - 1e-9) <= right <= slope * (1 + 1e-9)
        assert left == pytest.approx(slope, rel=1e-6)
        curvature = abs(float(u.second_derivative(eps * (1 + 1e-9))))  # |U''| just above eps, its max on [eps, 1]
        assert abs(right - slope) <= 0.51 * h * curvature
        assert abs(float(u(eps + h)) - float(u(eps - h))) <= 2.01 * h * slope  # continuous


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("spec", SPECS)
def test_values_and_gradients_finite_on_minus_one_to_one(spec, dtype):
    u = get_utility(spec)
    x = torch.tensor([-1.0, -0.5, -1e-3, -DEFAULT_EPS, 0.0, DEFAULT_EPS, 1e-3, 0.5, 1.0], dtype=dtype)
    x.requires_grad_(True)
    y = u(x)
    y.sum().backward()
    assert torch.isfinite(y).all(), y
    assert torch.isfinite(x.grad).all() and (x.grad > 0).all(), x.grad


@pytest.mark.parametrize("spec", SPECS)
def test_increasing_and_concave_on_a_grid_of_minus_one_to_one(spec):
    u = get_utility(spec)
    x = np.unique(np.concatenate([np.linspace(-1, 1, 4001), DEFAULT_EPS * np.linspace(0, 3, 61)]))
    y = u(_t(x)).numpy()
    assert np.all(np.diff(y) > 0), spec
    # concave: slopes of consecutive chords do not increase (up to rounding)
    slopes = np.diff(y) / np.diff(x)
    noise = 1e-9 * np.abs(slopes).max()
    assert np.all(np.diff(slopes) <= noise), spec
    d1 = u.derivative(_t(x)).numpy()
    assert np.all(np.diff(d1) <= noise) and np.all(d1 > 0)
    assert np.all(u.second_derivative(_t(x)).numpy() <= 0)


# ------------------------------------------------------------------------------------------ errors
@pytest.mark.parametrize("gamma", [0.0, 1.0, 1.5, -0.2])
def test_power_gamma_out_of_range(gamma):
    with pytest.raises(UtilityError) as info:
        get_utility("power", gamma=gamma)
    msg = str(info.value)
    assert "power" in msg and f"gamma={gamma!r}" in msg and "(0, 1)" in msg
    assert isinstance(info.value, ObjectiveError) and isinstance(info.value, ValueError)
    with pytest.raises(UtilityError, match="power"):
        get_utility(f"power:{gamma}")


@pytest.mark.parametrize("gamma", [0.0, 1.5, -1.0])
def test_neg_power_gamma_out_of_range(gamma):
    with pytest.raises(UtilityError) as info:
        NegPower(gamma)
    msg = str(info.value)
    assert "neg_power" in msg and f"gamma={gamma!r}" in msg and "(0, 1]" in msg


def test_other_parameter_errors():
    for sigma in (0.0, -1.0, math.inf):
        with pytest.raises(UtilityError, match="sigma"):
            LogSigmoid(sigma)
    for eps in (0.0, -1e-3, 1.0):
        with pytest.raises(UtilityError, match="eps"):
            Log(eps=eps)
    with pytest.raises(UtilityError, match="gamma"):
        get_utility("power")  # no gamma at all
    with pytest.raises(UtilityError, match="twice"):
        get_utility("power:0.5", gamma=0.5)
    with pytest.raises(UtilityError, match="no parameter"):
        get_utility("log:2")
    with pytest.raises(UtilityError, match="number"):
        get_utility("power:half")
    with pytest.raises(UtilityError, match="unexpected"):
        get_utility("linear", gamma=0.5)


def test_unknown_name_lists_the_known_ones():
    with pytest.raises(UnknownUtilityError) as info:
        get_utility("pwer:0.5")
    msg = str(info.value)
    assert "'pwer:0.5'" in msg and "did you mean 'power'" in msg
    for name in available_utilities():
        assert name in msg
    assert isinstance(info.value, KeyError) and isinstance(info.value, ValueError)
    assert set(available_utilities()) == {"power", "neg_power", "log", "log_sigmoid", "linear"}
    assert "neg_power:gamma" in describe_utilities()


def test_registry_keywords_specs_and_instances_agree():
    assert get_utility("power", gamma=0.5) == get_utility("power:0.5") == Power(0.5)
    assert get_utility("neg_power:1") == get_utility("neg_power", gamma=1.0) == NegPower(1.0)
    assert float(get_utility("neg_power:1")(0.5)) == -2.0
    assert get_utility("log_sigmoid:1.0") == LogSigmoid(1.0) == get_utility("log_sigmoid")
    assert get_utility(" LOG ") == Log()
    assert get_utility("linear") == Linear()
    assert get_utility("log", eps=1e-3).eps == 1e-3
    u = Power(0.3)
    assert get_utility(u) is u


# ------------------------------------------------------------------------------------------ user-defined
def test_user_torch_function_gets_autograd_derivatives():
    u = utility_from_function(torch.log1p, name="log1p", bounded=True)
    assert u.name == "log1p" and u.bounded and u.uses_torch
    x = np.array([0.0, 0.3, 1.0])
    np.testing.assert_allclose(u(_t(x)).numpy(), np.log1p(x))
    np.testing.assert_allclose(u.derivative(_t(x)).numpy(), 1 / (1 + x))
    np.testing.assert_allclose(u.second_derivative(_t(x)).numpy(), -1 / (1 + x) ** 2)
    np.testing.assert_allclose(_autograd(u, x), 1 / (1 + x))
    lin = utility_from_function(lambda d: 2 * d, name="twice")
    np.testing.assert_allclose(lin.second_derivative(_t(x)).numpy(), 0.0)
    np.testing.assert_allclose(lin.derivative(_t(x)).numpy(), 2.0)


def test_user_numpy_function_gets_finite_difference_derivatives():
    u = utility_from_function(np.log1p, name="np_log1p")
    assert not u.uses_torch and not u.bounded
    x = np.array([0.1, 0.3, 1.0])
    np.testing.assert_allclose(u(_t(x)).numpy(), np.log1p(x))
    np.testing.assert_allclose(u.derivative(_t(x)).numpy(), 1 / (1 + x), rtol=1e-7)
    np.testing.assert_allclose(u.second_derivative(_t(x)).numpy(), -1 / (1 + x) ** 2, rtol=1e-4)
    exact = utility_from_function(
        np.log1p, derivative=lambda d: 1 / (1 + d), second_derivative=lambda d: -((1 + d) ** -2.0)
    )
    np.testing.assert_allclose(exact.second_derivative(_t(x)).numpy(), -1 / (1 + x) ** 2, rtol=1e-12)


def test_user_function_errors():
    with pytest.raises(UtilityError, match="callable"):
        utility_from_function(3.0)
    with pytest.raises(UtilityError, match="elementwise"):
        utility_from_function(lambda d: np.sum(np.asarray(d)), name="total")
    with pytest.raises(UtilityError, match="elementwise"):
        utility_from_function(torch.sum, name="torch_total")
    with pytest.raises(UtilityError, match="fails"):
        utility_from_function(lambda d: math.log(d), name="scalar_only")


# ------------------------------------------------------------------------------------------ prompt-aware
def test_prompt_aware_applies_each_pairs_own_utility_in_one_batch():
    open_u, closed_u = NegPower(1.0), Linear()
    pa = PromptAwareUtility.from_column({"open": open_u, "closed": closed_u})
    diff = torch.tensor([0.5, 0.5, 0.2, -0.3], dtype=torch.float64, requires_grad=True)
    kinds = ["open", "closed", "closed", "open"]
    out = pa(diff, kinds)
    expected = torch.stack([open_u(diff[0]), closed_u(diff[1]), closed_u(diff[2]), open_u(diff[3])])
    torch.testing.assert_close(out, expected)
    assert float(out[0]) == -2.0 and float(out[1]) == 0.5  # the same difference, two utilities
    out.sum().backward()
    torch.testing.assert_close(diff.grad[:3], torch.tensor([4.0, 1.0, 1.0], dtype=torch.float64))
    assert float(diff.grad[3]) == pytest.approx(1e12)  # the tangent slope of -1/x below eps
    assert pa.bounded and pa.keys(kinds) == kinds
    assert pa.name == "prompt_aware(open=neg_power:1, closed=linear)"


def test_prompt_aware_rule_on_prompts_and_specs():
    def kind(prompt: str) -> str:
        return "closed" if prompt.startswith("What is") else "open"

    pa = PromptAwareUtility(kind, {"open": "log", "closed": "linear"})
    prompts = ["What is the capital of New Zealand?", "Write a story about your best friend."]
    diff = torch.tensor([0.25, 0.25], dtype=torch.float64)
    out = pa(diff, prompts)
    torch.testing.assert_close(out, torch.tensor([0.25, math.log(0.25)], dtype=torch.float64))
    assert pa.utility_for(prompts[1]) == Log()


def test_prompt_aware_errors():
    pa = PromptAwareUtility.from_column({"open": "log", "closed": "linear"})
    with pytest.raises(UnknownUtilityError) as info:
        pa(torch.tensor([0.1, 0.2]), ["open", "creative"])
    assert "'creative'" in str(info.value) and "'open'" in str(info.value) and "'closed'" in str(info.value)
    with pytest.raises(ScoreError, match="one context"):
        pa(torch.tensor([0.1, 0.2]), ["open"])
    with pytest.raises(UtilityError, match="non-empty"):
        PromptAwareUtility.from_column({})
    with pytest.raises(UtilityError, match="not a Utility"):
        PromptAwareUtility.from_column({"open": 3})
    with pytest.raises(UnknownUtilityError):
        PromptAwareUtility.from_column({"open": "nope"})


# ------------------------------------------------------------------------------------------ loss
def test_ranking_loss_is_minus_mean_utility_of_diff_minus_margin():
    diff = torch.tensor([0.6, 0.2, -0.1], dtype=torch.float64)
    u = LogSigmoid(1.0)
    torch.testing.assert_close(ranking_loss(diff, u), -u(diff).mean())
    torch.testing.assert_close(ranking_loss(diff, "log_sigmoid", margin=0.1), -u(diff - 0.1).mean())
    margin = torch.tensor([0.5, 0.0, 0.2], dtype=torch.float64)
    torch.testing.assert_close(ranking_loss(diff, u, margin=margin), -u(diff - margin).mean())
    # a margin makes the loss larger: it asks the winner to win by more
    assert float(ranking_loss(diff, u, margin=0.1)) > float(ranking_loss(diff, u))


def test_ranking_loss_prompt_aware_and_gradients():
    pa = PromptAwareUtility.from_column({"open": "neg_power:1", "closed": "linear"})
    diff = torch.tensor([0.5, 0.5, -0.2, 0.0], dtype=torch.float64, requires_grad=True)
    loss = ranking_loss(diff, pa, contexts=["open", "closed", "open", "closed"])
    assert float(loss) == pytest.approx(-(-2.0 + 0.5 + float(NegPower(1.0)(-0.2)) + 0.0) / 4)
    loss.backward()
    assert torch.isfinite(diff.grad).all() and (diff.grad < 0).all()


def test_ranking_loss_errors():
    with pytest.raises(ScoreError, match="bounded"):
        ranking_loss(torch.tensor([1.5]), "log")
    ranking_loss(torch.tensor([1.5]), "log_sigmoid")  # unbounded rewards are fine here
    with pytest.raises(ScoreError, match="needs contexts"):
        ranking_loss(torch.tensor([0.5]), PromptAwareUtility.from_column({"a": "log"}))
    with pytest.raises(ScoreError, match="not prompt-aware"):
        ranking_loss(torch.tensor([0.5]), "log", contexts=["a"])
    with pytest.raises(ScoreError, match="empty"):
        ranking_loss(torch.tensor([]), "log")
    with pytest.raises(ScoreError, match="NaN"):
        ranking_loss(torch.tensor([0.5, math.nan]), "log")
    with pytest.raises(ScoreError, match="margin"):
        ranking_loss(torch.tensor([0.5, 0.2]), "log", margin=torch.tensor([0.1, 0.2, 0.3]))
