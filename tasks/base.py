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

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar

import torch

from fdpg.task_spec import (  # noqa: F401  (the contract, re-exported for task authors)
    FitHook,
    MetricsFn,
    MissingDependencyError,
    SampleFn,
    Scorer,
    TargetFit,
    TaskSpec,
    require,
)


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
