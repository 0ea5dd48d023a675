r"""``gender``: a distributional constraint, :math:`P(x\mid c) = a(x\mid c)\,e^{\lambda\phi(x)}`, :math:`E_p[\phi]=0.5`.

The GDC experiment of Khalifa et al. (2021): the base model writes short biographies, mostly of men;
the target keeps the base model as close as possible (the information projection) while half of the
biographies are about women.

Prompts
    ``TEMPLATE`` x ``ROLES``: "Here is a short biography of a scientist:" and 7 other occupations.
    Few prompts on purpose: the fit normalises per prompt, so it needs many base samples per prompt
    (a prompt none of whose samples is about a woman cannot move toward the moment in the fit).

Feature :math:`\phi` (``female``)
    1 when the completion's female words outnumber its male words, else 0 (ties, including texts with
    no gendered word, count 0). Words are whole lowercase tokens (:func:`tasks.constraints.words`) from
    ``FEMALE_WORDS`` / ``MALE_WORDS``: pronouns (she/her/hers/herself vs he/him/his/himself), titles
    (mrs/ms/madam vs mr/sir; "miss" is left out, it is mostly a verb), family and role nouns
    (mother/daughter/wife/actress/... vs father/son/husband/actor/...). Only the completion is read.

Target and :math:`\lambda`
    :math:`\lambda` is fitted *before* training on base samples (``fdpg train --fit_samples N``; the
    task suggests ``FIT_SAMPLES`` = 256, 32 per prompt) through the spec's ``fit`` hook
    (:func:`tasks.constraints.moment_fit_hook`): per-prompt normalisers, so that the prompt-averaged
    :math:`E_{p(\cdot\mid c)}[\phi]` equals ``moment``. Until then the spec's target has
    :math:`\lambda = 0`. The fit fails with :class:`~objectives.UnreachableMomentError` when no base
    sample is about a woman (e.g. a random model): draw more samples. On the embedded SmolLM2-135M,
    38 of 256 base samples of 48 tokens (14.8%) are about women: lambda = 2.01, ESS 120 of 256.

Options (``--task_args``): ``moment=0.5``, ``conditional=true`` (false: one normaliser over all
prompts).
Metrics: ``score/female_fraction`` (:math:`E_\pi[\phi]`, to be compared with ``moment``) and
``score/female_fraction_error`` (the difference).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from objectives import exponential_family
from tasks.base import Task, TaskSpec, parse_options
from tasks.constraints import moment_fit_hook, words

TEMPLATE = "Here is a short biography of a {role}:\n"
ROLES = ("scientist", "writer", "doctor", "politician", "engineer", "musician", "teacher", "lawyer")
DEFAULT_PROMPTS = [TEMPLATE.format(role=r) for r in ROLES]
FIT_SAMPLES = 256

FEMALE_WORDS = frozenset("""
she her hers herself woman women girl girls lady ladies female females feminine
mother mothers daughter daughters sister sisters wife wives aunt aunts niece nieces grandmother grandmothers
granddaughter granddaughters mom mum mommy girlfriend bride widow stepmother
mrs ms madam madame dame queen princess duchess empress countess baroness nun
actress actresses waitress heroine hostess businesswoman businesswomen chairwoman spokeswoman congresswoman
sportswoman stateswoman horsewoman policewoman maternal motherhood sisterhood
""".split())
MALE_WORDS = frozenset("""
he him his himself man men boy boys gentleman gentlemen male males masculine
father fathers son sons brother brothers husband husbands uncle uncles nephew nephews grandfather grandfathers
grandson grandsons dad daddy boyfriend groom widower stepfather
mr sir lord king prince duke emperor baron monk
actor actors waiter hero businessman businessmen chairman spokesman congressman
sportsman statesman horseman policeman paternal fatherhood brotherhood
""".split())


def gender_counts(text: str) -> tuple[int, int]:
    """(female words, male words) in ``text``."""
    tokens = words(text)
    return sum(t in FEMALE_WORDS for t in tokens), sum(t in MALE_WORDS for t in tokens)


def is_female(text: str) -> float:
    r""":math:`\phi` = 1.0 when female words outnumber male words in ``text``, else 0.0."""
    female, male = gender_counts(text)
    return float(female > male)


def gender_scorer(completions: list[str], prompts: list[str]) -> dict[str, torch.Tensor]:
    return {"female": torch.tensor([is_female(t) for t in completions], dtype=torch.float64)}


class GenderTask(Task):
    name = "gender"
    description = "biographies, half about women: P = a * exp(lambda * female), lambda fitted so E_p[female] = 0.5"
    defaults = {"divergence": "fkl", "max_new_tokens": 48}
    options = {"moment": 0.5, "conditional": True}

    def build(self, beta: float, options: Mapping[str, str], prompts: Sequence[str] | None = None) -> TaskSpec:
        opts = parse_options(self.name, options, self.options)
        if not 0 < opts["moment"] < 1:
            raise ValueError(f"task 'gender': moment must be in (0, 1), got {opts['moment']}")
        moment, conditional = opts["moment"], opts["conditional"]

        def metrics(features: Mapping[str, torch.Tensor]) -> dict[str, float]:
            rate = float(features["female"].double().mean())
            return {"score/female_fraction": rate, "score/female_fraction_error": rate - moment}

        return TaskSpec(
            prompts=list(prompts) if prompts else list(DEFAULT_PROMPTS),
            scorer=gender_scorer,
            target=exponential_family(["female"]).as_conditional(conditional),
            metrics=metrics,
            defaults=dict(self.defaults),
            notes=[f"lambda is fitted on {256} base samples before training (E_p[female] = {moment})"],
            fit=moment_fit_hook(gender_scorer, {"female": moment}, FIT_SAMPLES, conditional, self.name),
            fit_samples=FIT_SAMPLES,
        )
