"""DPO and f-DPO as special cases of the f-divergence view, on the exact enumerable toy model.

The expected loss over Bradley-Terry preferences is computed exactly: every pair (x, x') of toy sequences, drawn
from the base model a, weighted by a(x) a(x') and labelled x > x' with probability sigmoid(r(x) - r(x')).
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from toy_model import base_model

from objectives import get_divergence
from objectives.preference import (
    PreferenceLossError,
    f_dpo_problem,
    f_dpo_scores,
    implicit_rewards,
    preference_loss,
)

BETA = 0.5


def toy_preferences(seed: int = 3):
    """log a over the 27 sequences of a 3x3 toy model, and a reward r per sequence."""
    a = base_model(vocab=3, length=3, seed=seed)
    with torch.no_grad():
        log_a = a.log_probs_all()
    r = torch.randn(len(log_a), generator=torch.Generator().manual_seed(seed + 10), dtype=torch.float64)
    return log_a, r


def expected_loss(logits: torch.Tensor, log_a: torch.Tensor, r: torch.Tensor, divergence, beta: float) -> torch.Tensor:
    """E over pairs x, x' ~ a x a and Bradley-Terry labels of the sigmoid f-DPO loss of pi = softmax(logits)."""
    log_pi = torch.log_softmax(logits, 0)
    log_ratio = log_pi - log_a
    n = len(log_a)
    w_i, l_i = torch.meshgrid(torch.arange(n), torch.arange(n), indexing="ij")
    pair_weight = torch.exp(log_a[w_i] + log_a[l_i]) * torch.sigmoid(r[w_i] - r[l_i])  # x_w = i preferred over j
    losses = preference_loss(log_ratio[w_i].flatten(), log_ratio[l_i].flatten(), divergence, beta).view(n, n)
    return (pair_weight * losses).sum()


