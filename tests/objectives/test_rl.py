"""The PPO mathematics of ``objectives.rl`` on hand-computed numbers (pure torch, float64 where exactness matters)."""

from __future__ import annotations

import math

import pytest
import torch

from objectives.rl import (
    AdaptiveKLController,
    FixedKLController,
    RunningMoments,
    aggregate,
    clipped_policy_loss,
    clipped_value_loss,
    explained_variance,
    generalized_advantages,
    kl_per_token,
    last_token_index,
    masked_mean,
    masked_var,
    masked_whiten,
    place_on_last_token,
)

F64 = torch.float64


def _t(rows) -> torch.Tensor:
    return torch.tensor(rows, dtype=F64)


# ---------------------------------------------------------------------------------------------------------------
# 1. GAE


def _gae_example(masked_reward: float = 7.0, masked_value: float = 5.0):
    """Two rows of lengths 3 and 2 in a width of 4; the masked entries hold arbitrary numbers."""
    m_r, m_v = masked_reward, masked_value
    rewards = _t([[0.5, -1.0, 2.0, m_r], [1.0, 0.25, m_r, m_r]])
    values = _t([[0.3, 0.6, -0.4, m_v], [-0.2, 0.1, m_v, m_v]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    return rewards, values, mask


def test_gae_matches_hand_computation() -> None:
    """GAE(0.9, 0.8) on two rows of different lengths equals the advantages and returns worked out by hand."""
    gamma, lam = 0.9, 0.8
    rewards, values, mask = _gae_example()
    advantages, returns = generalized_advantages(rewards, values, mask, gamma=gamma, lam=lam)

    # row 0 (length 3): delta_t = r_t + gamma V_{t+1} - V_t, with V after the last real token = 0
    d02 = 2.0 + gamma * 0.0 - (-0.4)  # = 2.4
    d01 = -1.0 + gamma * (-0.4) - 0.6  # = -1.96
    d00 = 0.5 + gamma * 0.6 - 0.3  # = 0.74
    a02 = d02  # = 2.4
    a01 = d01 + gamma * lam * a02  # = -1.96 + 0.72 * 2.4 = -0.232
    a00 = d00 + gamma * lam * a01  # = 0.74 + 0.72 * -0.232 = 0.57296
    # row 1 (length 2)
    d11 = 0.25 + gamma * 0.0 - 0.1  # = 0.15
    d10 = 1.0 + gamma * 0.1 - (-0.2)  # = 1.29
    a11 = d11  # = 0.15
    a10 = d10 + gamma * lam * a11  # = 1.29 + 0.72 * 0.15 = 1.398

    expected_adv = _t([[a00, a01, a02, 0.0], [a10, a11, 0.0, 0.0]])
    expected_ret = _t([[a00 + 0.3, a01 + 0.6, a02 - 0.4, 0.0], [a10 - 0.2, a11 + 0.1, 0.0, 0.0]])
    # the literal numbers, so that the arithmetic above is itself checked
    torch.testing.assert_close(expected_adv, _t([[0.57296, -0.232, 2.4, 0.0], [1.398, 0.15, 0.0, 0.0]]),
                               rtol=0, atol=1e-12)
    torch.testing.assert_close(advantages, expected_adv, rtol=0, atol=1e-12)
    torch.testing.assert_close(returns, expected_ret, rtol=0, atol=1e-12)
    # masked positions are exactly zero
    assert (advantages[mask == 0] == 0).all() and (returns[mask == 0] == 0).all()


def test_gae_masked_positions_do_not_leak() -> None:
    """Huge rewards and values at masked positions change neither the real tokens' results nor the zeros."""
    rewards, values, mask = _gae_example()
    adv, ret = generalized_advantages(rewards, values, mask, gamma=0.9, lam=0.8)
    rewards_h, values_h, _ = _gae_example(masked_reward=1e30, masked_value=-1e30)
    adv_h, ret_h = generalized_advantages(rewards_h, values_h, mask, gamma=0.9, lam=0.8)
    torch.testing.assert_close(adv_h, adv, rtol=0, atol=0)
    torch.testing.assert_close(ret_h, ret, rtol=0, atol=0)


def test_gae_with_unit_gamma_lambda_and_zero_values_is_reward_to_go() -> None:
    """gamma = lambda = 1 with V = 0 gives the reverse cumulative sum of the rewards (advantages = returns)."""
    gen = torch.Generator().manual_seed(0)
    rewards = torch.randn(3, 5, generator=gen, dtype=F64)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0], [1, 1, 1, 0, 0]])
    adv, ret = generalized_advantages(rewards, torch.zeros_like(rewards), mask, gamma=1.0, lam=1.0)
    real = rewards * mask
    expected = real.flip(-1).cumsum(-1).flip(-1) * mask
    torch.testing.assert_close(adv, expected, rtol=0, atol=1e-12)
    torch.testing.assert_close(ret, expected, rtol=0, atol=1e-12)
    # e.g. row 1: A_0 = r_0 + r_1, A_1 = r_1
    assert adv[1, 0].item() == pytest.approx(rewards[1, 0].item() + rewards[1, 1].item(), abs=1e-12)


