"""Frontier points from the final evaluations (``eval.json``) instead of the last training batches.

A run's ``eval.json`` holds ``--eval_samples`` completions of its final policy, and of the base model under the
same settings, scored by the task, each metric ``m`` with its standard error ``m_se`` (a grouped jackknife). A
point made from it is far less noisy than the mean of the last few training steps (each drawn from another policy)
and is the same for every algorithm. :func:`evaluated_points` puts those numbers in place of the training ones
for every run that has them and says which source each point came from (``source``); :func:`base_points` gives
the base model's own point (KL 0), the origin of every frontier.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

import pandas as pd

from analysis.runs import SETTING_COLUMNS, load_run, run_dirs

#: ``method`` of the base model's point.
BASE_METHOD = "base a"


def _scalars(evaluation: dict) -> dict:
    return {k: v for k, v in evaluation.items() if isinstance(v, (int, float)) or v is None}


def load_evaluations(paths: str | Path | Iterable[str | Path]) -> pd.DataFrame:
    """One row per run that has an ``eval.json``: its settings and every evaluated metric (with ``_se``),
    ``n_samples`` and ``source`` = ``eval (n=N)``."""
    rows = []
    for run in run_dirs(paths):
        path = run / "eval.json"
        if not path.is_file():
            continue
        evaluation = json.loads(path.read_text())
        settings = load_run(run).iloc[:1][["run", *SETTING_COLUMNS]].to_dict("records")
        settings = settings[0] if settings else {"run": run.name}
        policy = _scalars(evaluation["policy"])
        rows.append({**settings, **policy, "n_samples": policy.pop("n", evaluation.get("n")),
                     "source": f"eval (n={evaluation.get('n')})"})
    return pd.DataFrame(rows)


def base_points(paths: str | Path | Iterable[str | Path]) -> pd.DataFrame:
    """One row per distinct base-model evaluation among the runs' ``eval.json`` (per model and task): the origin
    of the frontier, ``method`` = ``base a``, KL 0."""
    rows, seen = [], set()
    for run in run_dirs(paths):
        path = run / "eval.json"
        if not path.is_file():
            continue
        evaluation = json.loads(path.read_text())
        config = json.loads((run / "config.json").read_text())["config"]
        key = (config.get("model"), config.get("task"), evaluation.get("n"), evaluation.get("max_new_tokens"))
        if key in seen:
            continue
        seen.add(key)
        base = _scalars(evaluation["base"])
        rows.append({"run": f"base ({config.get('task')})", "method": BASE_METHOD, "task": config.get("task"),
                     "model": config.get("model"), **base, "n_samples": base.pop("n", evaluation.get("n")),
                     "n_runs": 1, "source": f"eval (n={evaluation.get('n')})"})
    return pd.DataFrame(rows)


def evaluated_points(points: pd.DataFrame, evaluations: pd.DataFrame, last: int | None = None) -> pd.DataFrame:
    """``points`` (from :func:`analysis.final_points`) with the evaluated metrics and their standard errors in
    place of the training ones for every run in ``evaluations``; ``source`` says where each row's numbers come
    from (``eval (n=N)`` or ``train (last K steps)``)."""
    out = points.copy()
    out["source"] = f"train (last {last} steps)" if last else "train"
    if evaluations.empty:
        return out
    by_run = evaluations.set_index("run")
    metric_columns = [c for c in by_run.columns if c not in (*SETTING_COLUMNS, "setting_id")]
    for column in metric_columns:
        if column not in out:
            out[column] = pd.NA if by_run[column].dtype == object else float("nan")
    for i, run in out["run"].items():
        if run in by_run.index:
            for column in metric_columns:
                out.at[i, column] = by_run.at[run, column]
    return out
