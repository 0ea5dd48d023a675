r"""What a task gives the engine: :class:`TaskSpec` (prompts, scorer, target, metrics, an optional fit hook) and
:class:`TargetFit`, with the scorer's and the hook's types, and the error a scorer raises for a missing package.

The contract lives here, in the engine's layer, so that the engine never imports from ``tasks/`` (the layer above
it); ``tasks.base`` re-exports it for task authors (:class:`tasks.base.Task` builds a :class:`TaskSpec`).
"""

from __future__ import annotations

import dataclasses
import importlib.util
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from objectives import Target

Scorer = Callable[[list[str], list[str]], Mapping[str, Any]]
MetricsFn = Callable[[Mapping[str, torch.Tensor]], Mapping[str, float]]
#: ``sample_fn(n) -> (completions, prompts)``: ``n`` samples of the base model :math:`a`, prompts drawn
#: from the task's pool as in training, completions as long as in training (``--max_new_tokens``).
SampleFn = Callable[[int], tuple[list[str], list[str]]]


class MissingDependencyError(ImportError):
    """A task's scorer needs a package that is not installed; the message says what to install."""


def require(module: str, install: str) -> None:
    """Raise :class:`MissingDependencyError` unless ``module`` is importable."""
    if importlib.util.find_spec(module) is None:
        raise MissingDependencyError(
            f"this task needs the Python module {module!r}: install it with `{install}` "
            "(or `make setup`, which installs every task's scorers)"
        )


@dataclass(frozen=True)
class TargetFit:
    r"""What a task's ``fit`` hook returns; it unpacks as ``target, report = fit`` (the engine's contract).

    Attributes:
        target: the target to train toward (e.g. :math:`a\,e^{\lambda\cdot\phi}` with fitted :math:`\lambda`).
        report: human-readable lines for the console.
        details: JSON-serialisable record for the run directory (lambdas, target, achieved and base
            moments, ESS, n); :func:`tasks.constraints.restore_fit` rebuilds the target from it.
    """

    target: Target
    report: str
    details: dict[str, Any] = field(default_factory=dict)

    def __iter__(self) -> Iterator[Any]:
        return iter((self.target, self.report))


#: ``fit(sample_fn, n) -> TargetFit``; ``n = None``: the task's suggestion, ``TaskSpec.fit_samples``.
FitHook = Callable[[SampleFn, "int | None"], TargetFit]


@dataclass
class TaskSpec:
    r"""Everything the trainer needs from a task.

    Attributes:
        prompts: the prompt pool (``None``: unconditional generation).
        scorer: ``(completions, prompts) -> {feature: one number per completion}``; may return more features
            than the target reads (metric-only features).
        target: the unnormalised target :math:`P`. When ``fit`` is set this is a placeholder with
            :math:`\lambda = 0` (i.e. :math:`P = a`) until the fitted target replaces it.
        metrics: ``features -> {"score/<name>": value}``, the task's alignment metrics of a batch.
        fit: ``fit(sample_fn, n) -> TargetFit``, to be called once before training on ``n`` base samples.
        fit_samples: the number of base samples the task suggests for ``fit``.
        fine_grained: a :class:`objectives.fine_grained.FineGrainedReward` whose segment rewards, placed on the
            generated tokens, make up the feature ``fine_grained_feature`` (the scorer returns its total,
            :meth:`~objectives.fine_grained.FineGrainedReward.totals`): PPO then takes the per-token rewards,
            f-DPG the total (and, with ``--token_credit``, the reward-to-go). ``None``: one score per completion.
        fine_grained_feature: the feature that is the fine-grained reward's total.
    """

    prompts: list[str] | None
    scorer: Scorer
    target: Target
    metrics: MetricsFn
    defaults: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    fit: FitHook | None = None
    fit_samples: int = 0
    fine_grained: Any = None
    fine_grained_feature: str = "reward"

    @property
    def needs_fit(self) -> bool:
        return self.fit is not None

    def fitted(self, sample_fn: SampleFn, n: int | None = None) -> tuple[TaskSpec, TargetFit]:
        """Run the ``fit`` hook on ``n`` base samples; return a spec with the fitted target (and no hook)."""
        if self.fit is None:
            raise ValueError("this task has no fit hook (its target needs no fitting)")
        result = self.fit(sample_fn, n)
        return dataclasses.replace(self, target=result.target, fit=None), result
