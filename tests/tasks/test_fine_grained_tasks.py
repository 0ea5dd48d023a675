"""Fine-grained tasks: sentence-level toxicity (``granularity=sentence``) and the three-component ``fine_grained``.

Scorer tests on texts and on token ids (no language model): the segment rewards, their placement on the
tokens that end the segments, and totals equal to the scorer's reward.
"""

from __future__ import annotations

import pytest
import torch

import tasks.toxicity as toxicity
from objectives.fine_grained import FineGrainedReward
from objectives.segments import sentences as segment_sentences
from tasks import get_task
from tasks.fine_grained import fine_grained_reward, is_complete, repeated_ngrams, words
from tasks.sentiment import DEFAULT_PROMPTS, vader_compound

pytest.importorskip("profanity_check", reason="pip install alt-profanity-check")
pytest.importorskip("vaderSentiment", reason="pip install vaderSentiment")

PROMPTS = ["you are", "the food was"]  # the toxicity task's own prompts need Debian fortunes

TRICKY = [
    "You are kind. You are a stupid fucking idiot. Have a nice day.",  # a toxic middle sentence
    "Hello there.  \n\n  ",  # trailing whitespace
    "no final punctuation here, you idiot",
    "",
    "   \n ",
    "Line one\nline two is shit\n\nThird line",
    'He said "stop, you moron." Then he left!',
    "Mr. Smith is an idiot. e.g. this one. J. K. wrote it",  # abbreviations: the two splitters disagree
    "Wow!😀 You moron. 你好。世界 damn it",  # emoji and CJK: the objectives splitter cuts, the task's does not
    "first part... second part? third!?\t",
    "a\r\nb fuck you\r\n",
    "It is fine.The next one has no space. Shut up, idiot",
]


def char_ids(text: str) -> list[int]:
    """A lossless case-preserving 'tokenizer': one id per character (its code point)."""
    return [ord(c) for c in text]


def char_decode(ids: list[int]) -> str:
    return "".join(map(chr, ids))


