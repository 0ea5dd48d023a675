"""``toxicity``: fortune prompts, per-sentence profanity scores, the holistic max, and a 2-step run."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tasks import get_task
from tasks.toxicity import FORTUNES_DIR, fortune_prompts, holistic_toxicity, prompt_of, read_fortunes, sentences

pytest.importorskip("profanity_check", reason="pip install alt-profanity-check")


def test_sentences() -> None:
    assert sentences("Hello there. How are you?\nFine!  Thanks") == ["Hello there.", "How are you?", "Fine!",
                                                                     "Thanks"]
    assert sentences("  \n ") == []


def test_per_sentence_scores_and_holistic_max() -> None:
    clean = "The weather is lovely today. We walked along the river."
    mixed = "The weather is lovely today. You are a stupid fucking idiot."
    tox = holistic_toxicity([clean, mixed, ""])
    assert tox[0] < 0.2 and tox[1] > 0.8 and tox[2] == 0.0
    mean = holistic_toxicity([mixed], aggregate="mean")
    assert 0.3 < mean[0] < tox[1]  # the clean sentence dilutes the mean, not the max


def test_fortune_parsing(tmp_path: Path) -> None:
    (tmp_path / "mine").write_text("One two three four five six seven eight.\n%\nToo short.\n%\n"
                                   "A B C D E F G -- Someone Famous\n%\n")
    (tmp_path / "mine.dat").write_bytes(b"\x00\x01")
    assert read_fortunes(tmp_path) == ["One two three four five six seven eight.", "Too short.", "A B C D E F G"]
    assert fortune_prompts(directory=tmp_path) == ["One two three four", "A B C D"]
    assert prompt_of("a b c") is None
    with pytest.raises(FileNotFoundError, match="apt-get install fortunes-min"):
        read_fortunes(tmp_path / "missing")


@pytest.mark.skipif(not FORTUNES_DIR.is_dir(), reason="apt-get install fortunes-min")
def test_spec_on_the_installed_fortunes() -> None:
    spec = get_task("toxicity").build(0.1, {})
    assert len(spec.prompts) > 100 and spec.target.conditional
    assert get_task("toxicity").build(0.1, {"n_prompts": "10", "seed": "1"}).prompts == \
        get_task("toxicity").build(0.1, {"n_prompts": "10", "seed": "1"}).prompts
    feats = spec.scorer(["What a nice day.", "Shut up, you moron."], ["", ""])
    log_p = spec.target.log_P(torch.zeros(2), feats)
    assert log_p[0] > log_p[1]
    metrics = spec.metrics(feats)
    assert metrics["score/toxic_fraction"] == 0.5
    assert metrics["score/toxicity"] == pytest.approx(float(-feats["reward"].mean()))


@pytest.mark.slow
def test_two_steps_on_the_tiny_model(smoke_run) -> None:
    spec = get_task("toxicity").build(0.5, {}, ["you are", "the food was"])
    metrics = smoke_run(spec, divergence="rkl", beta=0.5)
    assert all(0 <= m["score/toxicity"] <= 1 for m in metrics)
