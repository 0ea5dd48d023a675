r"""``fine_grained``: three reward models at three densities (Wu et al. 2023), :math:`P = a\,e^{r(x)/\beta}`.

In the spirit of Wu et al.'s relevance / factuality / completeness rewards, on offline scorers (no model
download). The reward of a completion :math:`y` is the :class:`~objectives.fine_grained.FineGrainedReward`

.. math::  r(y) = w_s \sum_{\text{sentences } s} \mathrm{vader}(s)
                 \;-\; w_r \sum_{\text{sub-sentences } u} \mathrm{rep}(u)
                 \;+\; w_c\,\mathrm{complete}(y),

each term's segment rewards placed on the token that ends the segment (``TaskSpec.fine_grained``); the
scorer's ``reward`` is its total. The target is :math:`P(x\mid c) = a(x\mid c)\exp(r(x)/\beta)`
(:func:`objectives.rl_with_kl`), conditional on the prompt.

Components
    ``sentiment`` (sentence level, :func:`objectives.segments.sentences`, reads the sentence): VADER's
    compound polarity of each sentence, in :math:`[-1, 1]` (:func:`tasks.sentiment.vader_compound`).

    ``repetition`` (sub-sentence level, :func:`objectives.segments.sub_sentences`, reads the prefix): the
    number of the completion's word ``ngram``-grams (default trigrams) that *end* in the sub-sentence and
    already occurred, at an earlier position, in the completion. Words are the lowercased runs of word
    characters (``\w+``, with inner apostrophes: ``don't``), punctuation ignored, taken across sentence
    boundaries; overlapping occurrences count (``"the the the the"`` has two trigrams, the second repeats
    the first). It is computed causally as the increase of the prefix count :math:`S(y_{\le e})` (repeated
    n-grams of the text up to the segment's end; ``increments=True``), so a repeated phrase is penalised
    on the sub-sentence where the repetition occurs, never on the first occurrence, and the segment
    scores sum to :math:`S(y)`. It enters with weight :math:`-w_r`: a positive ``w_repetition`` is a
    penalty per repeated n-gram.

    ``completeness`` (holistic, :func:`objectives.segments.whole_text`): 1 if the completion, stripped of
    whitespace, ends a sentence: its last characters are terminal punctuation ``.``, ``!``, ``?`` or
    ``…``, optionally followed by closing quotes or brackets (:data:`objectives.segments.CLOSERS`:
    ``"' ” ’ » ) ] }`` ...); 0 otherwise (an empty completion included). It lands on the last token.

Options: ``w_sentiment=1.0``, ``w_repetition=0.5``, ``w_completeness=0.3`` (any finite numbers),
``ngram=3`` (the n of the repetition n-grams, >= 1), ``granularity=fine`` (or ``holistic``: the same total
:math:`r(y)` as one score on the last token, the holistic reward that Wu et al. compare against; the scores,
metrics and target are unchanged, only where the reward sits on the tokens, which matters to PPO and to f-DPG
with ``--token_credit``).
Prompts: the sentiment task's (:data:`tasks.sentiment.DEFAULT_PROMPTS`).
Features: ``reward`` (the total) and the unweighted component totals ``sentiment`` (sum over sentences),
``repetition`` (repeated n-grams) and ``completeness`` (0/1), so that
``reward = w_sentiment * sentiment - w_repetition * repetition + w_completeness * completeness``.
Metrics: ``score/reward``, ``score/sentiment``, ``score/repetition``, ``score/completeness`` (batch means).
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence

import torch

from objectives import rl_with_kl
from objectives.fine_grained import Component, FineGrainedReward
from objectives.segments import CLOSERS
from tasks.base import Task, TaskSpec, parse_options
from tasks.sentiment import DEFAULT_PROMPTS, _vader, vader_compound

COMPONENTS = ("sentiment", "repetition", "completeness")
_WORD = re.compile(r"\w+(?:['’]\w+)*")
_COMPLETE = re.compile(rf"[.!?…][{re.escape(CLOSERS)}]*\Z")


def words(text: str) -> list[str]:
    """The lowercased words of ``text`` (runs of word characters with inner apostrophes; punctuation dropped)."""
    return [w.lower() for w in _WORD.findall(text)]


def repeated_ngrams(text: str, n: int = 3) -> int:
    """The number of word n-gram occurrences of ``text`` whose n-gram occurred at an earlier position."""
    tokens = words(text)
    seen: set[tuple[str, ...]] = set()
    count = 0
    for i in range(len(tokens) - n + 1):
        gram = tuple(tokens[i:i + n])
        if gram in seen:
            count += 1
        else:
            seen.add(gram)
    return count


def is_complete(text: str) -> float:
    """1.0 if ``text`` (stripped) ends with ``. ! ? …`` possibly followed by closing quotes/brackets, else 0.0."""
    return 1.0 if _COMPLETE.search(text.strip()) else 0.0


def components(weights: Mapping[str, float], n: int = 3) -> list[Component]:
    """The three components, with the :class:`~objectives.fine_grained.Component` weights ``weights``
    (``{"sentiment": ..., "repetition": ..., "completeness": ...}``; the task passes ``-w_repetition``)."""

    def repetition(prefixes: list[str]) -> list[float]:
        return [float(repeated_ngrams(p, n)) for p in prefixes]

    def completeness(texts: list[str]) -> list[float]:
        return [is_complete(t) for t in texts]

    return [
        Component("sentiment", "sentence", vader_compound, weight=weights["sentiment"]),
        Component("repetition", "sub_sentence", repetition, weight=weights["repetition"], reads="prefix",
                  increments=True),
        Component("completeness", "whole", completeness, weight=weights["completeness"]),
    ]


def fine_grained_reward(w_sentiment: float = 1.0, w_repetition: float = 0.5, w_completeness: float = 0.3,
                        n: int = 3) -> FineGrainedReward:
    """The task's :class:`~objectives.fine_grained.FineGrainedReward` (module docstring)."""
    weights = {"sentiment": w_sentiment, "repetition": -w_repetition, "completeness": w_completeness}
    return FineGrainedReward(components(weights, n))


