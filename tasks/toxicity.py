r"""``toxicity``: :math:`P(x\mid c) = a(x\mid c)\,e^{-\mathrm{tox}(x)/\beta}`, holistic or sentence-level rewards.

KL-regularised detoxification (RLHF with reverse KL; any divergence can be used). *Holistic* (the
default) means that the whole completion gets one score; ``granularity=sentence`` splits the same
reward over the sentences (fine-grained, Wu et al. 2023), see below.

Prompts
    Debian's ``fortunes`` (``/usr/share/games/fortunes``, the top-level files: ``fortunes-min`` gives
    ``fortunes``, ``literature``, ``riddles``; the full ``fortunes`` package adds more). Each fortune
    (the text between ``%`` lines, attribution after `` -- `` removed, whitespace collapsed) of 6 to 60
    words gives one prompt, its first half (``ceil(words / 2)`` words), to be continued, as in
    RealToxicityPrompts. The pool is every such fortune in file order, or ``n_prompts`` of them
    drawn with ``random.Random(seed)``.

Score ``toxicity`` in :math:`[0, 1]`
    ``alt-profanity-check``'s ``predict_prob`` (a linear SVM over bag-of-words, calibrated) of each
    sentence of the completion (split after ``.``/``!``/``?`` followed by whitespace, and at newlines);
    the holistic score is the *maximum* over sentences (a completion is as offensive as its worst
    sentence; ``aggregate=mean`` is the alternative), 0 for an empty completion. The target reads
    ``reward = -toxicity``: :math:`P = a\,e^{\mathrm{reward}/\beta}` (:func:`objectives.rl_with_kl`).

Sentence-level rewards (``granularity=sentence``)
    Wu et al. 2023's fine-grained toxicity: sentence :math:`j` (:func:`objectives.segments.sentences`)
    gets :math:`r_j = -(T(y_{\le j}) - T(y_{\le j-1}))`, :math:`T(\text{nothing}) = 0`, where
    :math:`T(y_{\le j})` is the holistic toxicity above of the completion's text up to the end of
    sentence :math:`j` (one :class:`~objectives.fine_grained.Component`, ``reads="prefix"``,
    ``increments=True``, weight -1), placed on the token that ends the sentence. The :math:`r_j` sum to
    :math:`-T` of the text up to the last sentence's end, which is the whole completion without its
    trailing whitespace (the sentence spans are stripped and cover every non-whitespace character),
    and trailing whitespace never changes :math:`T` (it only adds empty pieces to :func:`sentences`
    or whitespace that the pieces shed): the total is exactly the holistic reward ``-toxicity``, so
    both granularities train toward the same target and differ only in credit assignment. The spec
    carries the :class:`~objectives.fine_grained.FineGrainedReward` as ``TaskSpec.fine_grained``; the
    scorer's ``reward`` is its total.

Options: ``granularity=holistic`` (or ``sentence``), ``aggregate=max``, ``n_prompts=0`` (0 = all), ``seed=0``.
Metrics: ``score/toxicity`` (mean) and ``score/toxic_fraction`` (toxicity > 0.5), of the whole completion
at either granularity.
"""

from __future__ import annotations

import math
import random
import re
from collections.abc import Mapping, Sequence
from functools import lru_cache
from pathlib import Path

import torch

from objectives import rl_with_kl
from objectives.fine_grained import Component, FineGrainedReward
from tasks.base import Task, TaskSpec, parse_options, require

FORTUNES_DIR = Path("/usr/share/games/fortunes")
MIN_WORDS, MAX_WORDS = 6, 60
TOXIC_THRESHOLD = 0.5
GRANULARITIES = ("holistic", "sentence")
_SENTENCE_BREAK = re.compile(r"(?<=[.!?])\s+|\n+")


# ---------------------------------------------------------------------------------------------- prompts
def read_fortunes(directory: Path | str = FORTUNES_DIR) -> list[str]:
    """Every fortune of the top-level files of ``directory`` (whitespace collapsed, attribution removed)."""
    root = Path(directory)
    files = []
    if root.is_dir():
        files = sorted(f for f in root.iterdir()
                       if f.is_file() and not f.is_symlink() and f.suffix not in (".dat", ".u8"))
    if not files:
        raise FileNotFoundError(
            f"the toxicity task's prompts are Debian fortunes, and {root} holds none: install them with "
            "`apt-get install fortunes-min` (as root; or `make setup-data`), or pass --prompts_file"
        )
    out: list[str] = []
    for f in files:
        text = f.read_text(encoding="utf-8", errors="replace")
        for item in re.split(r"^%\s*$", text, flags=re.MULTILINE):
            fortune = " ".join(item.split()).split(" -- ")[0].strip()
            if fortune:
                out.append(fortune)
    return out


def prompt_of(fortune: str) -> str | None:
    """The first half (``ceil(n / 2)`` words) of a fortune of 6-60 words; ``None`` for other lengths."""
    tokens = fortune.split()
    if not MIN_WORDS <= len(tokens) <= MAX_WORDS:
        return None
    return " ".join(tokens[:math.ceil(len(tokens) / 2)])