def minimise(log_a: torch.Tensor, r: torch.Tensor, divergence, beta: float) -> torch.Tensor:
    """The distribution of the fully parameterised policy (one logit per sequence) at the expected loss's minimum."""
    logits = log_a.clone().requires_grad_(True)  # start at the reference
    opt = torch.optim.LBFGS([logits], lr=1.0, max_iter=500, tolerance_grad=1e-12, tolerance_change=1e-15,
                            history_size=50, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = expected_loss(logits, log_a, r, divergence, beta)
        loss.backward()
        return loss

    for _ in range(5):
        opt.step(closure)
    return torch.softmax(logits.detach(), 0)


def test_dpo_on_bradley_terry_preferences_reaches_the_f_dpg_reverse_kl_target():
    log_a, r = toy_preferences()
    pi = minimise(log_a, r, get_divergence("rkl"), BETA)
    p = torch.softmax(log_a + r / BETA, 0)  # p ∝ a exp(r / beta), the target of f-DPG reverse KL
    tv = 0.5 * (pi - p).abs().sum()
    assert tv < 1e-3, f"TV(pi_DPO, p) = {tv:.2e}"
    # and the reference itself is far from it (the test can fail)
    assert 0.5 * (torch.exp(log_a) - p).abs().sum() > 0.1


@pytest.mark.slow
def test_f_dpo_js_optimum_solves_f_prime_equal_to_the_reward():
    """f-DPO's optimum: f'(pi/a) = r/beta + c for one constant c (Wang et al. 2023), here for Jensen-Shannon."""
    log_a, r = toy_preferences(seed=5)
    js = get_divergence("js")
    pi = minimise(log_a, r, js, BETA)
    s = f_dpo_scores(torch.log(pi) - log_a, js)
    offset = s - r / BETA
    mass = torch.exp(log_a)
    spread = torch.sqrt((mass * (offset - (mass * offset).sum()) ** 2).sum())  # a-weighted spread of c
    assert spread < 1e-3
    # JS's optimum is not DPO's
    p = torch.softmax(log_a + r / BETA, 0)
    assert 0.5 * (pi - p).abs().sum() > 1e-2


def test_f_dpo_with_reverse_kl_is_dpo_exactly():
    g = torch.Generator().manual_seed(0)
    lw, ll = torch.randn(64, generator=g, dtype=torch.float64), torch.randn(64, generator=g, dtype=torch.float64)
    got = preference_loss(lw, ll, get_divergence("rkl"), 0.1)
    want = -F.logsigmoid(0.1 * ((lw - 0) - (ll - 0)))  # DPO: -log sigmoid(beta (log t_w - log t_l))
    torch.testing.assert_close(got, want, rtol=0, atol=1e-15)
    # f-DPO in general: -log sigmoid(beta (f'(t_w) - f'(t_l))), with f' from the divergence object
    for name in ("fkl", "js", "alpha:0.3", "hellinger"):
        div = get_divergence(name)
        want = -F.logsigmoid(0.1 * (div.f_prime(lw) - div.f_prime(ll)))
        torch.testing.assert_close(preference_loss(lw, ll, div, 0.1), want, rtol=0, atol=1e-12)


def test_losses_on_known_numbers():
    rkl = get_divergence("rkl")
    lw, ll = torch.tensor([0.4], dtype=torch.float64), torch.tensor([-0.6], dtype=torch.float64)  # delta = 1
    z = 2.0 * 1.0
    sig = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    assert preference_loss(lw, ll, rkl, 2.0, "hinge").item() == pytest.approx(0.0)
    assert preference_loss(lw, ll, rkl, 0.25, "hinge").item() == pytest.approx(0.75)
    assert preference_loss(lw, ll, rkl, 2.0, "sigmoid", 0.1).item() == pytest.approx(
        -0.9 * math.log(sig(z)) - 0.1 * math.log(sig(-z)))
    assert preference_loss(lw, ll, rkl, 2.0, "robust", 0.1).item() == pytest.approx(
        (-0.9 * math.log(sig(z)) + 0.1 * math.log(sig(-z))) / 0.8)
    n_w, n_l = torch.tensor([4]), torch.tensor([2])
    assert preference_loss(lw, ll, rkl, 0.5, "ipo", chosen_lengths=n_w, rejected_lengths=n_l).item() == \
        pytest.approx((0.4 / 4 + 0.6 / 2 - 1.0) ** 2)
    # implicit rewards start at 0 at the reference for every divergence
    for name in ("rkl", "fkl", "js", "alpha:0.5"):
        assert implicit_rewards(torch.zeros(3, dtype=torch.float64), get_divergence(name), 0.1).abs().max() == 0


def test_bad_settings_and_undefined_divergences_are_refused():
    rkl = get_divergence("rkl")
    x = torch.zeros(2, dtype=torch.float64)
    with pytest.raises(PreferenceLossError, match="must be one of"):
        preference_loss(x, x, rkl, 0.1, "kto")
    with pytest.raises(PreferenceLossError, match="in \\[0, 0.5\\)"):
        preference_loss(x, x, rkl, 0.1, "sigmoid", 0.5)
    with pytest.raises(PreferenceLossError,
                       match="used by the sigmoid, robust, exo_pair, aot, aot_unpaired losses only"):
        preference_loss(x, x, rkl, 0.1, "hinge", 0.1)
    with pytest.raises(PreferenceLossError, match="lengths"):
        preference_loss(x, x, rkl, 0.1, "ipo")
    assert "strictly increasing" in f_dpo_problem(get_divergence("tv"))
    for name in ("rkl", "fkl", "js", "alpha:0.3", "alpha:0.5", "chi2", "hellinger"):
        assert f_dpo_problem(get_divergence(name)) is None, name


@pytest.mark.parametrize("loss", ["sigmoid", "ipo", "hinge", "robust"])
def test_the_loss_itself_refuses_total_variation(loss):
    """Issue 34: the module says TV is refused; the tensor function must say so too, not only the config."""
    x = torch.tensor([0.3, -0.2], dtype=torch.float64)
    n = torch.tensor([3, 4])
    with pytest.raises(PreferenceLossError, match="not defined for this divergence.*strictly increasing"):
        preference_loss(x, -x, get_divergence("tv"), 0.1, loss, chosen_lengths=n, rejected_lengths=n)


def test_rdpo_and_dpop_are_their_papers_formulas() -> None:
    """R-DPO (Park et al. 2024, Eq. 9) and DPO-Positive (Pal et al. 2024, Eq. 3) written out for two pairs."""
    rkl = get_divergence("rkl")
    rho_w = torch.tensor([0.4, -0.3], dtype=torch.float64)
    rho_l = torch.tensor([-0.2, -1.0], dtype=torch.float64)
    n_w, n_l = torch.tensor([7, 3]), torch.tensor([4, 5])
    beta, alpha, lam = 0.5, 0.02, 50.0

    def logsig(x: float) -> float:
        return -math.log1p(math.exp(-x))

    rdpo = preference_loss(rho_w, rho_l, rkl, beta, "rdpo", chosen_lengths=n_w, rejected_lengths=n_l,
                           length_alpha=alpha)
    expected = [-logsig(beta * (0.4 + 0.2) - alpha * (7 - 4)), -logsig(beta * (-0.3 + 1.0) - alpha * (3 - 5))]
    assert rdpo.tolist() == pytest.approx(expected, abs=1e-12)
    # alpha = 0 is DPO itself
    torch.testing.assert_close(preference_loss(rho_w, rho_l, rkl, beta, "rdpo", chosen_lengths=n_w,
                                               rejected_lengths=n_l), preference_loss(rho_w, rho_l, rkl, beta))
    dpop = preference_loss(rho_w, rho_l, rkl, beta, "dpop", positive_lambda=lam)
    # pair 1: the chosen response is above the reference (rho_w > 0): no penalty, DPO; pair 2: below, penalised
    expected = [-logsig(beta * (0.4 + 0.2)), -logsig(beta * (-0.3 + 1.0 - lam * 0.3))]
    assert dpop.tolist() == pytest.approx(expected, abs=1e-12)


def test_log_ratio_losses_refuse_another_divergence_and_exo_needs_smoothing() -> None:
    x = torch.tensor([0.3, -0.2], dtype=torch.float64)
    for loss in ("nca_pair", "bco_pair", "sppo_hard", "apo_zero", "apo_down", "rdpo", "dpop"):
        with pytest.raises(PreferenceLossError, match=f"{loss} reads the log-ratios.*no --divergence js form"):
            preference_loss(x, -x, get_divergence("js"), 0.1, loss, chosen_lengths=torch.tensor([2, 3]),
                            rejected_lengths=torch.tensor([2, 3]))
    with pytest.raises(PreferenceLossError, match="exo_pair is the KL to the label.*--label_smoothing in \\(0, 0.5\\)"):
        preference_loss(x, -x, get_divergence("rkl"), 0.1, "exo_pair")
    with pytest.raises(PreferenceLossError, match="'sigmoid_norm' reads the response lengths"):
        preference_loss(x, -x, get_divergence("rkl"), 0.1, "sigmoid_norm")


def test_aot_sorts_the_policys_and_the_references_margins_separately() -> None:
    """AOT (Melnyk et al. 2024) on three pairs whose policy and reference margins rank differently, by hand:
    policy margins (log pi_w - log pi_l) [2, -1, 0.5] sort to [-1, 0.5, 2], the reference's [0, 1, -2] to [-2, 0, 1];
    delta = [1, 0.5, 1]."""
    from objectives.preference import batch_preference_loss

    ref_w = torch.tensor([-3.0, -2.0, -4.0], dtype=torch.float64)
    ref_l = torch.tensor([-3.0, -3.0, -2.0], dtype=torch.float64)   # reference margins [0, 1, -2]
    pol_w = torch.tensor([-1.0, -3.0, -2.5], dtype=torch.float64)
    pol_l = torch.tensor([-3.0, -2.0, -3.0], dtype=torch.float64)   # policy margins [2, -1, 0.5]
    beta = 0.5

    def softplus(x: float) -> float:  # -log sigmoid(-x)
        return math.log1p(math.exp(x))

    got = batch_preference_loss("aot", pol_w - ref_w, pol_l - ref_l, beta, 0.0, ref_w, ref_l)
    assert got.tolist() == pytest.approx([softplus(-beta * d) for d in (1.0, 0.5, 1.0)], abs=1e-12)
    # unpaired: chosen log-ratios [2, -1, 1.5] sort to [-1, 1.5, 2], rejected [0, 1, -1] to [-1, 0, 1]
    got = batch_preference_loss("aot_unpaired", pol_w - ref_w, pol_l - ref_l, beta)
    assert got.tolist() == pytest.approx([softplus(-beta * d) for d in (0.0, 1.5, 1.0)], abs=1e-12)
    with pytest.raises(PreferenceLossError, match="sorts over the batch"):
        preference_loss(pol_w - ref_w, pol_l - ref_l, get_divergence("rkl"), beta, "aot")
