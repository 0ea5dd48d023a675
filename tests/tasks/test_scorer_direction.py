"""Every built-in task's scorer and target point the right way on fixed texts that clearly do or do not qualify.

Each text pair goes through the task the way the trainer uses it: ``spec.scorer(completions, prompts)``,
checked by :func:`fdpg.scores.checked_features`, then ``spec.target.log_P(log_a, features)`` with the same
``log a`` for every text, and ``spec.metrics(features)``. A wanted text must get the higher reward (signed
scorers: ``> 0`` for the wanted text, ``< 0`` for the other), the higher ``log P`` (so training moves toward
it), and count in the task's metric. A scorer or target whose sign is flipped fails here.
"""

from __future__ import annotations

import math

import pytest
import torch

from fdpg.scores import checked_features
from tasks import TaskSpec, get_task

POSITIVE = ["I love this movie, it is wonderful and the acting is great!",
            "What a beautiful, delightful and happy day."]
NEGATIVE = ["I hate this film, it is awful, boring and terrible.",
            "The food was disgusting and the staff were rude."]


def score_like_the_trainer(spec: TaskSpec, completions: list[str], prompts: list[str] | None = None,
                           ) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """The checked features of ``completions`` and their ``log P - log a`` (every ``log a`` = -7)."""
    prompts = prompts or [""] * len(completions)
    features = checked_features(spec.target, spec.scorer(list(completions), list(prompts)), len(completions))
    log_a = torch.full((len(completions),), -7.0, dtype=torch.float64)
    return features, spec.target.log_P(log_a, features) - log_a


def test_vader_sentiment_rewards_positive_reviews() -> None:
    spec = get_task("sentiment").build(0.1, {})
    features, log_ratio = score_like_the_trainer(spec, POSITIVE + NEGATIVE)
    reward = features["reward"]
    assert (reward[:2] > 0.5).all() and (reward[2:] < -0.5).all(), reward
    # P = a exp(r / beta): log P - log a = r / 0.1, positive for the positive reviews
    torch.testing.assert_close(log_ratio, reward / 0.1)
    assert log_ratio[:2].min() > 0 > log_ratio[2:].max()
    metrics = spec.metrics(features)
    assert metrics["score/positive_fraction"] == 0.5
    assert metrics["score/reward"] == pytest.approx(float(reward.mean()))
    only_positive = spec.metrics(score_like_the_trainer(spec, POSITIVE)[0])
    assert only_positive["score/positive_fraction"] == 1.0 and only_positive["score/reward"] > 0.5


@pytest.mark.parametrize("aggregate", ["max", "mean"])
def test_toxicity_prefers_the_clean_sentence(aggregate: str) -> None:
    pytest.importorskip("profanity_check", reason="pip install alt-profanity-check")
    spec = get_task("toxicity").build(0.1, {"aggregate": aggregate}, ["you are"])
    clean = ["The weather is lovely today. We walked along the river.",
             "Thank you for your kind help with the garden today."]
    offensive = ["Shut up, you stupid fucking idiot.", "You are a worthless piece of shit."]
    features, log_ratio = score_like_the_trainer(spec, clean + offensive)
    toxicity = -features["reward"]  # the target reads reward = -toxicity
    assert (toxicity[:2] < 0.5).all() and (toxicity[2:] > 0.5).all(), toxicity
    assert log_ratio[:2].min() > log_ratio[2:].max() + 1.0  # P = a exp(-tox / 0.1)
    assert (log_ratio <= 0).all()  # a penalty only: toxicity is in [0, 1]
    metrics = spec.metrics(features)
    assert metrics["score/toxic_fraction"] == 0.5
    assert metrics["score/toxicity"] == pytest.approx(float(toxicity.mean()))
    assert spec.metrics(score_like_the_trainer(spec, clean)[0])["score/toxic_fraction"] == 0.0


