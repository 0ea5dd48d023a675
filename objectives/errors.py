"""Exceptions raised by :mod:`objectives`.

Each is a ``ValueError`` so that callers who only care about "bad input" can catch one type, while
each message says which parameter or check failed, with what value, and what to do about it.
"""

from __future__ import annotations


class ObjectiveError(ValueError):
    """Base class of every error raised for bad input to :mod:`objectives`."""


class UnknownDivergenceError(ObjectiveError, KeyError):
    """A divergence name that is not registered."""

    def __str__(self) -> str:  # KeyError would otherwise quote the message
        return str(self.args[0]) if self.args else ""


class InvalidGeneratorError(ObjectiveError):
    """A user-supplied generator ``f`` that is not a valid f-divergence generator."""


class ZeroTargetError(ObjectiveError):
    """Samples with ``p(x) = 0`` under a divergence whose ``f'(inf)`` is infinite (e.g. reverse KL)."""


class ScoreError(ObjectiveError):
    """Scores (log-probabilities, features, rewards) that are NaN, of the wrong shape, or missing."""


class UnreachableMomentError(ObjectiveError):
    """A requested moment that the samples used for fitting cannot reach."""
