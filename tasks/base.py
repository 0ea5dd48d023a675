"""What a task is: prompts + scorers + the target they define + the task's own metrics.

A task module defines one :class:`Task` subclass and registers it with :func:`tasks.register_task`.
The engine sees only what :meth:`Task.build` returns: a :class:`TaskSpec` holding the prompt pool,
a scorer ``(completions, prompts) -> {feature: values}``, the target :math:`P` and a metrics function.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from objectives import Target

Scorer = Callable[[list[str], list[str]], Mapping[str, Any]]
MetricsFn = Callable[[Mapping[str, torch.Tensor]], Mapping[str, float]]


class MissingDependencyError(ImportError):
    """A task's scorer needs a package that is not installed; the message says what to install."""


def require(module: str, install: str) -> None:
    """Raise :class:`MissingDependencyError` unless ``module`` is importable."""
    if importlib.util.find_spec(module) is None:
        raise MissingDependencyError(
            f"this task needs the Python module {module!r}: install it with `{install}` "
            "(or `make setup`, which installs every task's scorers)"
        )


@dataclass
class TaskSpec:
    """Everything the trainer needs from a task."""

    prompts: list[str] | None
    scorer: Scorer
    target: Target
    metrics: MetricsFn
    defaults: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


class Task:
    """Base class of tasks: subclasses set ``name``/``description`` and implement :meth:`build`."""

    name: ClassVar[str] = ""
    description: ClassVar[str] = ""
    #: Suggested settings (divergence, beta, max_new_tokens, ...) shown by ``fdpg tasks``.
    defaults: ClassVar[dict[str, Any]] = {}

    def build(self, beta: float, options: Mapping[str, str], prompts: Sequence[str] | None = None) -> TaskSpec:
        """Build the task; ``prompts`` (user-supplied) replace the task's own when given."""
        raise NotImplementedError


def mean_metric(name: str, feature: str) -> MetricsFn:
    """A metrics function reporting the batch mean of ``feature`` as ``name``."""

    def metrics(features: Mapping[str, torch.Tensor]) -> dict[str, float]:
        return {name: float(features[feature].double().mean())}

    return metrics
