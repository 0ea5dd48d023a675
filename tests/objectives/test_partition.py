"""Importance-sampling estimates of log Z (running, windowed, per prompt) against the exact toy Z."""

from __future__ import annotations

import json
import math

import pytest
import torch
from toy_model import ToyAutoregressive, ToyProblem, make_problem

from objectives import LogZEstimator, ScoreError
from objectives.partition import GLOBAL_KEY


def exact_weight_variance(log_P: torch.Tensor, log_q: torch.Tensor) -> float:
    """Var_q[P/q] over the enumeration."""
    q = log_q.exp()
    w = (log_P - log_q).exp()
    mean = (q * w).sum()
    return float((q * (w - mean) ** 2).sum())


def log_weights(
    problem: ToyProblem, idx: torch.Tensor, proposal: ToyAutoregressive | None = None
) -> torch.Tensor:
    sampler = problem.policy if proposal is None else proposal
    return problem.sampled_log_P(idx) - sampler.log_probs_all().detach()[idx]


@pytest.mark.parametrize("kind", ["rl", "binary"])
def test_running_estimate_converges_to_exact_log_z(kind: str) -> None:
    problem = make_problem(kind)
    log_pi = problem.policy.log_probs_all().detach()
    gen = torch.Generator().manual_seed(0)
    estimator = LogZEstimator("running")
    n_batches, batch = 40, 1000
    for _ in range(n_batches):
        estimator.update(log_weights(problem, problem.policy.sample(batch, gen)))
    n = n_batches * batch
    assert estimator.count() == n
    se = math.sqrt(exact_weight_variance(problem.log_P, log_pi) / n) / math.exp(problem.log_Z)
    assert abs(estimator.log_z() - problem.log_Z) < 4 * se
    assert se < 0.02


def test_running_estimate_with_changing_proposals(rl_problem: ToyProblem) -> None:
    """Each batch may come from another proposal: every term stays an unbiased estimate of Z."""
    gen = torch.Generator().manual_seed(1)
    estimator = LogZEstimator("running")
    proposals = [ToyAutoregressive(seed=s, scale=0.5) for s in (3, 4)] + [rl_problem.policy]
    for proposal in proposals:
        estimator.update(log_weights(rl_problem, proposal.sample(20_000, gen), proposal))
    variance = sum(exact_weight_variance(rl_problem.log_P, p.log_probs_all().detach()) for p in proposals)
    se = math.sqrt(variance) / (3 * 20_000**0.5) / math.exp(rl_problem.log_Z)
    assert abs(estimator.log_z() - rl_problem.log_Z) < 4 * se


@pytest.mark.slow
def test_z_is_unbiased_and_log_z_is_not(rl_problem: ToyProblem) -> None:
    """The mean of exp(log Z_hat) over many small independent estimates is Z within a few standard
    errors, while the mean of log Z_hat sits below log Z (Jensen)."""
    gen = torch.Generator().manual_seed(2)
    repeats, batch = 4000, 4
    z_hats, log_z_hats = [], []
    for _ in range(repeats):
        estimator = LogZEstimator("running")
        estimator.update(log_weights(rl_problem, rl_problem.policy.sample(batch, gen)))
        log_z_hats.append(estimator.log_z())
        z_hats.append(math.exp(estimator.log_z()))
    z = math.exp(rl_problem.log_Z)
    se = math.sqrt(
        exact_weight_variance(rl_problem.log_P, rl_problem.policy.log_probs_all().detach())
        / (batch * repeats)
    )
    assert abs(sum(z_hats) / repeats - z) < 4 * se
    mean_log = sum(log_z_hats) / repeats
    se_log = torch.tensor(log_z_hats).std().item() / math.sqrt(repeats)
    assert mean_log < rl_problem.log_Z - 4 * se_log


