r"""``professions``: several distributional constraints, :math:`P = a\,e^{\sum_i\lambda_i\phi_i}`.

The multi-constraint GDC experiment of Khalifa et al. (2021): biographies whose topics are spread over
four professional fields in prescribed proportions.

Prompts
    ``DEFAULT_PROMPTS``: neutral biography prompts that name no field ("Here is a short biography of a
    famous person:", ...).

Features :math:`\phi_i \in \{0, 1\}`: ``science``, ``art``, ``sports``, ``business``
    1 when the completion contains at least one word of the field's list in ``KEYWORDS`` (whole
    lowercase tokens, :func:`tasks.constraints.words`); a biography may belong to several fields or
    none. The lists hold unambiguous field nouns and adjectives (scientist, physics, laboratory; painter,
    novel, album; football, olympic, coach; entrepreneur, company, investor; ...), not generic words
    such as "university", "director" or "president".

Target and :math:`\lambda`
    Fitted before training on base samples (``fdpg train --fit_samples N``; the task suggests
    ``FIT_SAMPLES`` = 512; per-prompt normalisers, see :mod:`tasks.constraints`). Moments come from
    the options ``science=0.25,art=0.25,sports=0.25,business=0.25`` (the default: each field in a
    quarter of the biographies); a moment ``none`` leaves that feature unconstrained (still scored
    and reported). Base rates of a field far below its moment give a small effective sample size:
    raise ``--fit_samples``. On the embedded SmolLM2-135M (512 base samples of 48 tokens) the base
    rates are science 5.3%, art 15.4%, sports 4.3%, business 8.2%; lambda = (1.90, 0.82, 2.20, 1.38),
    ESS 115 of 512.

Options: the four moments, ``conditional=true``.
Metrics: ``score/<field>_fraction`` (:math:`E_\pi[\phi_i]`) for the four fields, and
``score/moment_error`` (the largest absolute gap to the constrained moments).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from objectives import exponential_family
from tasks.base import Task, TaskSpec, parse_options
from tasks.constraints import contains_any, moment_fit_hook

DEFAULT_PROMPTS = [
    "Here is a short biography of a famous person:\n",
    "Here is a short biography:\n",
    "Write a short biography of a well-known person.\n",
    "This is the life story of a remarkable person:\n",
]

KEYWORDS: dict[str, frozenset[str]] = {
    "science": frozenset("""
        science sciences scientist scientists scientific physics physicist physicists chemistry chemist chemists
        biology biologist biologists mathematics mathematician mathematicians astronomy astronomer astronomers
        geology geologist neuroscience neuroscientist genetics geneticist laboratory laboratories lab experiment
        experiments theorem theory researcher researchers phd physician physicians medicine medical
        engineering engineer engineers inventor invention
    """.split()),
    "art": frozenset("""
        art arts artist artists artistic painter painters painting paintings sculptor sculpture sculptures
        music musician musicians composer composers singer singers songwriter song songs album albums band
        actor actress actors actresses film films movie movies poet poets poetry poem poems novelist novel
        novels writer writers author authors dancer dancers ballet theatre theater opera photographer
        photography gallery galleries
    """.split()),
    "sports": frozenset("""
        sport sports athlete athletes athletic football soccer basketball baseball tennis golf golfer cricket
        hockey rugby boxing boxer swimmer swimming cyclist cycling marathon olympic olympics championship
        championships champion champions tournament tournaments league medal medals coach coaches player
        players team teams nfl nba fifa racing runner sprinter wrestler
    """.split()),
    "business": frozenset("""
        business businesses businessman businessmen businesswoman businesswomen entrepreneur entrepreneurs
        entrepreneurial company companies corporation corporations corporate ceo founder founders startup
        startups investor investors investment investments banker bankers banking finance financial
        executive executives economist economics industry industries industrialist market markets marketing
        retail commerce firm firms shareholder shareholders billionaire millionaire
    """.split()),
}
FIELDS = tuple(KEYWORDS)
FIT_SAMPLES = 512


def field_features(text: str) -> dict[str, float]:
    r""":math:`\phi_i` of ``text`` for each field (1.0 when it contains one of the field's words)."""
    return {name: float(contains_any(text, vocab)) for name, vocab in KEYWORDS.items()}


def professions_scorer(completions: list[str], prompts: list[str]) -> dict[str, torch.Tensor]:
    rows = [field_features(t) for t in completions]
    return {name: torch.tensor([r[name] for r in rows], dtype=torch.float64) for name in FIELDS}


class ProfessionsTask(Task):
    name = "professions"
    description = ("biographies over four fields: P = a * exp(sum_i lambda_i phi_i), phi = science/art/sports/"
                   "business keywords, lambda fitted to the moments (0.25 each)")
    defaults = {"divergence": "fkl", "max_new_tokens": 48}
    options = {**{f: "0.25" for f in FIELDS}, "conditional": True}

    def build(self, beta: float, options: Mapping[str, str], prompts: Sequence[str] | None = None) -> TaskSpec:
        opts = parse_options(self.name, options, self.options)
        moments: dict[str, float] = {}
        for f in FIELDS:
            raw = str(opts[f]).strip().lower()
            if raw in ("none", "-", ""):
                continue
            try:
                value = float(raw)
            except ValueError:
                raise ValueError(f"task 'professions': {f}={opts[f]!r} must be a number in (0, 1) or 'none'") from None
            if not 0 < value < 1:
                raise ValueError(f"task 'professions': {f}={value} must be in (0, 1) (or 'none': unconstrained)")
            moments[f] = value
        if not moments:
            raise ValueError("task 'professions': every moment is 'none'; constrain at least one field")
        conditional = opts["conditional"]

        def metrics(features: Mapping[str, torch.Tensor]) -> dict[str, float]:
            out = {f"score/{f}_fraction": float(features[f].double().mean()) for f in FIELDS if f in features}
            gaps = [abs(out[f"score/{f}_fraction"] - m) for f, m in moments.items() if f"score/{f}_fraction" in out]
            if gaps:
                out["score/moment_error"] = max(gaps)
            return out

        return TaskSpec(
            prompts=list(prompts) if prompts else list(DEFAULT_PROMPTS),
            scorer=professions_scorer,
            target=exponential_family(list(moments)).as_conditional(conditional),
            metrics=metrics,
            defaults=dict(self.defaults),
            notes=[f"lambda is fitted on {512} base samples before training (moments {moments})"],
            fit=moment_fit_hook(professions_scorer, moments, FIT_SAMPLES, conditional, self.name),
            fit_samples=FIT_SAMPLES,
        )
