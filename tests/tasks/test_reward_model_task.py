"""``reward_model``: a trained reward model (``fdpg reward-model train``) as a task's scorer, on tiny models."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from fdpg.algorithms.reward_model import RewardModel, RewardModelConfig, RewardModelTrainer
from fdpg.rankings import rankings_from_rows
from tasks import get_task

PROMPTS = ["tell me", "say it", "go on", "and then"]


def data_rows() -> list[dict]:
    """Pairs on four prompts: the chosen response holds a ``z``."""
    return [{"prompt": PROMPTS[i % 4], "chosen": f"z{'abcd'[i % 4] * 3}{i}", "rejected": f"{'efgh'[i % 4] * 4}{i}"}
            for i in range(16)]


@pytest.fixture(scope="module")
def reward_run(tiny_bert_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished 4-step reward-model run on a tiny random BERT."""
    root = tmp_path_factory.mktemp("reward_model_task")
    data = root / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in data_rows()))
    config = RewardModelConfig(data=str(data), model=str(tiny_bert_dir), steps=4, batch_size=4, micro_batch_size=4,
                               learning_rate=3e-3, heldout_fraction=0.25, bounded=True, output_dir=str(root / "run"),
                               progress=False)
    trainer = RewardModelTrainer(config, rankings_from_rows(data_rows(), source=str(data)))
    assert trainer.train()["status"] == "finished"
    return trainer.run_dir


@pytest.mark.slow
def test_the_task_scores_completions_with_the_trained_model(reward_run, smoke_run):
    spec = get_task("reward_model").build(0.5, {"path": str(reward_run)})
    assert spec.prompts == PROMPTS  # the distinct prompts of the run's own data
    assert spec.target.conditional and "reward" in spec.target.describe()
    completions = ["zaaa", "eeee", "zz", "hello"]
    features = spec.scorer(completions, PROMPTS)
    model = RewardModel.load(reward_run / "final")
    torch.testing.assert_close(features["reward"], model(PROMPTS, completions))
    alone = torch.cat([model([p], [c]) for p, c in zip(PROMPTS, completions)])  # no dependence on the padding
    torch.testing.assert_close(features["reward"], alone, atol=1e-6, rtol=1e-5)
    assert ((features["reward"] >= 0) & (features["reward"] <= 1)).all()  # trained bounded
    assert set(spec.metrics(features)) == {"score/reward", "score/reward_std"}
    # prompts from another data set, or from --prompts_file
    other = reward_run.parent / "other.jsonl"
    other.write_text(json.dumps({"prompt": "elsewhere", "responses": ["a", "b"]}) + "\n")
    assert get_task("reward_model").build(0.5, {"path": str(reward_run), "data": str(other)}).prompts == ["elsewhere"]
    assert get_task("reward_model").build(0.5, {"path": str(reward_run)}, ["mine"]).prompts == ["mine"]
    # a 2-step f-DPG run of the tiny Llama toward a exp(R / beta)
    metrics = smoke_run(spec)
    assert all("score/reward" in m for m in metrics)


def test_a_missing_or_wrong_path_fails_early(reward_run, tmp_path):
    task = get_task("reward_model")
    with pytest.raises(ValueError, match="needs the reward model: --task_args path=RUN"):
        task.build(0.1, {})
    with pytest.raises(FileNotFoundError, match="does not exist"):
        task.build(0.1, {"path": str(tmp_path / "missing")})
    fdpg_run = tmp_path / "fdpg_run"
    fdpg_run.mkdir()
    (fdpg_run / "config.json").write_text(json.dumps({"config": {"algo": "fdpg", "task": "sentiment"}}))
    with pytest.raises(ValueError, match="not a reward-model run"):
        task.build(0.1, {"path": str(fdpg_run)})
    unfinished = tmp_path / "unfinished"
    unfinished.mkdir()
    (unfinished / "config.json").write_text(json.dumps({"config": {"kind": "reward_model"}}))
    with pytest.raises(FileNotFoundError, match="has not finished.*--resume"):
        task.build(0.1, {"path": str(unfinished)})
    with pytest.raises(ValueError, match="holds no reward_model.json"):
        task.build(0.1, {"path": str(tmp_path)})
    with pytest.raises(ValueError, match="unknown --task_args"):
        task.build(0.1, {"path": str(reward_run), "model": "x"})