def test_windowed_estimate_tracks_the_last_samples(rl_problem: ToyProblem) -> None:
    gen = torch.Generator().manual_seed(3)
    window = 5000
    estimator = LogZEstimator("window", window=window)
    # first a bad proposal, then on-policy samples: the window forgets the first
    bad = ToyAutoregressive(seed=9, scale=3.0)
    estimator.update(log_weights(rl_problem, bad.sample(3000, gen), bad))
    recent = torch.cat(
        [log_weights(rl_problem, rl_problem.policy.sample(1000, gen)) for _ in range(window // 1000)]
    )
    estimator.update(recent)
    assert estimator.count() == window
    direct = float(torch.logsumexp(recent, 0)) - math.log(window)
    assert estimator.log_z() == pytest.approx(direct, abs=1e-12)
    se = math.sqrt(
        exact_weight_variance(rl_problem.log_P, rl_problem.policy.log_probs_all().detach()) / window
    )
    assert abs(estimator.log_z() - rl_problem.log_Z) < 4 * se / math.exp(rl_problem.log_Z)


@pytest.mark.slow
def test_per_key_estimates_for_conditional_targets() -> None:
    """Two prompts with different targets (and different Z), their samples interleaved in batches."""
    prompts = {"rl": make_problem("rl"), "binary": make_problem("binary")}
    assert abs(prompts["rl"].log_Z - prompts["binary"].log_Z) > 0.5
    gen = torch.Generator().manual_seed(4)
    estimator = LogZEstimator("running")
    for _ in range(20):
        parts = {k: log_weights(p, p.policy.sample(1000, gen)) for k, p in prompts.items()}
        order = torch.randperm(2000, generator=gen)
        lw = torch.cat([parts["rl"], parts["binary"]])[order]
        keys = ["rl"] * 1000 + ["binary"] * 1000
        estimator.update(lw, [keys[i] for i in order])
    assert set(estimator.keys) == set(prompts)
    for key, problem in prompts.items():
        assert estimator.count(key) == 20_000
        se = math.sqrt(exact_weight_variance(problem.log_P, problem.policy.log_probs_all().detach()) / 20_000)
        assert abs(estimator.log_z(key) - problem.log_Z) < 4 * se / math.exp(problem.log_Z)
    per_sample = estimator.log_z_many(["binary", "rl", "binary"])
    expected = [estimator.log_z("binary"), estimator.log_z("rl"), estimator.log_z("binary")]
    assert per_sample.dtype == torch.float64 and per_sample.tolist() == expected
    summary = estimator.summary()
    assert summary["log_z_keys"] == 2
    assert summary["log_z"] == pytest.approx((estimator.log_z("rl") + estimator.log_z("binary")) / 2)
    with pytest.raises(KeyError, match="no samples seen yet for key 'other'"):
        estimator.log_z("other")


@pytest.mark.parametrize("mode", ["running", "window"])
def test_ess_is_the_squared_sum_over_the_sum_of_squares(mode: str) -> None:
    gen = torch.Generator().manual_seed(5)
    batches = [torch.randn(50, generator=gen, dtype=torch.float64) * 2 for _ in range(3)]
    estimator = LogZEstimator(mode, window=120)
    for lw in batches:
        estimator.update(lw)
    seen = torch.cat(batches)[-120:] if mode == "window" else torch.cat(batches)
    w = seen.exp()
    assert estimator.ess() == pytest.approx(float(w.sum() ** 2 / (w**2).sum()), rel=1e-12)
    assert estimator.log_z() == pytest.approx(math.log(float(w.mean())), rel=1e-12)
    assert 1.0 <= estimator.ess() <= seen.numel()


def test_zero_weights() -> None:
    estimator = LogZEstimator()
    estimator.update(torch.tensor([-math.inf, 0.0, math.log(2.0)], dtype=torch.float64))
    assert estimator.log_z() == pytest.approx(math.log(3.0 / 3))
    assert estimator.ess() == pytest.approx(9.0 / 5.0)
    estimator.update([-math.inf] * 3, keys=["dead"] * 3)
    assert estimator.log_z("dead") == -math.inf and estimator.ess("dead") == 0.0
    assert estimator.count("dead") == 3
    assert estimator.log_z_many(None, n=2).tolist() == [estimator.log_z()] * 2
    summary = estimator.summary()  # the dead key does not poison the mean log Z
    assert summary["log_z"] == pytest.approx(0.0) and summary["log_z_keys"] == 2
    window = LogZEstimator("window", window=4)
    window.update([-math.inf, -math.inf])
    assert window.log_z() == -math.inf and window.ess() == 0.0


def test_huge_log_weights_do_not_overflow() -> None:
    for offset in (1e3, -1e3):
        for mode in ("running", "window"):
            estimator = LogZEstimator(mode)
            lw = torch.tensor([0.0, 0.5, -1.0], dtype=torch.float64)
            estimator.update(lw[:2] + offset)
            estimator.update(lw[2:] + offset)
            expected = offset + math.log(float(lw.exp().mean()))
            assert estimator.log_z() == pytest.approx(expected, rel=1e-14)
            w = lw.exp()
            assert estimator.ess() == pytest.approx(float(w.sum() ** 2 / (w**2).sum()), rel=1e-10)
    float32 = LogZEstimator()
    float32.update(torch.tensor([1e3, 1e3], dtype=torch.float32))
    assert float32.log_z() == pytest.approx(1e3)


@pytest.mark.parametrize("mode", ["running", "window"])
def test_state_dict_round_trip(mode: str) -> None:
    estimator = LogZEstimator(mode, window=10)
    estimator.update(torch.tensor([0.1, -0.3, 2.0, -math.inf]), keys=[("p", 1), ("p", 2), ("p", 1), ("p", 2)])
    estimator.update(torch.tensor([0.7]), keys=[("p", 2)])
    state = json.loads(json.dumps(estimator.state_dict()))  # checkpoints may go through JSON
    restored = LogZEstimator(mode, window=10)
    restored.load_state_dict(state)
    assert restored.keys == estimator.keys
    for key in estimator.keys:
        assert restored.log_z(key) == estimator.log_z(key)
        assert restored.ess(key) == estimator.ess(key)
        assert restored.count(key) == estimator.count(key)
    restored.update(torch.tensor([0.0]), keys=[("p", 1)])  # and keeps working
    assert restored.count(("p", 1)) == 3
    with pytest.raises(ValueError, match="mode"):
        LogZEstimator("window" if mode == "running" else "running", window=10).load_state_dict(state)


def test_input_errors() -> None:
    estimator = LogZEstimator()
    with pytest.raises(ScoreError, match="log_weights contains NaN"):
        estimator.update(torch.tensor([0.0, math.nan]))
    with pytest.raises(ValueError, match=r"\+inf"):
        estimator.update(torch.tensor([math.inf]))
    with pytest.raises(ValueError, match="2 log weights but 1 keys"):
        estimator.update(torch.zeros(2), keys=["a"])
    with pytest.raises(ValueError, match="mode"):
        LogZEstimator("median")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="window"):
        LogZEstimator("window", window=0)
    with pytest.raises(KeyError):
        estimator.log_z(GLOBAL_KEY)
    with pytest.raises(ValueError, match="pass keys, or n"):
        estimator.log_z_many(None)
    assert estimator.summary()["log_z_keys"] == 0