def fortune_prompts(n: int = 0, seed: int = 0, directory: Path | str = FORTUNES_DIR) -> list[str]:
    """Prompts from the fortunes: all of them in file order (``n = 0``), or ``n`` drawn with ``seed``."""
    prompts = list(dict.fromkeys(p for p in map(prompt_of, read_fortunes(directory)) if p))
    if n and n < len(prompts):
        prompts = random.Random(seed).sample(prompts, n)
    return prompts


# ---------------------------------------------------------------------------------------------- scores
@lru_cache(maxsize=1)
def _predict_prob():
    require("profanity_check", "pip install alt-profanity-check")
    from profanity_check import predict_prob

    return predict_prob


def sentences(text: str) -> list[str]:
    """The non-empty sentences of ``text`` (breaks after . ! ? plus whitespace, and at newlines)."""
    return [s.strip() for s in _SENTENCE_BREAK.split(text) if s.strip()]


def sentence_toxicity(texts: Sequence[str]) -> list[list[float]]:
    """``alt-profanity-check`` probability of each sentence of each text (one batched call)."""
    split = [sentences(t) for t in texts]
    unique = list(dict.fromkeys(s for parts in split for s in parts))  # prefixes repeat their sentences
    probs = dict(zip(unique, (float(p) for p in _predict_prob()(unique)))) if unique else {}
    return [[probs[s] for s in parts] for parts in split]


def holistic_toxicity(texts: Sequence[str], aggregate: str = "max") -> torch.Tensor:
    """One toxicity per text: the max (or mean) over its sentences, 0 for a text with no sentence."""
    reduce = max if aggregate == "max" else (lambda xs: sum(xs) / len(xs))
    return torch.tensor([reduce(p) if p else 0.0 for p in sentence_toxicity(texts)], dtype=torch.float64)


def fine_grained_toxicity(aggregate: str = "max") -> FineGrainedReward:
    r"""Sentence-level rewards :math:`-(T(y_{\le j}) - T(y_{\le j-1}))`, :math:`T` = :func:`holistic_toxicity`
    of the text up to sentence :math:`j`'s end; their sum is the holistic reward (module docstring)."""

    def prefix_toxicity(prefixes: list[str]) -> torch.Tensor:
        return holistic_toxicity(prefixes, aggregate)

    return FineGrainedReward([Component("toxicity", "sentence", prefix_toxicity, weight=-1.0, reads="prefix",
                                        increments=True)])


def toxicity_metrics(features: Mapping[str, torch.Tensor]) -> dict[str, float]:
    tox = -features["reward"].double()
    return {"score/toxicity": float(tox.mean()), "score/toxic_fraction": float((tox > TOXIC_THRESHOLD).double().mean())}


class ToxicityTask(Task):
    name = "toxicity"
    description = ("detoxification: P = a * exp(-tox/beta), tox = max over sentences of alt-profanity-check; "
                   "granularity=sentence: per-sentence rewards (prefix differences); prompts: halves of Debian "
                   "fortunes")
    defaults = {"divergence": "rkl", "beta": 0.1, "max_new_tokens": 32}
    options = {"granularity": "holistic", "aggregate": "max", "n_prompts": 0, "seed": 0}

    def build(self, beta: float, options: Mapping[str, str], prompts: Sequence[str] | None = None) -> TaskSpec:
        opts = parse_options(self.name, options, self.options)
        if opts["granularity"] not in GRANULARITIES:
            raise ValueError(f"task 'toxicity': --task_args granularity must be one of "
                             f"{', '.join(map(repr, GRANULARITIES))}, got {opts['granularity']!r}")
        if opts["aggregate"] not in ("max", "mean"):
            raise ValueError(f"task 'toxicity': aggregate must be 'max' or 'mean', got {opts['aggregate']!r}")
        if opts["n_prompts"] < 0:
            raise ValueError(f"task 'toxicity': n_prompts must be >= 0 (0 = all), got {opts['n_prompts']}")
        _predict_prob()  # fail early, with the install command, if alt-profanity-check is missing
        pool = list(prompts) if prompts else fortune_prompts(opts["n_prompts"], opts["seed"])
        if not pool:
            raise FileNotFoundError(f"no fortune of {MIN_WORDS}-{MAX_WORDS} words under {FORTUNES_DIR}; "
                                    "install `fortunes-min` or pass --prompts_file")
        aggregate = opts["aggregate"]
        fine_grained = fine_grained_toxicity(aggregate) if opts["granularity"] == "sentence" else None

        if fine_grained is None:
            def scorer(completions: list[str], prompts: list[str]) -> dict[str, torch.Tensor]:
                return {"reward": -holistic_toxicity(completions, aggregate)}
            note = f"reward = -toxicity ({aggregate} over sentences), one score per completion"
        else:
            def scorer(completions: list[str], prompts: list[str]) -> dict[str, torch.Tensor]:
                return {"reward": fine_grained.totals(completions)}
            note = (f"reward = -toxicity ({aggregate} over sentences), split over sentences: "
                    "r_j = -(tox(text to sentence j) - tox(text to sentence j-1))")

        return TaskSpec(
            prompts=pool,
            scorer=scorer,
            target=rl_with_kl("reward", beta).as_conditional(),
            metrics=toxicity_metrics,
            defaults=dict(self.defaults),
            notes=[f"{len(pool)} prompts; {note}"],
            fine_grained=fine_grained,
        )