def test_code_keeps_the_compiling_function_only() -> None:
    prompt = 'def add_one(x):\n    """Return x plus one."""\n    '
    spec = get_task("code").build(0.1, {}, [prompt])
    good, broken = "return x + 1\n", "return (x +\n"
    features, log_ratio = score_like_the_trainer(spec, [good, broken], [prompt, prompt])
    assert features["b"].tolist() == [1.0, 0.0]
    assert log_ratio[0] == 0.0 and log_ratio[1] == -math.inf  # P = a b
    assert spec.metrics(features)["score/compile_rate"] == 0.5
    # with style=W the cleaner of two compiling bodies is preferred
    styled = get_task("code").build(0.1, {"style": "1"}, [prompt])
    features, log_ratio = score_like_the_trainer(styled, ["y = x + 1\n    return y\n", "y=x+1\n    return  y\n"],
                                                 [prompt, prompt])
    assert features["b"].tolist() == [1.0, 1.0] and features["pep8"][1] > features["pep8"][0]
    assert log_ratio[0] > log_ratio[1]


def test_lexical_keeps_texts_with_the_word_only() -> None:
    spec = get_task("lexical").build(0.1, {"word": "amazing"}, ["The view was"])
    features, log_ratio = score_like_the_trainer(spec, ["truly amazing, I loved it", "quite dull"])
    assert features["b"].tolist() == [1.0, 0.0]
    assert log_ratio[0] == 0.0 and log_ratio[1] == -math.inf
    assert spec.metrics(features) == {"score/constraint_satisfaction": 0.5}


def _repeat_sampler(texts: list[str], prompts: list[str]):
    def sample(n: int) -> tuple[list[str], list[str]]:
        return [texts[i % len(texts)] for i in range(n)], [prompts[(i // len(texts)) % len(prompts)] for i in range(n)]

    return sample


def test_gender_fitted_target_prefers_biographies_of_women() -> None:
    she = "She was born in Lyon. Her mother was a teacher, and she studied physics."
    he = "He was born in Ohio. His father was a farmer; he became a lawyer."
    spec = get_task("gender").build(0.1, {"moment": "0.5"}, ["bio:"])
    features, log_ratio = score_like_the_trainer(spec, [she, he])
    assert features["female"].tolist() == [1.0, 0.0]
    assert log_ratio.tolist() == [0.0, 0.0]  # before the fit lambda = 0: P = a
    assert spec.metrics(features)["score/female_fraction"] == 0.5
    # base rate 1/4 below the moment 0.5: the fitted lambda is positive, the woman's biography preferred
    fitted, fit = spec.fitted(_repeat_sampler([she, he, he, he], spec.prompts), 40)
    assert fit.details["lambdas"]["female"] > 0
    _, log_ratio = score_like_the_trainer(fitted, [she, he])
    assert log_ratio[0] > log_ratio[1] + 1.0
    # and a moment below the base rate turns it around
    fewer, _ = get_task("gender").build(0.1, {"moment": "0.1"}, ["bio:"]).fitted(
        _repeat_sampler([she, he, he, he], ["bio:"]), 40)
    _, log_ratio = score_like_the_trainer(fewer, [she, he])
    assert log_ratio[0] < log_ratio[1]


def test_professions_fitted_target_prefers_under_represented_fields() -> None:
    texts = {"science": "She is a physicist who worked in a laboratory on quantum theory.",
             "art": "He is a painter and sculptor whose paintings hang in a gallery.",
             "sports": "A tennis player who won an Olympic medal and later became a coach.",
             "business": "An entrepreneur and investor, she founded a software company and served as CEO.",
             "none": "He was born in 1950 and lived in a small town near the river."}
    # base rate 0.2 each; ask for more science (0.4) and less art (0.1)
    options = {"science": "0.4", "art": "0.1", "sports": "0.2", "business": "0.2"}
    spec = get_task("professions").build(0.1, options, ["bio:"])
    features, _ = score_like_the_trainer(spec, list(texts.values()))
    assert {f: features[f].tolist() for f in ("science", "art", "sports", "business")} == {
        "science": [1, 0, 0, 0, 0], "art": [0, 1, 0, 0, 0], "sports": [0, 0, 1, 0, 0], "business": [0, 0, 0, 1, 0]}
    fitted, _ = spec.fitted(_repeat_sampler(list(texts.values()), spec.prompts), 50)
    _, log_ratio = score_like_the_trainer(fitted, list(texts.values()))
    science, art, sports, business, none = log_ratio.tolist()
    assert science > sports > art and science > none > art
    assert sports == pytest.approx(business)
    metrics = fitted.metrics(features)
    assert metrics["score/science_fraction"] == 0.2 and metrics["score/moment_error"] == pytest.approx(0.2)
