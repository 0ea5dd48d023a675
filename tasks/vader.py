"""VADER's compound polarity (Hutto & Gilbert 2014), a lexicon scorer that needs no model download: the reward of
``sentiment``, a component of ``fine_grained``, and the labels the MiniLM classifier is checked against."""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache

import torch

from tasks.base import require


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