# ---------------------------------------------------------------------------------------------------------------
# 2. Whitening


def _whiten_example():
    x = _t([[1.0, 2.0, 4.0, 1e6], [-3.0, 0.5, 1e6, -1e6]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    return x, mask


@pytest.mark.parametrize("junk", [float("nan"), float("inf"), -float("inf")])
def test_gae_padding_may_hold_anything(junk: float) -> None:
    """Issue 34's case: rewards [[1, 2, junk]] and values [[0, 0, junk]] with mask [[1, 1, 0]], gamma = lambda = 1:
    A = reward-to-go over the real tokens, [3, 2, 0] (written out by hand), returns the same (V = 0)."""
    rewards = torch.tensor([[1.0, 2.0, junk], [0.5, junk, junk]])
    values = torch.tensor([[0.0, 0.0, junk], [0.25, -junk, junk]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    advantages, returns = generalized_advantages(rewards, values, mask, gamma=1.0, lam=1.0)
    # row 2: delta_0 = 0.5 + 0 - 0.25 (the value after the last real token is 0)
    assert torch.equal(advantages, torch.tensor([[3.0, 2.0, 0.0], [0.25, 0.0, 0.0]]))
    assert torch.equal(returns, torch.tensor([[3.0, 2.0, 0.0], [0.5, 0.0, 0.0]]))
    assert masked_mean(rewards, mask).item() == pytest.approx((1 + 2 + 0.5) / 3)
    assert masked_var(rewards, mask).item() == pytest.approx(torch.tensor([1.0, 2.0, 0.5]).var().item())
    assert torch.isfinite(masked_whiten(rewards, mask)).all()


def test_masked_mean_and_unbiased_var_ignore_masked_values() -> None:
    """masked_mean / masked_var are the mean and the unbiased (n - 1) variance of the real tokens only."""
    x, mask = _whiten_example()
    real = _t([1.0, 2.0, 4.0, -3.0, 0.5])
    assert masked_mean(x, mask).item() == pytest.approx(real.mean().item(), abs=1e-12)
    assert masked_var(x, mask).item() == pytest.approx(real.var(unbiased=True).item(), abs=1e-12)


def test_masked_whiten_gives_zero_mean_unit_variance_over_real_tokens() -> None:
    """masked_whiten: mean 0 and unbiased variance 1 over the real tokens, exact zeros where masked."""
    x, mask = _whiten_example()
    out = masked_whiten(x, mask)
    real = out[mask.bool()]
    assert real.mean().item() == pytest.approx(0.0, abs=1e-12)
    assert real.var(unbiased=True).item() == pytest.approx(1.0, abs=1e-6)
    assert (out[mask == 0] == 0).all()
    # the real tokens are (x - mean) / std of the real entries
    ref = _t([1.0, 2.0, 4.0, -3.0, 0.5])
    torch.testing.assert_close(real, (ref - ref.mean()) / ref.std(), rtol=0, atol=1e-6)
    # changing masked values changes nothing
    x2 = x.clone()
    x2[mask == 0] = -123.0
    torch.testing.assert_close(masked_whiten(x2, mask), out, rtol=0, atol=0)


def test_masked_whiten_without_mean_shift_keeps_the_mean() -> None:
    """shift_mean=False rescales to unit variance but keeps the real tokens' mean."""
    x, mask = _whiten_example()
    out = masked_whiten(x, mask, shift_mean=False)
    real = out[mask.bool()]
    ref = _t([1.0, 2.0, 4.0, -3.0, 0.5])
    assert real.mean().item() == pytest.approx(ref.mean().item(), abs=1e-12)
    assert real.var(unbiased=True).item() == pytest.approx(1.0, abs=1e-6)
    assert (out[mask == 0] == 0).all()


def test_masked_whiten_uses_given_moments() -> None:
    """moments=(mean, var) replace the tensor's own moments: out = (x - mean) / sqrt(var)."""
    x, mask = _whiten_example()
    out = masked_whiten(x, mask, moments=(2.0, 4.0), eps=0.0)
    expected = torch.where(mask.bool(), (x - 2.0) / 2.0, torch.zeros_like(x))
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-12)
    out_keep = masked_whiten(x, mask, shift_mean=False, moments=(2.0, 4.0), eps=0.0)
    torch.testing.assert_close(out_keep, torch.where(mask.bool(), (x - 2.0) / 2.0 + 2.0, torch.zeros_like(x)),
                               rtol=0, atol=1e-12)


# ---------------------------------------------------------------------------------------------------------------
# 3. Value clipping


def test_clipped_value_loss_on_known_numbers() -> None:
    """0.5 max((V - G)^2, (clip(V, V_old +- eps) - G)^2), with the 'clipped term wins' flag, on four cases."""
    # V_old = 1 and eps = 0.2 throughout, so clip(V) lies in [0.8, 1.2]
    values = _t([2.0, 2.0, 0.5, 1.1])
    old = _t([1.0, 1.0, 1.0, 1.0])
    returns = _t([1.1, 3.0, 0.0, 0.4])
    loss, wins = clipped_value_loss(values, old, returns, clip_range=0.2)
    expected = _t([
        0.5 * max((2.0 - 1.1) ** 2, (1.2 - 1.1) ** 2),  # 0.5 * 0.81: the unclipped term wins
        0.5 * max((2.0 - 3.0) ** 2, (1.2 - 3.0) ** 2),  # 0.5 * 3.24: the clipped term wins
        0.5 * max((0.5 - 0.0) ** 2, (0.8 - 0.0) ** 2),  # 0.5 * 0.64: the clipped term wins (clip from below)
        0.5 * (1.1 - 0.4) ** 2,  # inside the range: both terms are equal
    ])
    torch.testing.assert_close(loss, expected, rtol=0, atol=1e-12)
    torch.testing.assert_close(loss, _t([0.405, 1.62, 0.32, 0.245]), rtol=0, atol=1e-12)
    assert wins.tolist() == [False, True, True, False]


def test_value_loss_without_clipping_is_half_squared_error() -> None:
    """clip_range=None gives 0.5 (V - G)^2 and never flags clipping."""
    values, old, returns = _t([2.0, 2.0, 0.5]), _t([1.0, 1.0, 1.0]), _t([1.1, 3.0, 0.0])
    loss, wins = clipped_value_loss(values, old, returns, clip_range=None)
    torch.testing.assert_close(loss, 0.5 * (values - returns) ** 2, rtol=0, atol=1e-12)
    assert not wins.any()


# ---------------------------------------------------------------------------------------------------------------
# 4. The clipped policy objective


def test_clipped_policy_loss_gradient_vanishes_where_the_clip_binds() -> None:
    """Zero gradient where the clip binds, -A * ratio inside (or where the unclipped term wins); binds is exact."""
    eps = 0.2
    ratios = _t([1.5, 0.5, 1.1, 0.9, 1.5, 0.5])
    adv = _t([2.0, -1.0, 2.0, -1.0, -1.0, 2.0])
    log_pi = ratios.log().requires_grad_(True)
    log_old = torch.zeros_like(ratios)
    loss, binds = clipped_policy_loss(log_pi, log_old, adv, clip_range=eps)
    expected_loss = _t([
        -2.0 * 1.2,  # ratio > 1 + eps, A > 0: clipped
        1.0 * 0.8,  # ratio < 1 - eps, A < 0: clipped
        -2.0 * 1.1,  # inside
        1.0 * 0.9,  # inside
        1.0 * 1.5,  # ratio > 1 + eps but A < 0: the unclipped (larger) loss
        -2.0 * 0.5,  # ratio < 1 - eps but A > 0: the unclipped (larger) loss
    ])
    torch.testing.assert_close(loss.detach(), expected_loss, rtol=0, atol=1e-12)
    assert binds.tolist() == [True, True, False, False, False, False]
    (grad,) = torch.autograd.grad(loss.sum(), log_pi)
    expected_grad = torch.where(binds, torch.zeros_like(adv), -adv * ratios)
    torch.testing.assert_close(grad, expected_grad, rtol=0, atol=1e-12)
    assert grad[0] == 0 and grad[1] == 0
    assert grad[2].item() == pytest.approx(-2.2, abs=1e-12) and grad[3].item() == pytest.approx(0.9, abs=1e-12)


def test_dual_clip_caps_the_loss_of_negative_advantages() -> None:
    """dual_clip=c caps the loss at -c A for A < 0 (zero gradient there), leaves the rest; c <= 1 raises."""
    c = 3.0
    ratios = _t([10.0, 2.0, 10.0, 1.1])
    adv = _t([-1.0, -1.0, 2.0, -1.0])
    log_pi = ratios.log().requires_grad_(True)
    loss, binds = clipped_policy_loss(log_pi, torch.zeros_like(ratios), adv, clip_range=0.2, dual_clip=c)
    expected_loss = _t([
        -c * -1.0,  # capped: min(10, 3) = 3
        1.0 * 2.0,  # below the cap: the ordinary loss
        -2.0 * 1.2,  # positive advantage: the ordinary clip, untouched by the dual clip
        1.0 * 1.1,  # inside the range
    ])
    torch.testing.assert_close(loss.detach(), expected_loss, rtol=0, atol=1e-12)
    assert binds.tolist() == [True, False, True, False]
    (grad,) = torch.autograd.grad(loss.sum(), log_pi)
    torch.testing.assert_close(grad, _t([0.0, 2.0, 0.0, 1.1]), rtol=0, atol=1e-12)
    # without the dual clip the first loss is the unbounded ratio * |A| = 10
    plain, _ = clipped_policy_loss(ratios.log(), torch.zeros_like(ratios), adv, clip_range=0.2)
    assert plain[0].item() == pytest.approx(10.0, abs=1e-12)
    for bad in (1.0, 0.5):
        with pytest.raises(ValueError):
            clipped_policy_loss(ratios.log(), torch.zeros_like(ratios), adv, dual_clip=bad)


# ---------------------------------------------------------------------------------------------------------------
# 5. KL controllers


def test_adaptive_kl_controller_follows_ziegler_update() -> None:
    """beta *= 1 + clip(KL/target - 1, -0.2, 0.2) n / horizon: up above target, down below, clipped at +-0.2."""
    target, horizon, n = 6.0, 10_000, 256
    cases = [  # (KL, expected proportional error after the clip)
        (6.6, 0.1),  # above target: beta rises
        (5.4, -0.1),  # below target: beta falls
        (12.0, 0.2),  # 1.0 clipped to 0.2
        (3.0, -0.2),  # -0.5 clipped to -0.2
        (0.0, -0.2),
        (6.0, 0.0),  # on target: unchanged
    ]
    for kl, error in cases:
        ctl = AdaptiveKLController(0.1, target=target, horizon=horizon)
        ctl.update(kl, n)
        assert ctl.value == pytest.approx(0.1 * (1.0 + error * n / horizon), rel=1e-12, abs=0)
    # the direction, explicitly
    up, down = AdaptiveKLController(0.1, target, horizon), AdaptiveKLController(0.1, target, horizon)
    up.update(9.0, n)
    down.update(4.0, n)
    assert up.value > 0.1 > down.value
    # successive updates compound multiplicatively
    ctl = AdaptiveKLController(0.5, target=2.0, horizon=100)
    ctl.update(2.2, 10)  # e = 0.1 -> beta = 0.5 * 1.01
    ctl.update(1.0, 50)  # e = -0.5 -> -0.2 -> beta *= 0.9
    assert ctl.value == pytest.approx(0.5 * 1.01 * 0.9, rel=1e-12, abs=0)


def test_fixed_kl_controller_never_changes() -> None:
    """FixedKLController keeps its beta whatever KL it is told."""
    ctl = FixedKLController(0.05)
    for kl in (0.0, 1.0, 100.0, -3.0):
        ctl.update(kl, 512)
    assert ctl.value == 0.05


def test_kl_controllers_round_trip_state_and_validate() -> None:
    """state_dict/load_state_dict restore beta (and later updates agree); invalid target/horizon raise."""
    ctl = AdaptiveKLController(0.2, target=1.0, horizon=50)
    ctl.update(1.1, 10)
    restored = AdaptiveKLController(7.0, target=1.0, horizon=50)
    restored.load_state_dict(ctl.state_dict())
    assert restored.value == ctl.value
    ctl.update(0.5, 5)
    restored.update(0.5, 5)
    assert restored.value == ctl.value
    fixed, other = FixedKLController(0.3), FixedKLController(1.0)
    other.load_state_dict(fixed.state_dict())
    assert other.value == 0.3
    for target, horizon in ((0.0, 10), (-1.0, 10), (math.nan, 10), (1.0, 0), (1.0, -5)):
        with pytest.raises(ValueError):
            AdaptiveKLController(0.1, target=target, horizon=horizon)


# ---------------------------------------------------------------------------------------------------------------
# 6. KL estimators


def test_kl_estimators_on_known_numbers() -> None:
    """k1 = d, k2 = d^2 / 2, k3 = exp(-d) - 1 + d for d = log pi - log ref; unknown names raise."""
    d = [-1.5, -0.1, 0.0, 0.3, 2.0]
    log_ref = _t([-0.7, -2.0, -1.0, -3.5, -0.2])
    log_pi = log_ref + _t(d)
    torch.testing.assert_close(kl_per_token(log_pi, log_ref, "k1"), _t(d), rtol=0, atol=1e-12)
    torch.testing.assert_close(kl_per_token(log_pi, log_ref, "k2"), _t([x * x / 2 for x in d]), rtol=0, atol=1e-12)
    torch.testing.assert_close(kl_per_token(log_pi, log_ref, "k3"), _t([math.exp(-x) - 1 + x for x in d]),
                               rtol=0, atol=1e-12)
    assert kl_per_token(log_pi, log_ref).tolist() == kl_per_token(log_pi, log_ref, "k1").tolist()  # default k1
    with pytest.raises(ValueError):
        kl_per_token(log_pi, log_ref, "k4")


def test_k3_is_never_negative() -> None:
    """k3 >= 0 for every log-ratio, large or small, of either sign."""
    d = torch.linspace(-20.0, 20.0, 4001, dtype=F64)
    assert (kl_per_token(d, torch.zeros_like(d), "k3") >= 0).all()


def test_k1_and_k3_are_unbiased_exactly() -> None:
    """Exact expectations under pi of k1 and k3 (summing over 4 outcomes) equal KL(pi || a); k2's does not."""
    pi = _t([0.1, 0.2, 0.3, 0.4])
    a = _t([0.45, 0.3, 0.15, 0.1])
    exact_kl = float((pi * (pi.log() - a.log())).sum())
    for kind in ("k1", "k3"):
        expectation = float((pi * kl_per_token(pi.log(), a.log(), kind)).sum())
        assert expectation == pytest.approx(exact_kl, abs=1e-12)
    k2 = float((pi * kl_per_token(pi.log(), a.log(), "k2")).sum())
    assert abs(k2 - exact_kl) > 1e-3  # k2 is biased: the check above can tell


# ---------------------------------------------------------------------------------------------------------------
# 7. Reward placement


def test_reward_lands_on_the_last_real_token() -> None:
    """place_on_last_token puts each score at length - 1 (full row too), zeros elsewhere, all zeros if empty."""
    lengths = [3, 5, 0, 1]
    mask = torch.tensor([[1] * n + [0] * (5 - n) for n in lengths])
    scores = _t([1.5, -2.0, 7.0, 0.25])
    assert last_token_index(mask).tolist() == [2, 4, 0, 0]
    out = place_on_last_token(scores, mask)
    expected = torch.zeros(4, 5, dtype=F64)
    expected[0, 2], expected[1, 4], expected[3, 0] = 1.5, -2.0, 0.25  # row 2 is empty: all zeros
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    assert out.dtype == F64
    # a boolean mask works the same
    torch.testing.assert_close(place_on_last_token(scores, mask.bool()), expected, rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------------------------
# 8. Aggregation


def test_aggregate_modes_and_overrides() -> None:
    """token_mean = sum / N_tokens, seq_mean_token_sum = sum / B, seq_mean_token_mean = mean of row means."""
    per_token = _t([[1.0, 2.0, 3.0, 100.0], [4.0, 5.0, 100.0, 100.0]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    # real tokens: row 0 = 1 + 2 + 3 = 6 (3 tokens), row 1 = 4 + 5 = 9 (2 tokens); total 15 over 5 tokens
    assert aggregate(per_token, mask, "token_mean").item() == pytest.approx(15 / 5, abs=1e-12)
    assert aggregate(per_token, mask, "seq_mean_token_sum").item() == pytest.approx(15 / 2, abs=1e-12)
    assert aggregate(per_token, mask, "seq_mean_token_mean").item() == pytest.approx((6 / 3 + 9 / 2) / 2, abs=1e-12)
    assert aggregate(per_token, mask).item() == pytest.approx(3.0, abs=1e-12)  # default token_mean
    # overrides (the whole minibatch's counts when this is one micro-batch)
    assert aggregate(per_token, mask, "token_mean", n_tokens=10).item() == pytest.approx(15 / 10, abs=1e-12)
    assert aggregate(per_token, mask, "seq_mean_token_sum", n_sequences=4).item() == pytest.approx(15 / 4, abs=1e-12)
    assert aggregate(per_token, mask, "seq_mean_token_mean", n_sequences=4).item() == pytest.approx(
        (6 / 3 + 9 / 2) / 4, abs=1e-12)
    with pytest.raises(ValueError):
        aggregate(per_token, mask, "sum")


# ---------------------------------------------------------------------------------------------------------------
# 9. RunningMoments


def test_running_moments_match_concatenated_data_and_round_trip() -> None:
    """After several batches, mean and (population) std equal those of all the data at once; state round-trips."""
    gen = torch.Generator().manual_seed(1)
    batches = [torch.randn(n, generator=gen, dtype=F64) * s + m for n, s, m in ((3, 1.0, 0.0), (7, 2.0, 5.0),
                                                                                 (1, 1.0, -3.0), (5, 0.5, 1.0))]
    batches.append(torch.randn(2, 3, generator=gen, dtype=F64))  # any shape is flattened
    moments = RunningMoments()
    for i, batch in enumerate(batches):
        moments.update(batch)
        if i == 1:
            moments.update(torch.empty(0, dtype=F64))  # an empty batch changes nothing
    data = torch.cat([b.reshape(-1) for b in batches])
    assert moments.count == data.numel() == 22
    assert moments.mean == pytest.approx(float(data.mean()), abs=1e-12)
    assert moments.std == pytest.approx(float(data.std(unbiased=False)), abs=1e-12)
    restored = RunningMoments()
    restored.load_state_dict(moments.state_dict())
    assert (restored.mean, restored.var, restored.count) == (moments.mean, moments.var, moments.count)
    extra = torch.randn(4, generator=gen, dtype=F64)
    moments.update(extra)
    restored.update(extra)
    assert (restored.mean, restored.var, restored.count) == (moments.mean, moments.var, moments.count)


# ---------------------------------------------------------------------------------------------------------------
# 10. Explained variance


def test_explained_variance_extremes() -> None:
    """1 for a perfect prediction, 0 for predicting the mean, nan for a constant target (masked entries ignored)."""
    target = _t([[1.0, 3.0, -2.0, 50.0], [4.0, 0.5, -50.0, 9.0]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    garbage = torch.where(mask.bool(), target, _t([[0.0, 0.0, 0.0, -1e3], [0.0, 0.0, 1e3, 7.0]]))
    assert explained_variance(garbage, target, mask) == pytest.approx(1.0, abs=1e-12)
    mean = masked_mean(target, mask)
    assert explained_variance(torch.full_like(target, float(mean)), target, mask) == pytest.approx(0.0, abs=1e-12)
    # halfway: predicting 0.5 * (G - mean) + mean leaves a quarter of the variance
    half = 0.5 * (target - mean) + mean
    assert explained_variance(half, target, mask) == pytest.approx(0.75, abs=1e-12)
    constant = torch.where(mask.bool(), torch.full_like(target, 2.0), target)
    assert math.isnan(explained_variance(torch.zeros_like(target), constant, mask))
