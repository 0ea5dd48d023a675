"""``fdpg label-rankings``: strict rankings of each prompt's k samples by the task's score, best first."""

from __future__ import annotations

import pytest

from fdpg.commands.label_rankings import rankings_from_scores


def test_rankings_are_strict_best_first_and_drop_prompts_without_two_scores() -> None:
    prompts = ["a"] * 4 + ["b"] * 4 + ["c"] * 4
    texts = ["x", "y", "z", "w", "p", "q", "r", "s", "u", "u", " ", "v"]
    scores = [0.0, 1.0, 0.0, 0.5, 1.0, 1.0, 1.0, 1.0, 0.0, 1.0, 2.0, 0.0]
    rows = rankings_from_scores(prompts, texts, scores, 4)
    # a: "x" and "z" tie at 0 -> the first drawn kept; b: all tie -> dropped; c: "u" twice (the second, though
    # scored 1, is the same text), " " empty, "v" ties with the first "u"
    assert rows == [{"prompt": "a", "responses": ["y", "w", "x"], "scores": [1.0, 0.5, 0.0]}]


def test_rankings_from_a_wrong_number_of_samples_are_refused() -> None:
    with pytest.raises(ValueError, match="k = 3 samples for each prompt"):
        rankings_from_scores(["a"] * 4, ["x"] * 4, [0.0] * 4, 3)
