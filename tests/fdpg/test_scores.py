"""What scorers may return: bad scores fail with a ScoreError naming the feature; empty completions are fine."""

from __future__ import annotations

import json
import math

import pytest
import torch
from fdpg_testing import read_jsonl, toy_scorer

from objectives import ScoreError, binary_constraint


def _with(reward):
    """A scorer whose 'reward' is ``reward(n)`` for a batch of n completions."""
    return lambda completions, prompts: {"reward": reward(len(completions))}


@pytest.mark.parametrize(
    ("scorer", "message"),
    [
        (_with(lambda n: [0.5] * (n - 1) + [math.nan]), r"score 'reward' contains NaN .*first at index \(7,\)"),
        (_with(lambda n: torch.full((n,), math.nan)), r"score 'reward' contains NaN \(8 of 8"),
        (_with(lambda n: [0.5] * (n - 1)), r"score 'reward' has shape \(7,\).*one number per sample"),
        (_with(lambda n: [[0.5]] * n), r"score 'reward' has shape \(8, 1\)"),
        (_with(lambda n: ["good"] * n), r"score 'reward' must be numbers"),
        (_with(lambda n: [None] * n), r"score 'reward' must be numbers"),
        (lambda c, p: {"rewards": [0.0] * len(c)}, r"needs scores \['reward'\] but got \['rewards'\]"),
    ],
    ids=["nan", "all-nan", "short", "2d", "strings", "none", "missing"],
)
def test_bad_scores_raise_score_error_naming_the_feature(make_trainer, scorer, message: str) -> None:
    trainer = make_trainer(steps=2, scorer=scorer)
    with pytest.raises(ScoreError, match=message):
        trainer.train()
    summary = json.loads((trainer.run_dir / "summary.json").read_text())
    assert summary["status"] == "failed" and "ScoreError" in summary["error"]


def test_binary_scores_may_be_booleans(make_trainer) -> None:
    scorer = lambda c, p: {"b": torch.tensor(["a" in t or "e" in t for t in c])}  # noqa: E731
    trainer = make_trainer(steps=1, divergence="fkl", target=binary_constraint("b"), scorer=scorer)
    assert trainer.train()["status"] == "finished"


def test_binary_scores_must_be_zero_or_one(make_trainer) -> None:
    trainer = make_trainer(steps=1, divergence="fkl", target=binary_constraint("b"),
                           scorer=lambda c, p: {"b": [0.5] * len(c)})
    with pytest.raises(ScoreError, match=r"binary constraint 'b' must score every sample 0 or 1.*0\.5"):
        trainer.train()


def test_empty_completions_are_scored_and_logged(make_trainer) -> None:
    seen: list[str] = []

    def scorer(completions, prompts):
        seen.extend(completions)
        return toy_scorer(completions, prompts)

    trainer = make_trainer(steps=2, scorer=scorer)
    eos = trainer.policy.tokenizer.eos_token_id

    def boost_eos(module, inputs, output):  # the policy often stops at once: empty completions
        output = output.clone()
        output[..., eos] += 5.0
        return output

    trainer._unwrapped().get_output_embeddings().register_forward_hook(boost_eos)
    assert trainer.train()["status"] == "finished"
    assert "" in seen and any(seen)
    metrics = read_jsonl(trainer.run_dir / "metrics.jsonl")
    expected = [sum(t == "" for t in seen[:8]) / 8, sum(t == "" for t in seen[8:]) / 8]
    assert [m["empty_fraction"] for m in metrics] == expected
    assert all(math.isfinite(m["kl_pi_a"]) and math.isfinite(m["pseudo_reward_mean"]) for m in metrics)
    samples = read_jsonl(trainer.run_dir / "samples.jsonl")
    assert any(s["completion"] == "" and s["scores"]["reward"] == 0.0 for s in samples)


def test_metric_only_features_reach_the_metrics_and_samples(make_trainer) -> None:
    """A scorer may return features the target does not read: they are checked and logged, not optimised."""
    seen = {}

    def metrics(features):
        seen.update(features)
        return {"score/length": float(features["length"].mean())}

    def scorer(completions, prompts):
        return {**toy_scorer(completions, prompts), "length": [float(len(c)) for c in completions]}

    trainer = make_trainer(scorer=scorer, steps=1)
    trainer.metrics_fn = metrics
    trainer.train()
    assert "length" in seen and seen["length"].shape == (8,)
    row = read_jsonl(trainer.run_dir / "metrics.jsonl")[0]
    assert row["score/length"] == pytest.approx(float(seen["length"].mean()))
    sample = read_jsonl(trainer.run_dir / "samples.jsonl")[0]
    assert sample["scores"]["length"] == pytest.approx(len(sample["completion"]))


def test_metric_only_features_are_checked_too(make_trainer) -> None:
    def scorer(completions, prompts):
        return {**toy_scorer(completions, prompts), "extra": [float("nan")] * len(completions)}

    with pytest.raises(ScoreError, match="'extra'"):
        make_trainer(scorer=scorer, steps=1).train()
