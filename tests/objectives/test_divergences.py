"""Generators f, their derivatives, the pseudo-reward, the registry and user-defined divergences."""

from __future__ import annotations

import math

import pytest
import torch
from toy_model import ToyAutoregressive, ToyProblem, make_problem

from objectives import (
    Alpha,
    CustomDivergence,
    Divergence,
    ForwardKL,
    InvalidGeneratorError,
    JensenShannon,
    PearsonChi2,
    ReverseKL,
    ScoreError,
    SquaredHellinger,
    TotalVariation,
    UnknownDivergenceError,
    ZeroTargetError,
    available_divergences,
    describe_divergences,
    get_divergence,
    register_divergence,
)
from objectives import registry as registry_module

INF = math.inf
LOG2 = math.log(2.0)
ALL_SPECS = [
    "rkl",
    "fkl",
    "tv",
    "js",
    "chi2",
    "hellinger",
    "alpha:0.5",
    "alpha:2",
    "alpha:-1",
    "alpha:0",
    "alpha:1",
]


def _exp(x: float) -> float:
    try:
        return math.exp(x)
    except OverflowError:
        return INF


def _expm1(x: float) -> float:
    try:
        return math.expm1(x)
    except OverflowError:
        return INF


def reference_f_prime(spec: str, log_t: float) -> float:
    """f'(t) at t = e^log_t from the textbook formulas, in Python floats (inf where it overflows)."""
    if spec == "rkl":
        return log_t + 1.0
    if spec == "fkl":
        return -_exp(-log_t)
    if spec == "tv":
        return math.copysign(0.5, log_t)
    if spec == "js":  # log(2t / (t + 1)) = log 2 - log(1 + 1/t)
        return LOG2 - (-log_t + math.log1p(_exp(log_t)) if log_t < 0 else math.log1p(_exp(-log_t)))
    if spec == "chi2":
        return 2.0 * _expm1(log_t)
    if spec == "hellinger":
        return -_expm1(-log_t / 2.0)
    alpha = float(spec.split(":")[1])
    if alpha == 1.0:
        return log_t
    return _expm1((alpha - 1.0) * log_t) / (alpha - 1.0)


# ------------------------------------------------------------------------------- f' against f
@pytest.mark.parametrize("spec", ALL_SPECS)
def test_closed_form_f_prime_is_the_derivative_of_f(spec: str) -> None:
    """d f(e^s) / ds = f'(e^s) e^s by autograd, on s in [-20, 20] (the grid avoids t = 1, TV's kink)."""
    div = get_divergence(spec)
    log_t = torch.linspace(-20.0, 20.0, 400, dtype=torch.float64, requires_grad=True)
    assert not bool((log_t == 0).any())
    (autograd,) = torch.autograd.grad(div.f(log_t).sum(), log_t)
    closed = div.f_prime(log_t.detach()) * log_t.detach().exp()
    torch.testing.assert_close(closed, autograd, rtol=1e-9, atol=1e-15)


@pytest.mark.parametrize("spec", ALL_SPECS)
def test_f_vanishes_at_one_and_is_convex(spec: str) -> None:
    div = get_divergence(spec)
    assert float(div.f(torch.zeros(1, dtype=torch.float64))) == 0.0
    fp = div.f_prime(torch.linspace(-20.0, 20.0, 401, dtype=torch.float64))
    assert bool((fp[1:] >= fp[:-1]).all())


# ------------------------------------------------------------------------------- stability
STABILITY_LOG_T = [-700.0, -300.0, -20.0, -1.0, 0.5, 20.0, 300.0, 700.0]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("spec", ALL_SPECS)
def test_no_nan_and_correct_values_up_to_700(spec: str, dtype: torch.dtype) -> None:
    div = get_divergence(spec)
    log_t = torch.linspace(-700.0, 700.0, 2801, dtype=dtype)
    f, fp = div.f(log_t), div.f_prime(log_t)
    assert f.dtype == dtype and fp.dtype == dtype
    assert not torch.isnan(f).any() and not torch.isnan(fp).any()
    # float32 results are the float64 results correctly rounded (computed wide, cast back)
    wide = log_t.to(torch.float64)
    torch.testing.assert_close(f, div.f(wide).to(dtype), rtol=0, atol=0)
    torch.testing.assert_close(fp, div.f_prime(wide).to(dtype), rtol=0, atol=0)
    points = torch.tensor(STABILITY_LOG_T, dtype=dtype)
    expected = torch.tensor(
        [reference_f_prime(spec, float(s)) for s in points.to(torch.float64)], dtype=torch.float64
    ).to(dtype)
    torch.testing.assert_close(
        div.f_prime(points), expected, rtol=1e-12 if dtype == torch.float64 else 1e-6, atol=0
    )


