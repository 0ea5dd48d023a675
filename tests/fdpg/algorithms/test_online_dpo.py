"""Online DPO on the shared engine: the judge orders each prompt's two samples (ties dropped), the applied gradient
is the gradient of the DPO loss of the step's own samples written out, a run logs the shared metrics and its own, a
resumed run reproduces the uninterrupted one, and bad settings are refused with the reason."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from fdpg_testing import REQUIRED_METRICS, assert_same_metrics, build_trainer, read_jsonl
from test_dpo import assert_gradient_of, step_gradient

from fdpg.algorithms.online_dpo import OnlineDPOTrainer
from fdpg.config import TrainConfig
from fdpg.log_probs import completion_token_log_probs

SETTINGS = dict(algo="online_dpo", samples_per_prompt=2, batch_size=8, micro_batch_size=4, lora_r=4, beta=0.5,
                exact_kl_every=0)


def test_the_judge_orders_each_pair_and_drops_ties():
    chosen, rejected, untied = OnlineDPOTrainer.judge(torch.tensor([0.1, 0.7, 0.5, 0.5, 2.0, -1.0]))
    assert chosen.tolist() == [1, 2, 4] and rejected.tolist() == [0, 3, 5]
    assert untied.tolist() == [True, False, True]


@pytest.mark.parametrize("loss", ["sigmoid", "ipo"])
def test_trainer_gradient_is_the_gradient_of_the_dpo_loss_of_its_own_samples(tiny_model_dir, tmp_path, loss):
    trainer = build_trainer(tiny_model_dir, tmp_path / "run", preference_loss=loss, **SETTINGS)
    with torch.no_grad():  # an adapter off zero: pi != pi_ref
        for p in trainer._trainable().values():
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(1)))
    seen = {}
    rollout = trainer.rollout

    def recording_rollout(step):
        seen["out"] = rollout(step)
        return seen["out"]

    trainer.rollout = recording_rollout
    got = step_gradient(trainer)
    batch, features, token_log_a = seen["out"]
    reward = features["reward"].double()
    log_pi = completion_token_log_probs(trainer.model, batch).sum(-1).double()
    log_ratio = log_pi - token_log_a.sum(-1).double()
    lengths = batch.completion_mask.sum(-1).double()
    terms = []
    for i in range(0, len(batch), 2):
        if reward[i] == reward[i + 1]:
            continue
        w, lo = (i, i + 1) if reward[i] > reward[i + 1] else (i + 1, i)
        if loss == "sigmoid":
            terms.append(-F.logsigmoid(0.5 * (log_ratio[w] - log_ratio[lo])))
        else:  # IPO on per-token scores, as TRL: (margin - 1 / (2 beta))^2
            terms.append((log_ratio[w] / lengths[w] - log_ratio[lo] / lengths[lo] - 1 / (2 * 0.5)) ** 2)
    assert terms
    assert_gradient_of(torch.stack(terms).mean(), trainer, got)


def test_a_run_logs_the_shared_metrics_and_resumes(tiny_model_dir, tmp_path):
    reference = build_trainer(tiny_model_dir, tmp_path / "reference", steps=3, save_every=2, **SETTINGS)
    assert reference.train()["status"] == "finished"
    metrics = read_jsonl(reference.run_dir / "metrics.jsonl")
    for key in (*REQUIRED_METRICS, "loss", "rewards/accuracy", "online_dpo/tie_fraction", "score/reward"):
        assert key in metrics[0], key
    first = build_trainer(tiny_model_dir, tmp_path / "run", steps=2, save_every=2, **SETTINGS)
    assert first.train()["status"] == "finished"
    resumed = build_trainer(tiny_model_dir, tmp_path / "x", steps=3, save_every=2, resume=str(first.run_dir),
                            **SETTINGS)
    assert resumed.train()["status"] == "finished"
    for g, w in zip(read_jsonl(first.run_dir / "metrics.jsonl"), metrics):
        assert_same_metrics(g, w)


@pytest.mark.parametrize(("settings", "message"), [
    (dict(samples_per_prompt=4), r"--samples_per_prompt must be 2"),
    (dict(samples_per_prompt=2, preferences="pairs.jsonl"), r"drop --preferences"),
    (dict(samples_per_prompt=2, divergence="tv"), r"f-DPO is not defined"),
    (dict(samples_per_prompt=2, preference_loss="simpo"), r"'simpo' is not one here"),
    (dict(samples_per_prompt=2, preference_loss="sigmoid,sft"), r"is not one here"),
])
def test_bad_online_dpo_settings_are_refused_with_the_reason(tmp_path, settings, message):
    with pytest.raises(ValueError, match=message):
        TrainConfig(algo="online_dpo", batch_size=8, output_dir=str(tmp_path), eval_samples=0, **settings)
