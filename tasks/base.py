r"""What a task is: prompts + scorers + the target they define + the task's own metrics.

A task module defines one :class:`Task` subclass and registers it with :func:`tasks.register_task`.
The engine sees only what :meth:`Task.build` returns: a :class:`TaskSpec` holding the prompt pool,
a scorer ``(completions, prompts) -> {feature: values}``, the target :math:`P` and a metrics function.

Distributional constraints (``gender``, ``professions``) need :math:`\lambda` fitted on samples of the
base model :math:`a` before training, and :meth:`Task.build` has no model. Such a spec carries a
``fit`` hook: the engine calls ``target, report = spec.fit(sample_fn, n)`` with a :data:`SampleFn`
drawing base samples (``fdpg train --fit_samples N``), and trains toward ``target``
(see :mod:`tasks.constraints`).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

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


class Task:
    """Base class of tasks: subclasses set ``name``/``description`` and implement :meth:`build`."""

    name: ClassVar[str] = ""
    description: ClassVar[str] = ""
    #: Suggested settings (divergence, beta, max_new_tokens, ...) shown by ``fdpg tasks``.
    defaults: ClassVar[dict[str, Any]] = {}
    #: ``--task_args`` the task accepts, with their defaults (see :func:`parse_options`).
    options: ClassVar[dict[str, Any]] = {}

    def build(self, beta: float, options: Mapping[str, str], prompts: Sequence[str] | None = None) -> TaskSpec:
        """Build the task; ``prompts`` (user-supplied) replace the task's own when given."""
        raise NotImplementedError


def fdpg_cache_root() -> Path:
    """The fdpg cache directory: ``$FDPG_CACHE``, or ``~/.cache/fdpg``."""
    return Path(os.environ.get("FDPG_CACHE") or "~/.cache/fdpg").expanduser()


def parse_options(task: str, options: Mapping[str, str], allowed: Mapping[str, Any]) -> dict[str, Any]:
    """``--task_args`` of task ``task`` converted to the types of the defaults in ``allowed``.

    Unknown keys and values that do not convert raise ``ValueError`` naming the option and the choices.
    """
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        known = ", ".join(f"{k}={v}" for k, v in allowed.items()) or "none"
        raise ValueError(f"task {task!r} got unknown --task_args {unknown}; it takes: {known}")
    out = dict(allowed)
    for key, raw in options.items():
        default = allowed[key]
        try:
            if isinstance(default, bool):
                if raw.lower() not in ("1", "0", "true", "false", "yes", "no"):
                    raise ValueError(raw)
                out[key] = raw.lower() in ("1", "true", "yes")
            elif isinstance(default, int):
                out[key] = int(raw)
            elif isinstance(default, float):
                out[key] = float(raw)
            else:
                out[key] = raw
        except ValueError:
            raise ValueError(f"task {task!r}: --task_args {key}={raw!r} is not a valid "
                             f"{type(default).__name__}") from None
    return out


def features_to_tensors(raw: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """Scorer output as float64 tensors of shape ``[n]``."""
    return {k: torch.as_tensor(v, dtype=torch.float64).reshape(-1) for k, v in raw.items()}


def mean_metric(name: str, feature: str) -> MetricsFn:
    """A metrics function reporting the batch mean of ``feature`` as ``name``."""

    def metrics(features: Mapping[str, torch.Tensor]) -> dict[str, float]:
        return {name: float(features[feature].double().mean())}

    return metrics
