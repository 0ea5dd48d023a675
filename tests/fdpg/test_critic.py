"""The critics of PPO (fdpg.critic): the value model initialised from a reward model reads its logits."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch


def saved_reward_model(model_dir: Path, directory: Path, seed: int = 0) -> Path:
    """A reward model as ``fdpg reward-model train`` saves it (a sequence-classification model, its tokenizer and
    its description), with a random, non-zero score head; no training (that is the slow test's job)."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from fdpg.algorithms.reward_model import INFO_FILE, INFO_FORMAT

    torch.manual_seed(seed)
    model = AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=1)
    model.config.pad_token_id = model.config.pad_token_id or 0
    with torch.no_grad():
        model.score.weight.normal_(std=1.0)
    model.save_pretrained(directory)
    AutoTokenizer.from_pretrained(model_dir).save_pretrained(directory)
    (directory / INFO_FILE).write_text(json.dumps({"format": INFO_FORMAT, "version": 1, "bounded": False}))
    return directory


def test_the_value_model_from_a_reward_model_is_its_logit_of_each_prefix(tiny_model_dir: Path, tmp_path: Path) -> None:
    r"""InstructGPT's critic initialisation: before any update :math:`V(s_t)` equals the reward model's own logit
    of the prefix :math:`(c, y_{<t})`, computed here by its sequence-classification forward on each prefix alone
    (a negated or dropped head, or a shifted state, fails it)."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from fdpg.critic import ValueModel
    from fdpg.sampling import SampleBatch

    path = saved_reward_model(tiny_model_dir, tmp_path / "rm")
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    value = ValueModel.from_reward_model(str(path), tokenizer)
    reference = AutoModelForSequenceClassification.from_pretrained(path).eval()
    prompts = [tokenizer("hello")["input_ids"], tokenizer("the cat")["input_ids"]]
    completions = [tokenizer(" sat on a mat", add_special_tokens=False)["input_ids"],
                   tokenizer(" ran", add_special_tokens=False)["input_ids"]]
    batch = SampleBatch.from_token_rows(["hello", "the cat"], prompts, completions, ["", ""],
                                        tokenizer.pad_token_id or 0)
    with torch.no_grad():
        values = value(batch)
        logits = [[float(reference(input_ids=torch.tensor([p + c[:t]])).logits[0, 0]) for t in range(len(c))]
                  for p, c in zip(prompts, completions)]
    for j, row in enumerate(logits):
        assert values[j, :len(row)].tolist() == pytest.approx(row, abs=1e-5), j
        assert bool((values[j, len(row):] == 0).all())
    assert max(abs(x) for row in logits for x in row) > 0.05  # the head is not ~0, so a sign error shows
