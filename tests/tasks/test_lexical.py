"""``lexical``: the whole-word detector, the binary target, and a 2-step run."""

from __future__ import annotations

import math

import pytest
import torch

from tasks import get_task
from tasks.lexical import contains_word


@pytest.mark.parametrize(("text", "expected"), [
    ("This is AMAZING!", True),
    ("amazing", True),
    ("What an amazing day.", True),
    ("the view was Amazing, truly", True),
    ("\"amazing\"", True),
    ("It's amazing's charm", True),
    ("amazingly good", False),
    ("unamazing", False),
    ("amaze me", False),
    ("amazing_thing", False),
    ("", False),
])
def test_whole_word_case_insensitive(text: str, expected: bool) -> None:
    assert contains_word(text, "amazing") is expected


def test_other_words_and_phrases() -> None:
    assert contains_word("Thank   you so much", "thank you")
    assert not contains_word("thankyou", "thank you")
    assert contains_word("C'est la vie.", "vie")
    with pytest.raises(ValueError, match="must not be empty"):
        contains_word("x", " ")


def test_spec_scores_and_target() -> None:
    spec = get_task("lexical").build(0.1, {"word": "great"})
    assert len(spec.prompts) > 1 and spec.target.conditional
    unconditional = get_task("lexical").build(0.1, {"unconditional": "true"})
    assert unconditional.prompts is None and not unconditional.target.conditional
    feats = spec.scorer(["a great day", "greatness", "GREAT!"], ["", "", ""])
    assert feats["b"].tolist() == [1.0, 0.0, 1.0]
    log_p = spec.target.log_P(torch.zeros(3), feats)
    assert log_p[0] == 0 and log_p[1] == -math.inf
    assert spec.metrics(feats) == {"score/constraint_satisfaction": pytest.approx(2 / 3)}
    assert get_task("lexical").build(0.1, {}, ["hello"]).target.conditional  # prompts: one Z per prompt
    with pytest.raises(ValueError, match="unknown --task_args"):
        get_task("lexical").build(0.1, {"wrod": "x"})


@pytest.mark.slow
def test_two_steps_on_the_tiny_model(smoke_run) -> None:
    # "e" as a whole word is frequent enough in the tiny model's random characters for P > 0 in a batch
    spec = get_task("lexical").build(0.1, {"word": "e"}, ["hello", "the cat sat on"])
    metrics = smoke_run(spec, divergence="fkl")
    assert all(0 <= m["score/constraint_satisfaction"] <= 1 for m in metrics)