def holistic_reward(reward: FineGrainedReward) -> FineGrainedReward:
    """The total of ``reward`` as one holistic component (density ``whole``: on the last token), same scores."""

    def total(texts: list[str]) -> torch.Tensor:
        return reward.totals(texts)

    return FineGrainedReward([Component("reward", "whole", total, weight=1.0)])


GRANULARITIES = ("fine", "holistic")


def fine_grained_metrics(features: Mapping[str, torch.Tensor]) -> dict[str, float]:
    out = {"score/reward": float(features["reward"].double().mean())}
    for name in COMPONENTS:
        if name in features:
            out[f"score/{name}"] = float(features[name].double().mean())
    return out


class FineGrainedTask(Task):
    name = "fine_grained"
    description = ("fine-grained rewards (Wu et al.): P = a * exp(r/beta), r = w_s * VADER per sentence "
                   "- w_r * repeated word trigrams per sub-sentence + w_c * (ends a sentence); sentiment prompts")
    defaults = {"divergence": "rkl", "beta": 0.1, "max_new_tokens": 32}
    options = {"w_sentiment": 1.0, "w_repetition": 0.5, "w_completeness": 0.3, "ngram": 3, "granularity": "fine"}

    def build(self, beta: float, options: Mapping[str, str], prompts: Sequence[str] | None = None) -> TaskSpec:
        opts = parse_options(self.name, options, self.options)
        weights = {name: opts[f"w_{name}"] for name in COMPONENTS}
        for name, value in weights.items():
            if not math.isfinite(value):
                raise ValueError(f"task {self.name!r}: --task_args w_{name} must be a finite number, got {value!r}")
        if opts["ngram"] < 1:
            raise ValueError(f"task {self.name!r}: --task_args ngram must be >= 1 (words per n-gram), "
                             f"got {opts['ngram']}")
        if opts["granularity"] not in GRANULARITIES:
            raise ValueError(f"task {self.name!r}: --task_args granularity must be one of "
                             f"{', '.join(map(repr, GRANULARITIES))}, got {opts['granularity']!r}")
        _vader()  # fail early, with the install command, if VADER is missing
        n = opts["ngram"]
        reward = fine_grained_reward(weights["sentiment"], weights["repetition"], weights["completeness"], n)

        def scorer(completions: list[str], prompts: list[str]) -> dict[str, torch.Tensor]:
            # One scoring of the segments: the total, and each component's unweighted total (metric-only features).
            total, parts = reward.totals_by_component(completions)
            return {"reward": total, **parts}

        return TaskSpec(
            prompts=list(prompts) if prompts else list(DEFAULT_PROMPTS),
            scorer=scorer,
            target=rl_with_kl("reward", beta).as_conditional(),
            metrics=fine_grained_metrics,
            defaults=dict(self.defaults),
            notes=[f"reward = {weights['sentiment']:g} * VADER per sentence - {weights['repetition']:g} * repeated "
                   f"word {n}-grams per sub-sentence + {weights['completeness']:g} * completeness"],
            fine_grained=reward if opts["granularity"] == "fine" else holistic_reward(reward),
        )

