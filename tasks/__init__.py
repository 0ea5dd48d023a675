"""Concrete f-DPG experiments: one module per task, registered by name.

``fdpg tasks`` lists them; ``fdpg train --task NAME`` runs one. Adding a task is one small module
defining a :class:`tasks.base.Task` subclass and a call to :func:`register_task`.
"""

from __future__ import annotations

import difflib

from tasks.base import MissingDependencyError, TargetFit, Task, TaskSpec
from tasks.codegen import CodeTask
from tasks.fine_grained import FineGrainedTask
from tasks.gender import GenderTask
from tasks.lexical import LexicalTask
from tasks.professions import ProfessionsTask
from tasks.reward_model import RewardModelTask
from tasks.sentiment import SentimentTask
from tasks.toxicity import ToxicityTask

_TASKS: dict[str, type[Task]] = {}


def register_task(task: type[Task]) -> type[Task]:
    """Register a task class under its ``name`` (usable as a decorator)."""
    if not task.name:
        raise ValueError(f"{task.__name__} needs a non-empty `name`")
    _TASKS[task.name] = task
    return task


def get_task(name: str) -> Task:
    """An instance of the task called ``name``; unknown names get the list and a close match."""
    if name not in _TASKS:
        close = difflib.get_close_matches(name, list(_TASKS), n=2)
        hint = f" Did you mean {', '.join(map(repr, close))}?" if close else ""
        raise KeyError(f"unknown task {name!r}.{hint} Known tasks: {', '.join(sorted(_TASKS))} (see `fdpg tasks`)")
    return _TASKS[name]()


def available_tasks() -> dict[str, str]:
    """Task name -> one-line description."""
    return {name: _TASKS[name].description for name in sorted(_TASKS)}


for _task in (SentimentTask, LexicalTask, GenderTask, ProfessionsTask, CodeTask, ToxicityTask, FineGrainedTask,
              RewardModelTask):
    register_task(_task)

__all__ = ["MissingDependencyError", "TargetFit", "Task", "TaskSpec", "available_tasks", "get_task", "register_task"]
