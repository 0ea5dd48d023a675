"""Sampling from a proposal q != pi: DPG's frozen proposal, and temperature; importance weights pi/q."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from fdpg_testing import assert_same_metrics, build_trainer, read_jsonl, trainable_state

from fdpg.log_probs import completion_token_log_probs


@pytest.mark.slow
def test_samples_come_from_the_frozen_proposal_and_are_reweighted(make_trainer) -> None:
    trainer = make_trainer(off_policy=True, learning_rate=3e-2, divergence="fkl")
    initial = copy.deepcopy(trainer._unwrapped())
    first = trainer.train_step(0)
    assert first["is_ess"] == pytest.approx(8.0)  # step 1: pi = q, all weights 1
    after_one = trainable_state(trainer)
    assert not first["proposal_refreshed"]  # pi = q at step 1: pi is not strictly closer to p
    # The proposal still holds the initial weights, the policy has moved.
    initial_weights = dict(initial.named_parameters())
    assert all(torch.equal(v.cpu(), initial_weights[k].detach()) for k, v in trainer.proposal.items())
    assert any(not torch.equal(trainer.proposal[k].cpu(), v) for k, v in after_one.items())
    # Step 2's samples are drawn from q (the initial weights) and their log q is q's log-probability.
    batch = trainer.sample(1)
    with torch.no_grad():
        log_q = completion_token_log_probs(initial, batch).sum(-1)
    torch.testing.assert_close(batch.log_q, log_q, atol=1e-4, rtol=0)
    # ... and the trainer's weights are back to pi after sampling.
    assert all(torch.equal(v, after_one[k]) for k, v in trainable_state(trainer).items())
    second = trainer.train_step(1)
    assert second["is_ess"] < 8.0  # pi != q: non-uniform importance weights


@pytest.mark.slow
def test_proposal_is_refreshed_when_pi_is_closer_to_the_target(make_trainer) -> None:
    trainer = make_trainer(off_policy=True, learning_rate=1e-2, divergence="fkl", steps=6)
    initial = {k: v.clone() for k, v in trainer.proposal.items()}
    trainer.train()
    metrics = read_jsonl(trainer.run_dir / "metrics.jsonl")
    assert not metrics[0]["proposal_refreshed"]  # step 1: pi = q, not strictly closer
    assert any(m["proposal_refreshed"] for m in metrics), "pi trained toward p should beat the initial q"
    assert any(not torch.equal(initial[k], v) for k, v in trainer.proposal.items())


@pytest.mark.slow
def test_off_policy_resume_keeps_the_proposal(tiny_model_dir: Path, tmp_path: Path) -> None:
    settings = dict(off_policy=True, learning_rate=3e-2, divergence="fkl", save_every=2)
    full = build_trainer(tiny_model_dir, tmp_path / "full", steps=4, **settings)
    full.train()
    part = build_trainer(tiny_model_dir, tmp_path / "part", steps=2, **settings)
    part.train()
    resumed = build_trainer(tiny_model_dir, tmp_path / "ignored", steps=4, resume=str(part.run_dir), **settings)
    resumed.train()
    want, got = read_jsonl(full.run_dir / "metrics.jsonl"), read_jsonl(part.run_dir / "metrics.jsonl")
    assert len(got) == 4
    for g, w in zip(got, want):
        assert_same_metrics(g, w)


@pytest.mark.slow
def test_temperature_makes_a_proposal_corrected_by_importance_weights(make_trainer) -> None:
    trainer = make_trainer(temperature=0.7, steps=2)
    batch = trainer.sample(0)
    assert not torch.allclose(batch.log_q, batch.log_pi)
    summary = trainer.train()
    assert summary["status"] == "finished"
    metrics = read_jsonl(trainer.run_dir / "metrics.jsonl")
    assert all(0 < m["is_ess"] < 8.0 for m in metrics)


@pytest.mark.parametrize("clip", [None, 1.0])
def test_importance_weights_are_pi_over_q_clipped_at_the_setting(make_trainer, monkeypatch: pytest.MonkeyPatch,
                                                                  clip: float | None) -> None:
    """Temperature 2 samples from a flatter q: the loss gets w = min(pi/q, clip) per sample (pi/q without clip)."""
    import fdpg.algorithms.f_dpg

    trainer = make_trainer(temperature=2.0, importance_weight_clip=clip, batch_size=16, generation_batch_size=16,
                           micro_batch_size=4)
    batches, weights_seen = [], []
    sample, surrogate_loss = trainer.sample, fdpg.algorithms.f_dpg.surrogate_loss

    def recording_sample(step: int):
        batches.append(sample(step))
        return batches[-1]

    def recording_loss(log_pi, rewards, baseline, weights=None, **kwargs):
        weights_seen.append(weights.detach().clone())
        return surrogate_loss(log_pi, rewards, baseline, weights, **kwargs)

    monkeypatch.setattr(trainer, "sample", recording_sample)
    monkeypatch.setattr(fdpg.algorithms.f_dpg, "surrogate_loss", recording_loss)
    trainer.train_step(0)
    assert len(weights_seen) == 4  # one call per micro-batch
    applied = torch.cat(weights_seen).double()
    ratio = torch.exp(batches[0].log_pi.double() - batches[0].log_q.double())
    assert (ratio > 1.0).any() and (ratio < 1.0).any()  # so that clipping at 1 matters, and not everywhere
    if clip is None:
        torch.testing.assert_close(applied, ratio)
    else:
        assert (applied <= clip).all()
        torch.testing.assert_close(applied, ratio.clamp(max=clip))
