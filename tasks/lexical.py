r"""``lexical``: a pointwise binary constraint, :math:`P(x\mid c) = a(x\mid c)\,b(x)`.

The pointwise GDC/DPG experiment of Khalifa et al. (2021): every sample of the target contains a
given word, and among such texts the target is the base model itself (:math:`p = a(\cdot\mid b=1)`).
Forward KL (DPG) is the default divergence, as in the paper; reverse KL has no finite pseudo-reward
where :math:`b = 0` (see :mod:`objectives.divergences`).

Feature :math:`b` (``b``)
    1.0 when the completion contains ``word`` as a whole word, case-insensitive: "This is AMAZING!"
    and "amazing's" yes; "amazingly" and "unamazing" no. A word is delimited by anything that is not a
    letter, digit or underscore (regex lookarounds ``(?<!\w)word(?!\w)``), so multi-word phrases work
    too (``word=thank you``; inner spaces match any run of whitespace).

Prompts
    ``DEFAULT_PROMPTS``, sentence openings where an adjective comes next ("The concert last night
    was"), one :math:`Z_c` per prompt (CDPG); ``--prompts_file`` replaces them. On the embedded
    SmolLM2-135M, 10 of 96 base samples of 32 tokens contain "amazing". ``unconditional=true``
    generates from BOS with one global :math:`Z` as in the GDC paper, but there the model almost never
    writes the word (0 of 96 samples; nor with open prompts such as "Describe your favourite meal."),
    and forward KL, which learns only from samples with :math:`b = 1`, would get no signal.
Options: ``word=amazing``, ``unconditional=false``.
Metric: ``score/constraint_satisfaction`` = :math:`E_\pi[b]` (``fdpg eval`` on the base model gives the
base rate :math:`E_a[b]`).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

import torch

from objectives import binary_constraint
from tasks.base import Task, TaskSpec, parse_options

DEFAULT_PROMPTS = [
    "The concert last night was",
    "Honestly, the food at that new place is",
    "I just got back from my trip to Japan and it was",
    "The view from the top of the mountain was",
    "My new phone is",
    "Our weekend at the beach was",
]


def word_pattern(word: str) -> re.Pattern[str]:
    """The whole-word, case-insensitive pattern of ``word`` (inner whitespace matches any whitespace)."""
    parts = word.strip().split()
    if not parts:
        raise ValueError("task 'lexical': word must not be empty")
    return re.compile(r"(?<!\w)" + r"\s+".join(map(re.escape, parts)) + r"(?!\w)", re.IGNORECASE)


def contains_word(text: str, word: str | re.Pattern[str]) -> bool:
    """Whether ``text`` contains ``word`` as a whole word (case-insensitive)."""
    pattern = word if isinstance(word, re.Pattern) else word_pattern(word)
    return pattern.search(text) is not None


def constraint_metrics(features: Mapping[str, torch.Tensor]) -> dict[str, float]:
    return {"score/constraint_satisfaction": float(features["b"].double().mean())}


class LexicalTask(Task):
    name = "lexical"
    description = "pointwise constraint: P = a * b, b = the completion contains a word (default 'amazing')"
    defaults = {"divergence": "fkl", "max_new_tokens": 32}
    options = {"word": "amazing", "unconditional": False}

    def build(self, beta: float, options: Mapping[str, str], prompts: Sequence[str] | None = None) -> TaskSpec:
        opts = parse_options(self.name, options, self.options)
        pattern = word_pattern(opts["word"])

        def scorer(completions: list[str], prompts: list[str]) -> dict[str, torch.Tensor]:
            return {"b": torch.tensor([float(contains_word(t, pattern)) for t in completions], dtype=torch.float64)}

        if prompts:
            pool: list[str] | None = list(prompts)
        else:
            pool = None if opts["unconditional"] else list(DEFAULT_PROMPTS)
        return TaskSpec(
            prompts=pool,
            scorer=scorer,
            target=binary_constraint("b").as_conditional(pool is not None),
            metrics=constraint_metrics,
            defaults=dict(self.defaults),
            notes=[f"b = the completion contains {opts['word']!r} (whole word, any case)"],
        )
