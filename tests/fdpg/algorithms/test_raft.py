"""RAFT on the engine: each step's applied gradient is that of -mean log pi over each prompt's best sample (the
objectives test proves that this is, in expectation, the forward-KL step toward best-of-k of the current policy)."""

from __future__ import annotations

import pytest
import torch
from fdpg_testing import vowel_fraction

from fdpg.config import TrainConfig
from fdpg.log_probs import completion_token_log_probs


@pytest.mark.parametrize("quantile", [None, 0.5])
def test_the_applied_gradient_is_the_likelihood_of_the_kept_samples(make_trainer, monkeypatch, quantile) -> None:
    r"""Batch 8 = 2 prompts x 4 samples, micro-batches of 3: the accumulated gradient equals autograd of
    :math:`-\frac1{|K|}\sum_{j\in K}\log\pi_\theta(y_j\mid c_j)`, K each prompt's best sample by the reward (or every
    sample at or above the batch's median), recomputed here from the texts."""
    trainer = make_trainer(algo="raft", steps=1, micro_batch_size=3, raft_quantile=quantile)
    rollouts, captured = [], {}
    real_rollout = trainer.rollout

    def recording_rollout(step):
        out = real_rollout(step)
        rollouts.append(out[0])
        return out

    def capture():
        captured.update({k: p.grad.detach().clone() for k, p in trainer._trainable().items()})
        trainer.optimizer.zero_grad(set_to_none=True)

    monkeypatch.setattr(trainer, "rollout", recording_rollout)
    monkeypatch.setattr(trainer, "optimizer_step", capture)
    metrics = trainer.train_step(0)
    batch = rollouts[0]
    rewards = torch.tensor([vowel_fraction(t) for t in batch.texts], dtype=torch.float64)
    if quantile is None:
        keep = torch.zeros(len(batch), dtype=torch.bool)
        for lo in range(0, len(batch), 4):
            keep[lo + int(rewards[lo:lo + 4].argmax())] = True
    else:
        keep = rewards >= rewards.quantile(0.5)
    assert metrics["raft/kept_fraction"] == pytest.approx(float(keep.double().mean()))
    assert metrics["raft/kept_reward"] == pytest.approx(float(rewards[keep].mean()))
    assert float(rewards[keep].mean()) > float(rewards.mean())  # the kept samples are the better ones
    params = trainer._trainable()
    log_pi = completion_token_log_probs(trainer.model, batch.rows(keep.nonzero().view(-1))).sum(-1)
    expected = torch.autograd.grad(-log_pi.mean(), list(params.values()))
    for (name, got), want in zip(captured.items(), expected):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7, msg=name)
    assert max(float(g.abs().max()) for g in expected) > 1e-6


def test_raft_settings_are_checked(make_trainer) -> None:
    with pytest.raises(ValueError, match="--raft_quantile must be in"):
        TrainConfig(algo="raft", raft_quantile=1.5)
    with pytest.raises(ValueError, match="at least 2"):
        make_trainer(algo="raft", samples_per_prompt=1, batch_size=8)
    with pytest.raises(ValueError, match="samples from pi itself"):
        TrainConfig(algo="raft", temperature=0.7)
