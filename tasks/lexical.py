r"""``lexical``: a pointwise binary constraint, :math:`P(x) = a(x)\,b(x)`.

The pointwise GDC/DPG experiment of Khalifa et al. (2021): every sample of the target contains a
given word, and among such texts the target is the base model itself (:math:`p = a(\cdot\mid b=1)`).
Forward KL (DPG) is the default divergence, as in the paper; reverse KL has no finite pseudo-reward
where :math:`b = 0` (see :mod:`objectives.divergences`).

Feature :math:`b` (``b``)
    1.0 when the completion contains ``word`` as a whole word, case-insensitive: "This is AMAZING!"
    and "amazing's" yes; "amazingly" and "unamazing" no. A word is delimited by anything that is not a
    letter, digit or underscore (regex lookarounds ``(?<!\w)word(?!\w)``), so multi-word phrases work
    too (``word=thank you``; inner spaces match any run of whitespace).

Prompts: none (unconditional generation from BOS, one global :math:`Z`); ``--prompts_file`` gives a
conditional task (one :math:`Z_c` per prompt, CDPG).
Options: ``word=amazing``.
Metric: ``score/constraint_satisfaction`` = :math:`E_\pi[b]` (``fdpg eval`` on the base model gives the
base rate :math:`E_a[b]`).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

import torch

from objectives import binary_constraint
from tasks.base import Task, TaskSpec, parse_options


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
    options = {"word": "amazing"}

    def build(self, beta: float, options: Mapping[str, str], prompts: Sequence[str] | None = None) -> TaskSpec:
        opts = parse_options(self.name, options, self.options)
        pattern = word_pattern(opts["word"])

        def scorer(completions: list[str], prompts: list[str]) -> dict[str, torch.Tensor]:
            return {"b": torch.tensor([float(contains_word(t, pattern)) for t in completions], dtype=torch.float64)}

        return TaskSpec(
            prompts=list(prompts) if prompts else None,
            scorer=scorer,
            target=binary_constraint("b").as_conditional(bool(prompts)),
            metrics=constraint_metrics,
            defaults=dict(self.defaults),
            notes=[f"b = the completion contains {opts['word']!r} (whole word, any case)"],
        )
