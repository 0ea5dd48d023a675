r"""``sentiment``: a scalar preference, :math:`P(x\mid c) = a(x\mid c)\exp(r(x)/\beta)`.

:math:`r(x)` is VADER's compound polarity of the completion, in :math:`[-1, 1]` (Hutto & Gilbert
2014), a lexicon scorer that needs no model download. With reverse KL this is KL-regularised RL
toward positive sentiment, the classic RLHF sentiment experiment; any divergence can be used.
Metrics: mean r (the alignment score) and the fraction of positive completions (compound > 0.05,
VADER's own threshold).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from functools import lru_cache

import torch

from objectives import rl_with_kl
from tasks.base import Task, TaskSpec, require

DEFAULT_PROMPTS = [
    "Movie review:",
    "Here is my review of the film:",
    "I just watched this movie and",
    "Review of the new restaurant downtown:",
    "My honest opinion of the book:",
    "The concert last night was",
    "Customer review:",
    "What I think about this product:",
]
POSITIVE_THRESHOLD = 0.05


@lru_cache(maxsize=1)
def _vader():
    require("vaderSentiment", "pip install vaderSentiment")
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

    return SentimentIntensityAnalyzer()


def vader_compound(texts: Sequence[str]) -> torch.Tensor:
    """VADER compound polarity of each text (0 for an empty text)."""
    analyzer = _vader()
    return torch.tensor([analyzer.polarity_scores(t)["compound"] if t.strip() else 0.0 for t in texts],
                        dtype=torch.float64)


def sentiment_metrics(features: Mapping[str, torch.Tensor]) -> dict[str, float]:
    r = features["reward"].double()
    return {"score/reward": float(r.mean()), "score/positive_fraction": float((r > POSITIVE_THRESHOLD).double().mean())}


class SentimentTask(Task):
    name = "sentiment"
    description = "positive sentiment: P = a * exp(r / beta), r = VADER compound of the completion"
    defaults = {"divergence": "rkl", "beta": 0.1, "max_new_tokens": 32}

    def build(self, beta: float, options: Mapping[str, str], prompts: Sequence[str] | None = None) -> TaskSpec:
        _vader()  # fail early, with the install command, if VADER is missing
        if options:
            raise ValueError(f"task 'sentiment' takes no --task_args, got {sorted(options)}")

        def scorer(completions: list[str], prompts: list[str]) -> dict[str, torch.Tensor]:
            return {"reward": vader_compound(completions)}

        return TaskSpec(
            prompts=list(prompts) if prompts else list(DEFAULT_PROMPTS),
            scorer=scorer,
            target=rl_with_kl("reward", beta).as_conditional(),
            metrics=sentiment_metrics,
        )
