"""A task's metrics on a given set of samples (for ``fdpg eval``): a pure function of the texts.

``evaluate(spec, completions, prompts)`` scores the completions with the task's scorer (in chunks, so
thousands of samples do not go through a model scorer at once) and applies the task's metrics
function to all the features together, so the numbers are the same whether the samples come from a
training batch, the base model (e.g. the base rate :math:`E_a[b]` of a constraint) or a trained policy.
Every feature the scorer returns reaches the metrics function, metric-only ones included, and its
mean is reported as ``feature/<name>``. The CLI adds what needs the models (KL(pi||a), Distinct-n).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from tasks.base import TaskSpec, features_to_tensors


def score_all(spec: TaskSpec, completions: Sequence[str], prompts: Sequence[str], batch_size: int = 256,
              ) -> dict[str, torch.Tensor]:
    """The scorer's features of every completion, as float64 tensors of shape ``[n]``."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    parts: dict[str, list[torch.Tensor]] = {}
    for lo in range(0, len(completions), batch_size):
        chunk = list(completions[lo:lo + batch_size])
        feats = features_to_tensors(spec.scorer(chunk, list(prompts[lo:lo + batch_size])))
        for name, values in feats.items():
            if values.shape != (len(chunk),):
                raise ValueError(f"the task's scorer returned {tuple(values.shape)} values of {name!r} for "
                                 f"{len(chunk)} completions (one per completion expected)")
            parts.setdefault(name, []).append(values)
    return {name: torch.cat(chunks) for name, chunks in parts.items()}


def evaluate(spec: TaskSpec, completions: Sequence[str], prompts: Sequence[str] | None = None,
             batch_size: int = 256) -> dict[str, float]:
    """The task's metrics (``score/...``), ``feature/<name>`` means and ``n_samples`` over the given samples.

    Args:
        spec: the built task (``get_task(name).build(beta, options, prompts)``).
        completions: the completion texts (without their prompts).
        prompts: the prompt of each completion; ``None`` for unconditional samples (all ``""``).
        batch_size: completions per scorer call.
    """
    completions = list(completions)
    prompts = [""] * len(completions) if prompts is None else list(prompts)
    if len(prompts) != len(completions):
        raise ValueError(f"{len(completions)} completions but {len(prompts)} prompts (one prompt per completion)")
    if not completions:
        raise ValueError("evaluate needs at least one completion")
    features = score_all(spec, completions, prompts, batch_size)
    out: dict[str, float] = {k: float(v) for k, v in spec.metrics(features).items()}
    out.update({f"feature/{name}": float(values.mean()) for name, values in features.items()})
    out["n_samples"] = float(len(completions))
    return out