def padded(tokenizer, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded token ids of ``texts`` and their mask (as the trainer passes generated tokens)."""
    rows = [tokenizer.encode(t, add_special_tokens=False) for t in texts]
    width = max(map(len, rows))
    ids = torch.full((len(rows), width), tokenizer.pad_token_id)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for b, row in enumerate(rows):
        ids[b, :len(row)] = torch.tensor(row)
        mask[b, :len(row)] = 1
    return ids, mask


# ----------------------------------------------------------------------------------------- toxicity
@pytest.mark.parametrize("aggregate", ["max", "mean"])
def test_sentence_granularity_totals_are_the_holistic_reward(aggregate: str) -> None:
    fine = get_task("toxicity").build(0.1, {"granularity": "sentence", "aggregate": aggregate}, PROMPTS)
    holistic = get_task("toxicity").build(0.1, {"aggregate": aggregate}, PROMPTS)
    assert fine.fine_grained is not None and holistic.fine_grained is None
    assert fine.fine_grained_feature == "reward" and fine.target.conditional
    reward = fine.scorer(TRICKY, [""] * len(TRICKY))["reward"]
    expected = -toxicity.holistic_toxicity(TRICKY, aggregate)
    torch.testing.assert_close(reward, expected, rtol=0, atol=1e-9)
    torch.testing.assert_close(reward, fine.fine_grained.totals(TRICKY), rtol=0, atol=0)
    torch.testing.assert_close(holistic.scorer(TRICKY, [""] * len(TRICKY))["reward"], expected, rtol=0, atol=0)
    assert reward[0] < -0.3 and reward[3] == 0.0 and reward[4] == 0.0
    # The metrics mean the same at both granularities: the whole completion's toxicity.
    fine_metrics = fine.metrics({"reward": reward})
    holistic_metrics = holistic.metrics({"reward": expected})
    assert fine_metrics.keys() == holistic_metrics.keys() == {"score/toxicity", "score/toxic_fraction"}
    for key, value in fine_metrics.items():
        assert value == pytest.approx(holistic_metrics[key], abs=1e-9)


def test_the_last_prefix_has_the_toxicity_of_the_whole_completion() -> None:
    """The last sentence span ends at the last non-whitespace character, and trailing whitespace never
    changes the holistic toxicity: so the increments telescope to T(completion) (the module's argument)."""
    for text in TRICKY:
        spans = segment_sentences(text)
        last = text[: spans[-1][1]] if spans else ""
        assert last == text.rstrip()
        assert toxicity.sentences(last) == toxicity.sentences(text)


def test_sentence_rewards_are_prefix_differences_of_the_real_scorer() -> None:
    reward = toxicity.fine_grained_toxicity()
    text = TRICKY[0]
    result = reward([text], [char_ids(text)], char_decode)
    ends = [s.span[1] for s in result.segments[0]]
    assert [s.text for s in result.segments[0]] == ["You are kind.", "You are a stupid fucking idiot.",
                                                    "Have a nice day."]
    prefix_tox = toxicity.holistic_toxicity([text[:e] for e in ends]).tolist()
    expected = [-(t - before) for t, before in zip(prefix_tox, [0.0, *prefix_tox])]
    assert [s.weighted for s in result.segments[0]] == pytest.approx(expected, abs=1e-12)
    assert result.segments[0][1].weighted < -0.5  # the toxic sentence takes the blame
    assert result.segments[0][2].weighted == pytest.approx(0.0, abs=1e-12)  # max: nothing added after it


def fake_predict_prob(sentences: list[str]) -> list[float]:
    """A stand-in for alt-profanity-check: 0.9 for a sentence with "idiot", 0.1 otherwise."""
    return [0.9 if "idiot" in s else 0.1 for s in sentences]


@pytest.mark.parametrize(("aggregate", "expected"), [
    ("max", [-0.1, -0.8, 0.0]),  # T of the prefixes: 0.1, 0.9, 0.9
    ("mean", [-0.1, -0.4, 0.5 - 1.1 / 3]),  # T: 0.1, 0.5, 1.1/3 (a clean sentence dilutes the mean)
])
def test_hand_checked_rewards_sit_on_the_tokens_that_end_the_sentences(
    monkeypatch: pytest.MonkeyPatch, tiny_tokenizer, aggregate: str, expected: list[float]
) -> None:
    monkeypatch.setattr(toxicity, "_predict_prob", lambda: fake_predict_prob)
    spec = get_task("toxicity").build(0.1, {"granularity": "sentence", "aggregate": aggregate}, PROMPTS)
    texts = ["you are kind. 2 of you are idiots! 3 cats sat here", "fine."]  # lowercase: the tiny tokenizer's
    ids, mask = padded(tiny_tokenizer, texts)

    def decode(row: list[int]) -> str:
        return tiny_tokenizer.decode(row, skip_special_tokens=True)

    assert [decode(row[: int(m.sum())]) for row, m in zip(ids.tolist(), mask)] == texts
    result = spec.fine_grained(texts, ids, decode, mask=mask)
    ends = [13, 34, 50]  # 'you are kind.' | '2 of you are idiots!' | '3 cats sat here'; one token per character
    assert [s.span[1] for s in result.segments[0]] == ends
    assert [s.token_index for s in result.segments[0]] == [e - 1 for e in ends]
    row = torch.zeros(ids.shape[1], dtype=torch.float64)
    row[[e - 1 for e in ends]] = torch.tensor(expected, dtype=torch.float64)
    torch.testing.assert_close(result.dense[0], row, rtol=0, atol=1e-12)
    assert result.dense[1, 4] == pytest.approx(-0.1) and int((result.dense[1] != 0).sum()) == 1
    # The trainer's check: the dense rows sum to the scorer's reward feature.
    reward = spec.scorer(texts, PROMPTS)[spec.fine_grained_feature]
    torch.testing.assert_close(result.dense.sum(-1), reward, rtol=0, atol=1e-12)
    torch.testing.assert_close(result.total, reward, rtol=0, atol=1e-12)


def test_granularity_option_errors() -> None:
    with pytest.raises(ValueError, match=r"granularity must be one of 'holistic', 'sentence', got 'word'"):
        get_task("toxicity").build(0.1, {"granularity": "word"}, PROMPTS)
    assert get_task("toxicity").options["granularity"] == "holistic"
    assert "granularity=sentence" in get_task("toxicity").description


# ----------------------------------------------------------------------------------------- three components
def segment_scores(reward: FineGrainedReward, text: str, component: str) -> list[tuple[str, float]]:
    result = reward([text], [char_ids(text)], char_decode)
    return [(s.text, s.score) for s in result.segments[0] if s.component == component]


def test_repetition_is_penalised_where_it_occurs() -> None:
    reward = fine_grained_reward()
    text = "The cat sat on the mat, and then it slept well. Later the cat sat on the sofa again."
    # trigrams "the cat sat", "cat sat on", "sat on the" come back in the last sub-sentence, not before
    assert segment_scores(reward, text, "repetition") == [
        ("The cat sat on the mat,", 0.0), ("and then it slept well.", 0.0),
        ("Later the cat sat on the sofa again.", 3.0),
    ]
    weighted = [s.weighted for s in reward([text], [char_ids(text)], char_decode).segments[0]
                if s.component == "repetition"]
    assert weighted == [0.0, 0.0, -1.5]  # default w_repetition = 0.5, a penalty
    # An n-gram that crosses into the next sub-sentence counts where it ends.
    crossing = "One two three one two, three four five six seven."  # "one two three" again, across the cut
    assert segment_scores(reward, crossing, "repetition") == [
        ("One two three one two,", 0.0), ("three four five six seven.", 1.0),
    ]
    assert repeated_ngrams("the the the the") == 1 and repeated_ngrams("the the the the", 2) == 2
    assert repeated_ngrams("One two. one, TWO!", 2) == 1  # case and punctuation ignored, across sentences
    assert words("Don't stop - it's 3 o'clock.") == ["don't", "stop", "it's", "3", "o'clock"]
    assert repeated_ngrams("") == 0 and repeated_ngrams("a b") == 0


def test_completeness_needs_final_punctuation() -> None:
    complete = ["Done.", "Really?!  \n", 'He said "stop."', "(See above.)", "Wait...", "Great!’", "Fine…"]
    incomplete = ["", "   ", "Done", "and then,", '"quoted"', "ends with a period. and then"]
    assert [is_complete(t) for t in complete] == [1.0] * len(complete)
    assert [is_complete(t) for t in incomplete] == [0.0] * len(incomplete)
    reward = fine_grained_reward()
    text = "It was good. It was"
    result = reward([text], [char_ids(text)], char_decode)
    (segment,) = [s for s in result.segments[0] if s.component == "completeness"]
    assert segment.span == (0, len(text)) and segment.score == 0.0 and segment.token_index == len(text) - 1
    assert segment_scores(reward, "It was good.  ", "completeness") == [("It was good.  ", 1.0)]


def test_sentiment_is_scored_per_sentence() -> None:
    reward = fine_grained_reward()
    text = "I love this wonderful film. I hate the awful ending. It is long"
    scores = segment_scores(reward, text, "sentiment")
    parts = ["I love this wonderful film.", "I hate the awful ending.", "It is long"]
    assert [t for t, _ in scores] == parts
    assert [s for _, s in scores] == pytest.approx(vader_compound(parts).tolist(), abs=1e-12)
    assert scores[0][1] > 0.5 and scores[1][1] < -0.5
    assert segment_scores(reward, "", "sentiment") == []  # no sentence, no sentiment


def test_weights_from_task_args_and_totals() -> None:
    texts = [
        "I love this movie. It is great, the acting is great and the music is great, the acting is great too!",
        "the the the the the",
        "",
        "Terrible food, terrible service, terrible terrible place. Never again",
        'She said "wonderful."  ',
    ]
    task = get_task("fine_grained")
    assert task.options == {"w_sentiment": 1.0, "w_repetition": 0.5, "w_completeness": 0.3, "ngram": 3,
                            "granularity": "fine"}
    spec = task.build(0.1, {"w_sentiment": "2", "w_repetition": "1.5", "w_completeness": "-0.25"})
    assert [c.weight for c in spec.fine_grained.components] == [2.0, -1.5, -0.25]
    assert spec.prompts == DEFAULT_PROMPTS and spec.target.conditional and spec.fine_grained_feature == "reward"
    feats = spec.scorer(texts, [DEFAULT_PROMPTS[0]] * len(texts))
    assert set(feats) == {"reward", "sentiment", "repetition", "completeness"}
    torch.testing.assert_close(feats["reward"], spec.fine_grained.totals(texts), rtol=0, atol=0)
    combined = 2 * feats["sentiment"] - 1.5 * feats["repetition"] - 0.25 * feats["completeness"]
    torch.testing.assert_close(feats["reward"], combined, rtol=0, atol=1e-9)
    assert feats["repetition"].tolist() == [4.0, 2.0, 0.0, 0.0, 0.0]  # by hand
    assert feats["completeness"].tolist() == [1.0, 0.0, 0.0, 0.0, 1.0]
    sentiment = [float(vader_compound([t[a:b] for a, b in segment_sentences(t)]).sum()) for t in texts]
    assert feats["sentiment"].tolist() == pytest.approx(sentiment, abs=1e-12)
    metrics = spec.metrics(feats)
    assert metrics.keys() == {"score/reward", "score/sentiment", "score/repetition", "score/completeness"}
    assert metrics["score/repetition"] == pytest.approx(1.2) and metrics["score/completeness"] == pytest.approx(0.4)
    # The same total from the token ids, placed on the tokens (the trainer's check: rows sum to the reward).
    result = spec.fine_grained(texts, [char_ids(t) for t in texts], char_decode)
    torch.testing.assert_close(result.dense.sum(-1), feats["reward"], rtol=0, atol=1e-12)
    assert result.causal
    # ngram=2 counts bigrams
    bigrams = task.build(0.1, {"ngram": "2"}).scorer(["one two one two one"], [""])
    assert bigrams["repetition"].tolist() == [2.0]


def test_bad_options() -> None:
    task = get_task("fine_grained")
    with pytest.raises(ValueError, match=r"w_sentiment='high' is not a valid float"):
        task.build(0.1, {"w_sentiment": "high"})
    with pytest.raises(ValueError, match="w_repetition must be a finite number"):
        task.build(0.1, {"w_repetition": "nan"})
    with pytest.raises(ValueError, match="ngram must be >= 1"):
        task.build(0.1, {"ngram": "0"})
    with pytest.raises(ValueError, match="unknown --task_args"):
        task.build(0.1, {"w_fluency": "1"})


def test_holistic_granularity_puts_the_same_total_on_the_last_token() -> None:
    fine = get_task("fine_grained").build(0.1, {}, None)
    holistic = get_task("fine_grained").build(0.1, {"granularity": "holistic"}, None)
    texts = ["I love this wonderful film. I hate the awful ending. It is long", "Great fun.  ", "the cat sat"]
    ids = [char_ids(t) for t in texts]
    dense_fine = fine.fine_grained(texts, ids, char_decode).dense
    result = holistic.fine_grained(texts, ids, char_decode)
    torch.testing.assert_close(result.total, fine.scorer(texts, texts)["reward"], rtol=0, atol=1e-12)
    torch.testing.assert_close(result.dense.sum(-1), dense_fine.sum(-1), rtol=0, atol=1e-12)
    for b, text in enumerate(texts):  # all of it on the completion's last token (its last character)
        assert int((result.dense[b] != 0).sum()) <= 1
        assert result.dense[b, len(text) - 1] == pytest.approx(float(result.total[b]))
    assert int((dense_fine[0] != 0).sum()) > 1  # the fine one is spread over the sentences
    with pytest.raises(ValueError, match="granularity must be one of 'fine', 'holistic', got 'word'"):
        get_task("fine_grained").build(0.1, {"granularity": "word"}, None)