def test_named_limits_at_large_log_t() -> None:
    for dtype in (torch.float32, torch.float64):
        big = torch.tensor([-700.0, 700.0], dtype=dtype)
        assert torch.equal(ReverseKL().f_prime(big), big + 1)
        js = JensenShannon().f_prime(big)
        assert float(js[1]) == pytest.approx(LOG2, rel=1e-7)
        assert float(js[0]) == pytest.approx(LOG2 - 700.0, rel=1e-7)
        fkl = ForwardKL().f_prime(big)
        assert float(fkl[1]) == pytest.approx(0.0, abs=1e-300) and float(fkl[1]) <= 0
        assert torch.equal(TotalVariation().f_prime(big), torch.tensor([-0.5, 0.5], dtype=dtype))
        assert float(SquaredHellinger().f_prime(big)[1]) == pytest.approx(1.0)
    # e^700 fits in float64 but not in float32: finite and exact there, -inf (the rounded value) here
    assert float(ForwardKL().f_prime(torch.tensor(-700.0, dtype=torch.float64))) == pytest.approx(
        -math.exp(700.0)
    )
    assert float(ForwardKL().f_prime(torch.tensor(-700.0))) == -INF
    assert float(ReverseKL().f(torch.tensor(700.0, dtype=torch.float64))) == pytest.approx(
        700.0 * math.exp(700.0)
    )


@pytest.mark.parametrize(
    ("spec", "limit"),
    [
        ("fkl", 0.0),
        ("tv", 0.5),
        ("js", LOG2),
        ("hellinger", 1.0),
        ("rkl", INF),
        ("chi2", INF),
        ("alpha:0.5", 2.0),
        ("alpha:-1", 0.5),
        ("alpha:0", 1.0),
        ("alpha:2", INF),
        ("alpha:1", INF),
    ],
)
def test_f_prime_at_infinity(spec: str, limit: float) -> None:
    div = get_divergence(spec)
    assert div.f_prime_inf == pytest.approx(limit)
    at_inf = div.f_prime(torch.tensor([INF, 0.0], dtype=torch.float64))
    assert float(at_inf[0]) == pytest.approx(limit)
    if math.isfinite(limit):  # and it is the limit of f'(t)
        assert float(div.f_prime(torch.tensor(40.0, dtype=torch.float64))) == pytest.approx(limit, abs=1e-8)


def test_f_at_infinity_is_the_limit_of_f() -> None:
    at_inf = torch.tensor([INF], dtype=torch.float64)
    assert float(ForwardKL().f(at_inf)) == -INF  # -log t
    for spec in ("rkl", "tv", "js", "chi2", "hellinger", "alpha:0.5", "alpha:0", "alpha:2"):
        assert float(get_divergence(spec).f(at_inf)) == INF, spec


def test_alpha_limits_recover_the_kls() -> None:
    log_t = torch.linspace(-15.0, 15.0, 301, dtype=torch.float64)
    t = log_t.exp()
    one, zero = Alpha(1.0), Alpha(0.0)
    torch.testing.assert_close(one.f_prime(log_t), ReverseKL().f_prime(log_t) - 1.0)
    torch.testing.assert_close(one.f(log_t), t * log_t - t + 1.0)
    torch.testing.assert_close(zero.f_prime(log_t), ForwardKL().f_prime(log_t) + 1.0)
    torch.testing.assert_close(zero.f(log_t), -log_t + t - 1.0)
    # alpha = 1/2: f = 2 (sqrt(t) - 1)^2, twice the squared Hellinger generator (sqrt(t) - 1)^2
    torch.testing.assert_close(Alpha(0.5).f(log_t), 2 * SquaredHellinger().f(log_t))
    torch.testing.assert_close(Alpha(0.5).f_prime(log_t), 2 * SquaredHellinger().f_prime(log_t))
    moderate = torch.linspace(-5.0, 5.0, 101, dtype=torch.float64)
    for near, exact in ((Alpha(1 - 1e-6), one), (Alpha(1e-6), zero)):
        torch.testing.assert_close(near.f_prime(moderate), exact.f_prime(moderate), rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(near.f(moderate), exact.f(moderate), rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="alpha"):
        Alpha(math.nan)


# ------------------------------------------------------------------------------- pseudo-reward
@pytest.mark.parametrize("spec", ["fkl", "tv", "js", "hellinger", "alpha:0.5"])
def test_pseudo_reward_where_p_is_zero(spec: str) -> None:
    div = get_divergence(spec)
    rewards = div.pseudo_reward(torch.tensor([-1.0, -2.0]), torch.tensor([-INF, -1.5]))
    assert float(rewards[0]) == pytest.approx(-div.f_prime_inf)
    assert float(rewards[1]) == pytest.approx(-reference_f_prime(spec, -0.5), rel=1e-6)


@pytest.mark.parametrize("spec", ["rkl", "chi2", "alpha:2"])
def test_pseudo_reward_with_infinite_f_prime_at_infinity(spec: str) -> None:
    div = get_divergence(spec)
    log_pi, log_p = torch.tensor([-1.0, -2.0, -3.0]), torch.tensor([-INF, -1.5, -INF])
    with pytest.raises(ZeroTargetError, match=r"2 sample\(s\) have p\(x\) = 0.*max_log_ratio"):
        div.pseudo_reward(log_pi, log_p)
    clipped = div.pseudo_reward(log_pi, log_p, max_log_ratio=5.0)
    assert torch.isfinite(clipped).all()
    assert float(clipped[0]) == pytest.approx(-reference_f_prime(spec, 5.0), rel=1e-6)
    assert float(clipped[1]) == pytest.approx(-reference_f_prime(spec, -0.5), rel=1e-6)


def test_pseudo_reward_input_errors_and_broadcasting() -> None:
    div = JensenShannon()
    with pytest.raises(ScoreError, match="log_p contains NaN"):
        div.pseudo_reward(torch.zeros(3), torch.tensor([0.0, math.nan, -1.0]))
    with pytest.raises(ScoreError, match="log_pi contains NaN"):
        div.pseudo_reward(torch.tensor([math.nan]), torch.zeros(1))
    with pytest.raises(ScoreError, match=r"\(3,\).*\(4,\)"):
        div.pseudo_reward(torch.zeros(3), torch.zeros(4))
    with pytest.raises(ZeroTargetError, match=r"\+inf"):
        div.pseudo_reward(torch.zeros(1), torch.tensor([INF]))
    log_pi = torch.tensor([[-1.0], [-2.0], [-3.0]])
    log_p = torch.tensor([[-0.5, -1.0, -2.0, -INF]])
    rewards = div.pseudo_reward(log_pi, log_p)
    assert rewards.shape == (3, 4)
    for i in range(3):
        for j in range(4):
            one = div.pseudo_reward(log_pi[i, 0].reshape(1), log_p[0, j].reshape(1))
            assert float(rewards[i, j]) == float(one[0])
    assert div.pseudo_reward([-1.0, -2.0], [-1.0, -1.0]).dtype == torch.float64
    assert (
        div.pseudo_reward(torch.zeros(2, dtype=torch.float32), torch.zeros(2, dtype=torch.float32)).dtype
        == torch.float32
    )


@pytest.mark.parametrize(
    "make", [ReverseKL, JensenShannon, lambda: CustomDivergence(lambda t: t * torch.log(t))]
)
def test_pseudo_reward_gradient_only_on_request(make) -> None:
    div = make()
    log_pi = torch.tensor([-1.0, -2.0, -0.5], dtype=torch.float64, requires_grad=True)
    log_p = torch.tensor([-1.5, -1.5, -1.5], dtype=torch.float64)
    assert not div.pseudo_reward(log_pi, log_p).requires_grad
    rewards = div.pseudo_reward(log_pi, log_p, grad=True)
    assert rewards.requires_grad
    (grad,) = torch.autograd.grad(rewards.sum(), log_pi)
    # dR/dlog pi = -f''(t) t = -d f'(e^s)/ds, by central differences of f'
    s, h = (log_pi - log_p).detach(), 1e-6
    numeric = -(div.f_prime(s + h) - div.f_prime(s - h)) / (2 * h)
    torch.testing.assert_close(grad, numeric, rtol=1e-6, atol=1e-9)


# ------------------------------------------------------------------------------- exact and estimate
def independent_divergence(spec: str, pi: torch.Tensor, p: torch.Tensor) -> float:
    """D_f(pi||p) from its textbook definition as a distance between two probability vectors."""

    def kl(a: torch.Tensor, b: torch.Tensor) -> float:
        mask = a > 0
        return float((a[mask] * (a[mask] / b[mask]).log()).sum())

    if spec == "rkl":
        return kl(pi, p)
    if spec == "fkl":
        return kl(p, pi)
    if spec == "tv":
        return float((pi - p).abs().sum() / 2)
    if spec == "js":
        m = (pi + p) / 2
        return kl(pi, m) + kl(p, m)
    if spec == "chi2":
        return float(((pi - p) ** 2 / p).sum())
    if spec == "hellinger":
        return float(((pi.sqrt() - p.sqrt()) ** 2).sum())
    raise KeyError(spec)


@pytest.mark.parametrize("kind", ["rl", "binary"])
@pytest.mark.parametrize("spec", ["rkl", "fkl", "tv", "js", "chi2", "hellinger"])
def test_exact_divergence_matches_its_definition(kind: str, spec: str) -> None:
    problem = make_problem(kind)
    with torch.no_grad():
        log_pi = problem.policy.log_probs_all()
        value = float(get_divergence(spec).exact(log_pi, problem.log_p))
    expected = independent_divergence(spec, log_pi.exp(), problem.log_p.exp())
    if kind == "binary" and spec in ("rkl", "chi2"):
        assert value == INF
    else:
        assert value == pytest.approx(expected, rel=1e-10)
    assert float(get_divergence(spec).exact(problem.log_p, problem.log_p)) == pytest.approx(0.0, abs=1e-12)


@pytest.mark.parametrize("spec", ["rkl", "tv", "js"])
def test_exact_divergence_gradient_matches_finite_differences(rl_problem: ToyProblem, spec: str) -> None:
    div = get_divergence(spec)
    grad = rl_problem.exact_gradient(div)
    logits = rl_problem.policy.logits
    h = 1e-6
    for coordinate in (0, 5, 17, 38):
        with torch.no_grad():
            row, col = divmod(coordinate, logits.shape[1])
            logits[row, col] += h
            up = float(rl_problem.exact_divergence(div))
            logits[row, col] -= 2 * h
            down = float(rl_problem.exact_divergence(div))
            logits[row, col] += h
        assert float(grad[coordinate]) == pytest.approx((up - down) / (2 * h), rel=1e-5, abs=1e-8)


def _estimate_standard_error(
    div: Divergence, log_pi: torch.Tensor, log_p: torch.Tensor, log_q: torch.Tensor, n: int
) -> float:
    """Exact standard error of the IS estimate sum_x q (pi/q) f(t)/t over n samples of q."""
    log_t = torch.where(log_p == -INF, torch.full_like(log_p, INF), log_pi - log_p)
    f_over_t = torch.where(
        log_p == -INF,
        torch.full_like(log_p, div.f_prime_inf),
        div.f(log_t.clamp(max=700)) * torch.exp(-log_t.clamp(max=700)),
    )
    terms = torch.exp(log_pi - log_q) * f_over_t
    q = log_q.exp()
    mean = (q * terms).sum()
    return float(((q * (terms - mean) ** 2).sum() / n).sqrt())


@pytest.mark.parametrize("kind", ["rl", "binary"])
@pytest.mark.parametrize("spec", ["rkl", "fkl", "tv", "js", "chi2", "hellinger", "alpha:0.5"])
def test_estimate_converges_to_exact(kind: str, spec: str) -> None:
    problem = make_problem(kind)
    div = get_divergence(spec)
    gen = torch.Generator().manual_seed(7)
    n = 200_000
    with torch.no_grad():
        log_pi_all = problem.policy.log_probs_all()
        exact = float(div.exact(log_pi_all, problem.log_p))
        proposal = ToyAutoregressive(seed=3, scale=0.5).log_probs_all().detach()
        for log_q_all in (None, proposal):
            idx = (
                problem.policy.sample(n, gen)
                if log_q_all is None
                else torch.multinomial(log_q_all.exp(), n, replacement=True, generator=gen)
            )
            log_q = None if log_q_all is None else log_q_all[idx]
            estimate = float(div.estimate(log_pi_all[idx], problem.log_p[idx], log_q))
            if math.isinf(exact):
                assert estimate == INF
                continue
            se = _estimate_standard_error(
                div, log_pi_all, problem.log_p, log_pi_all if log_q_all is None else log_q_all, n
            )
            assert abs(estimate - exact) < 4 * se, (estimate, exact, se)
            assert se < 0.05 * exact  # the check has teeth: the estimate is within 5%


def test_estimate_ignores_proposal_samples_outside_the_policy() -> None:
    """Samples of q where pi = 0 contribute nothing (and no NaN)."""
    div = ForwardKL()
    value = div.estimate(
        torch.tensor([-INF, math.log(0.5)]),
        torch.tensor([-1.0, math.log(0.5)]),
        torch.tensor([math.log(0.5), math.log(0.5)]),
    )
    assert float(value) == pytest.approx(0.5 * (0.0 + 1.0 * 0.0))
    value = div.estimate(
        torch.tensor([-INF, math.log(0.5)]),
        torch.tensor([-1.0, math.log(0.25)]),
        torch.tensor([math.log(0.5), math.log(0.5)]),
    )
    # second sample: w = 1, t = 2, f(t)/t = -log(2)/2
    assert float(value) == pytest.approx(0.5 * (-LOG2 / 2))


# ------------------------------------------------------------------------------- registry
def test_registry_names_and_aliases() -> None:
    builtins = {
        "rkl": ReverseKL,
        "fkl": ForwardKL,
        "tv": TotalVariation,
        "js": JensenShannon,
        "chi2": PearsonChi2,
        "hellinger": SquaredHellinger,
    }
    for name, cls in builtins.items():
        assert isinstance(get_divergence(name), cls)
        assert get_divergence(name).name == name
    for alias, cls in [
        ("reverse_kl", ReverseKL),
        ("KL", ReverseKL),
        ("dpg", ForwardKL),
        ("forward-kl", ForwardKL),
        ("jsd", JensenShannon),
        ("total_variation", TotalVariation),
        ("pearson", PearsonChi2),
        ("squared_hellinger", SquaredHellinger),
        (" RKL ", ReverseKL),
    ]:
        assert isinstance(get_divergence(alias), cls), alias
    half = get_divergence("alpha:0.5")
    assert isinstance(half, Alpha) and half.alpha == 0.5 and half.name == "alpha:0.5"
    div = JensenShannon()
    assert get_divergence(div) is div
    names = available_divergences()
    assert set(builtins) | {"alpha"} <= set(names) and names == sorted(names)
    descriptions = describe_divergences()
    assert set(descriptions) == set(names) and all(descriptions.values())
    assert "RLHF" in descriptions["rkl"]


def test_registry_errors() -> None:
    with pytest.raises(UnknownDivergenceError, match=r"Did you mean 'js'") as info:
        get_divergence("jss")
    assert isinstance(info.value, KeyError) and isinstance(info.value, ValueError)
    assert "rkl" in str(info.value) and "register_divergence" in str(info.value)
    with pytest.raises(UnknownDivergenceError, match="'hellinger'"):
        get_divergence("helinger")
    with pytest.raises(UnknownDivergenceError, match="alpha:0.5"):
        get_divergence("alpha")
    with pytest.raises(UnknownDivergenceError, match="must be a number"):
        get_divergence("alpha:half")
    with pytest.raises(UnknownDivergenceError, match="takes no parameter"):
        get_divergence("rkl:2")
    with pytest.raises(UnknownDivergenceError):
        get_divergence(3)  # type: ignore[arg-type]


@pytest.fixture
def clean_registry(monkeypatch: pytest.MonkeyPatch) -> None:
    """Registrations made by a test vanish after it."""
    for attr in ("_FACTORIES", "_DESCRIPTIONS", "_ALIASES"):
        monkeypatch.setattr(registry_module, attr, dict(getattr(registry_module, attr)))


def test_register_custom_divergence(clean_registry: None) -> None:
    neyman = CustomDivergence(lambda t: (t - 1) ** 2 / t, name="neyman", description="Neyman chi-squared")
    register_divergence("neyman", neyman, aliases=("reverse_chi2",))
    assert get_divergence("neyman") is neyman and get_divergence("Reverse_Chi2") is neyman
    assert "neyman" in available_divergences()
    assert describe_divergences()["neyman"] == "Neyman chi-squared"
    with pytest.raises(UnknownDivergenceError, match="takes no parameter"):
        get_divergence("neyman:3")
    register_divergence(
        "power", lambda param: Alpha(float(param or 2.0)), description="alpha by another name"
    )
    assert get_divergence("power").alpha == 2.0 and get_divergence("power:0.25").alpha == 0.25
    register_divergence("tv2", TotalVariation)
    assert isinstance(get_divergence("tv2"), TotalVariation)
    with pytest.raises(TypeError):
        register_divergence("bad", 3)  # type: ignore[arg-type]


# ------------------------------------------------------------------------------- user-defined
def test_custom_divergences_match_closed_forms() -> None:
    log_t = torch.linspace(-10.0, 10.0, 201, dtype=torch.float64)
    t = log_t.exp()
    user_js = CustomDivergence(
        lambda t: t * torch.log(2 * t / (t + 1)) + torch.log(2 / (t + 1)), name="user_js"
    )
    torch.testing.assert_close(user_js.f_prime(log_t), JensenShannon().f_prime(log_t), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(user_js.f(log_t), JensenShannon().f(log_t), rtol=1e-10, atol=1e-12)
    assert user_js.f_prime_inf == pytest.approx(LOG2, abs=1e-9)
    neyman = CustomDivergence(lambda t: (t - 1) ** 2 / t, name="neyman")
    torch.testing.assert_close(neyman.f_prime(log_t), 1 - 1 / t**2, rtol=1e-10, atol=1e-12)
    assert neyman.f_prime_inf == pytest.approx(1.0)
    t_log_t = CustomDivergence(lambda t: t * torch.log(t), name="tlogt")
    assert t_log_t.f_prime_inf == INF
    torch.testing.assert_close(t_log_t.f_prime(log_t), ReverseKL().f_prime(log_t))
    assert float(t_log_t.f_prime(torch.tensor([INF], dtype=torch.float64))) == INF
    given = CustomDivergence(lambda t: t * torch.log(t), name="clipped", f_prime_inf=3.0)
    assert given.f_prime_inf == 3.0
    # its pseudo-reward where p = 0 follows f'(inf)
    assert float(user_js.pseudo_reward(torch.tensor([-1.0]), torch.tensor([-INF]))) == pytest.approx(-LOG2)
    with pytest.raises(ZeroTargetError):
        t_log_t.pseudo_reward(torch.tensor([-1.0]), torch.tensor([-INF]))


def _grid_t(s: float) -> str:
    """``t = e^s`` as the validation message prints it (the grid is s = -10, -9.9, ..., 10)."""
    return f"t = {math.exp(s):.6g}"


@pytest.mark.parametrize(
    ("fn", "check", "where"),
    [
        (lambda t: t * torch.log(t) + 1.0, "f(1) = 0", "f(1) = 1.0"),
        (lambda t: 1.0 / (t - 1.0), "f(1) = 0", "f(1) = inf"),
        # f' = cos(t - 1) rises up to t = 1 and first falls on the grid's next point, e^0.1
        (lambda t: torch.sin(t - 1.0), "convexity", _grid_t(0.1)),
        (lambda t: -((t - 1.0) ** 2), "convexity", _grid_t(-9.9)),  # f' = -2(t - 1) falls from the start
        (lambda t: -torch.log(t - 0.5) - LOG2, "finiteness", _grid_t(-10.0)),  # NaN for t < 1/2
        # finite below t = 50 only: the first grid point above 50 is e^4 = 54.6
        (lambda t: torch.where(t > 50.0, torch.nan, (t - 1.0) ** 2), "finiteness", _grid_t(4.0)),
        # convex up to t = 20, then constant: f' drops from 2(t - 1) to 0 at the grid point e^3 = 20.1
        (lambda t: torch.where(t < 20.0, (t - 1.0) ** 2, 361.0 + 0.0 * t), "convexity", _grid_t(3.0)),
        (lambda t: ((t - 1.0) ** 2).sum(), "elementwise", "returned shape ()"),
        (lambda t: t.numpy_only_method(), "could not be evaluated", "t in [e^-10, e^10]"),
    ],
)
def test_invalid_generators_are_rejected(fn, check: str, where: str) -> None:
    """A failing check names itself and the first t where it fails (README)."""
    with pytest.raises(
        InvalidGeneratorError, match=r"'bad'.*" + check.replace("(", r"\(").replace(")", r"\)")
    ) as info:
        CustomDivergence(fn, name="bad")
    assert where in str(info.value), str(info.value)


def test_validation_can_be_skipped() -> None:
    div = CustomDivergence(lambda t: torch.sin(t - 1.0), name="sine", validate=False, f_prime_inf=0.0)
    assert div.name == "sine"
