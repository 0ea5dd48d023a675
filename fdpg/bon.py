r"""Best-of-n sampling from the base model: the reference point beside every trained policy.

For each n, draw n completions per prompt from the base model :math:`a`, keep the one the task's reward
scores highest, and report the task's metrics of the kept completions. Its divergence from the base model is
known in closed form (Stiennon et al. 2020, App. G.3):

.. math::  KL(\pi_{\mathrm{bon}} \| a) = \log n - \frac{n - 1}{n},

0 at n = 1 (the base model itself, the origin of every frontier), 0.19 at n = 2, 1.84 at n = 16. It is exact
when the reward has no ties and an upper bound otherwise (Beirami et al. 2024): with a binary reward it can be
far above the true KL. It is written as ``kl_pi_a`` and ``kl_pi_a_exact`` (so the frontier's default x axis
works), with standard error 0 and ``kl_pi_a_source: "analytic"``, never estimated from the samples.

**The nested estimator.** ``max(n)`` completions per prompt are drawn once; best-of-n for every n is the best
of the *first* n of them (ties: the first). The first n of i.i.d. draws are i.i.d. draws, so each n's point
is as valid as if it were drawn on its own; the points share samples, so the curve costs ``max(n)`` samples per
prompt instead of their sum, and its differences between n are less noisy (its points are correlated).

**What is written** (one run directory per n, read by :mod:`analysis` like a trained run, method
``Best-of-n``, ``algo: bon``): ``config.json`` (``bon_n``, the task, model, seed, prompts, reward feature,
``kl_pi_a_source``), ``metrics.jsonl`` (one row, step 0: every metric, :func:`metrics_row`), ``samples.jsonl``
(the kept completions), ``eval.json`` (the same numbers as an evaluation, each metric ``m`` with its standard
error ``m_se``; its ``base`` is the first completion of each prompt, a plain sample of the base model) and
``summary.json``. The frontier takes a run's point from its ``eval.json`` (``fdpg analyze``'s default
``--source auto``), so Best-of-n's points have error bars; with ``--source train`` they have none.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fdpg.metrics import distinct_n

#: Where Best-of-n's KL(pi||a) comes from (``kl_pi_a_source``): the closed form, not the samples.
KL_SOURCE = "analytic"


def analytic_kl(n: int) -> float:
    r""":math:`KL(\pi_{\mathrm{bon}}\|a) = \log n - (n-1)/n` of best-of-``n`` (0 for n = 1)."""
    if not isinstance(n, (int, np.integer)) or isinstance(n, bool) or n < 1:
        raise ValueError(f"best-of-n needs a positive whole n, got {n!r}")
    return math.log(n) - (n - 1) / n


def parse_ns(text: str | Sequence[int]) -> list[int]:
    """``"1,2,4,8"`` (or a sequence) as sorted distinct positive integers."""
    items = [part.strip() for part in text.split(",") if part.strip()] if isinstance(text, str) else list(text)
    try:
        values = sorted({int(v) for v in items})
    except (TypeError, ValueError):
        raise ValueError(f"--n takes whole numbers separated by commas (e.g. 1,2,4,8,16), got {text!r}") from None
    if not values or values[0] < 1:
        raise ValueError(f"--n takes positive whole numbers (e.g. 1,2,4,8,16), got {text!r}")
    return values


def best_of_first(rewards: torch.Tensor, n: int) -> torch.Tensor:
    """For each row (a prompt's completions, in the order drawn) the index of the highest reward among its first
    ``n``; on ties the first of them."""
    if rewards.dim() != 2:
        raise ValueError(f"rewards must be [prompts, samples per prompt], got shape {tuple(rewards.shape)}")
    if not 1 <= n <= rewards.shape[1]:
        raise ValueError(f"best of the first {n} of {rewards.shape[1]} samples per prompt")
    first = rewards[:, :n]
    best = first.max(dim=1, keepdim=True).values
    # the first index attaining the maximum (argmax's choice among ties is not documented on every device)
    return (first == best).to(torch.int64).argmax(dim=1)


@dataclass
class BestOfN:
    """The kept completions of one n: ``index[i]`` is which of prompt i's draws was kept, ``metrics`` every metric
    ``m`` with ``m_se``."""

    n: int
    prompts: list[str]
    completions: list[str]
    features: dict[str, torch.Tensor]
    index: torch.Tensor
    metrics: dict[str, Any]


def _jackknife_metrics(statistics: Mapping[str, Callable[[torch.Tensor], float]], n: int) -> dict[str, Any]:
    from fdpg.evaluation import grouped_jackknife_se

    everything = torch.arange(n)
    out: dict[str, Any] = {}
    for name, statistic in statistics.items():
        value = float(statistic(everything))
        out[name] = value if math.isfinite(value) else None
        out[f"{name}_se"] = grouped_jackknife_se(statistic, n) if out[name] is not None else None
    return out


def kept_metrics(features: Mapping[str, torch.Tensor], tokens: Sequence[Sequence[int]], n: int,
                 metrics_fn: Callable[[Mapping[str, torch.Tensor]], Mapping[str, float]]) -> dict[str, Any]:
    """The metrics of the kept completions (one per prompt): the task's (``metrics_fn``), completion length and
    Distinct-1/2/3, each with its grouped-jackknife standard error (as ``fdpg eval``), and the analytic KL of
    best-of-``n`` as ``kl_pi_a`` and ``kl_pi_a_exact`` (standard error 0; ``kl_pi_a_source``)."""
    count = len(tokens)
    statistics: dict[str, Callable[[torch.Tensor], float]] = {
        name: (lambda index, name=name: float(metrics_fn({k: v[index] for k, v in features.items()})[name]))
        for name in metrics_fn(features)
    }
    statistics["completion_length"] = lambda index: float(np.mean([len(tokens[i]) for i in index.tolist()]))
    for k in (1, 2, 3):
        statistics[f"distinct_{k}"] = lambda index, k=k: distinct_n([tokens[i] for i in index.tolist()], k)
    out: dict[str, Any] = {"n": count}
    out.update(_jackknife_metrics(statistics, count))
    kl = analytic_kl(n)
    out.update({"kl_pi_a": kl, "kl_pi_a_se": 0.0, "kl_pi_a_exact": kl, "kl_pi_a_exact_se": 0.0,
                "kl_pi_a_source": KL_SOURCE})
    return out


def select_best_of_n(prompts: Sequence[str], completions: Sequence[str], tokens: Sequence[Sequence[int]],
                     features: Mapping[str, torch.Tensor], reward: str, ns: Sequence[int],
                     metrics_fn: Callable[[Mapping[str, torch.Tensor]], Mapping[str, float]]) -> list[BestOfN]:
    """Best-of-n for every n of ``ns`` from samples laid out prompt by prompt: ``max(ns)`` consecutive samples per
    prompt, in the order drawn (``prompts`` repeats each prompt that many times). The nested estimator: for each n
    the kept completion of a prompt is its highest-``reward`` one among the first n."""
    ns = parse_ns(ns)
    per_prompt = ns[-1]
    if len(completions) % per_prompt or len(completions) == 0:
        raise ValueError(f"{len(completions)} samples are not {per_prompt} per prompt")
    if reward not in features:
        raise KeyError(f"the reward feature {reward!r} is not among the scores {sorted(features)}")
    count = len(completions) // per_prompt
    rewards = features[reward].reshape(count, per_prompt)
    out = []
    for n in ns:
        index = best_of_first(rewards, n)
        rows = torch.arange(count) * per_prompt + index
        kept = {k: v.reshape(-1)[rows] for k, v in features.items()}
        kept_tokens = [list(tokens[int(r)]) for r in rows]
        out.append(BestOfN(n, [prompts[int(r)] for r in rows], [completions[int(r)] for r in rows], kept, index,
                           kept_metrics(kept, kept_tokens, n, metrics_fn)))
    return out


def choose_prompts(pool: Sequence[str] | None, count: int, seed: int) -> list[str]:
    """``count`` prompts of the pool (distinct when the pool has that many, else drawn with replacement), seeded;
    ``[""] * count`` for unconditional generation."""
    if count < 1:
        raise ValueError(f"--prompts must be a positive number of prompts, got {count}")
    pool = list(pool) if pool else [""]
    rng = np.random.default_rng(seed)
    return [pool[i] for i in rng.choice(len(pool), size=count, replace=len(pool) < count)]


def reward_feature_of(spec, reward_feature: str | None, beta: float) -> str:
    """The feature best-of-n maximises: the task's reward r when its target is :math:`a\\,e^{r/\\beta}`, else the
    one named (``--reward_feature``); anything else is refused with the reason, before any model is loaded."""
    from fdpg.engine import reward_target

    try:
        return reward_target(spec.target, reward_feature, beta, algo="bon").energies[0].reward
    except ValueError:
        raise ValueError(
            f"best-of-n keeps the completion with the highest reward, but this task's target is "
            f"{spec.target.describe()}, not a exp(r/beta), so it names no reward: name the feature to maximise with "
            "--reward_feature NAME (e.g. the 0/1 constraint b; with a reward that ties, the analytic KL "
            "log n - (n-1)/n is an upper bound)") from None


def run_best_of_n(policy, spec, ns: Sequence[int], prompts: int, max_new_tokens: int, seed: int,
                  reward: str, chunk: int = 16, progress: bool = True) -> list[BestOfN]:
    """Sample ``max(ns)`` completions for each of ``prompts`` prompts from the base model of ``policy`` (pure
    sampling, seeded), score them all once with the task (``spec``) and keep the best of the first n for each n
    of ``ns`` by the feature ``reward`` (:func:`select_best_of_n`). The result for n = 1 (the base model's own
    samples: the first completion of each prompt) always comes first, asked for or not."""
    from fdpg.evaluation import sample_for_prompts
    from fdpg.scores import checked_features
    from objectives import KLRegularisedReward, Target

    ns = parse_ns(ns)
    chosen = choose_prompts(spec.prompts, prompts, seed)
    repeated = [p for p in chosen for _ in range(ns[-1])]
    batch = sample_for_prompts(policy, repeated, max_new_tokens, seed, chunk=chunk, reference=True,
                               progress=progress)
    raw = spec.scorer(list(batch.texts), list(batch.prompts))
    checker = Target((KLRegularisedReward(reward, 1.0),), True, spec.target.conditional)
    features = checked_features(checker, raw, len(batch))
    tokens = [row[:k].tolist() for row, k in zip(batch.completion_ids, batch.lengths)]
    return select_best_of_n(list(batch.prompts), list(batch.texts), tokens, features, reward, [1, *ns],
                            spec.metrics)


def _scalars(metrics: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in metrics.items() if isinstance(v, (int, float)) or v is None}


def metrics_row(metrics: Mapping[str, Any]) -> dict[str, Any]:
    """The one line of a Best-of-n run's ``metrics.jsonl``: step 0 and the values of ``metrics``, without their
    standard errors but ``kl_pi_a_exact_se`` (0), which trained runs log too. ``analysis.final_points`` reads a
    logged ``m_se`` as every run's per-step error, so an ``m_se`` that only Best-of-n logged would blank the
    errors of the trained runs beside it; the standard errors are in ``eval.json``, which the frontier prefers."""
    row: dict[str, Any] = {"step": 0}
    for key, value in _scalars(metrics).items():
        if key != "n" and (not key.endswith("_se") or key == "kl_pi_a_exact_se"):
            row[key] = value
    row["kl_pi_a_source"] = KL_SOURCE
    return row


def write_bon_runs(output_dir: str | Path, results: Sequence[BestOfN], settings: Mapping[str, Any],
                   base: BestOfN | None = None) -> list[Path]:
    """One run directory per n under ``output_dir`` (``bon-<task>-n<n>-seed<seed>``; a directory that already
    holds files is never overwritten: ``...-2``), see the module docstring. ``settings``: the job's settings
    (task, model, seed, ...), written to each ``config.json`` with ``algo: bon`` and ``bon_n``. ``base``: the
    n = 1 selection (the first completion of each prompt), the ``base`` of each ``eval.json`` (default: the
    result with n = 1)."""
    from fdpg.run_log import RunLog

    base = base or next((r for r in results if r.n == 1), None)
    if base is None:
        raise ValueError("write_bon_runs needs the n = 1 result (the base model's own samples) as `base`")
    written = []
    root = Path(output_dir)
    for result in results:
        name = f"bon-{settings.get('task', 'task')}-n{result.n}-seed{settings.get('seed', 0)}"
        config = {"algo": "bon", **settings, "bon_n": result.n, "kl_pi_a_source": KL_SOURCE,
                  "output_dir": str(root / name)}
        log = RunLog.create(root / name, config)
        numbers = _scalars(result.metrics)
        log.metrics.write(metrics_row(result.metrics))
        log.samples.write_many([
            {"step": 0, "prompt": p, "completion": c, "scores": {k: float(v[i]) for k, v in result.features.items()},
             "bon_index": int(result.index[i]), "bon_n": result.n}
            for i, (p, c) in enumerate(zip(result.prompts, result.completions))])
        examples = [{"prompt": p, "completion": c} for p, c in list(zip(result.prompts, result.completions))[:5]]
        log.write_json("eval.json", {"n": len(result.completions), "seed": settings.get("seed"),
                                     "max_new_tokens": settings.get("max_new_tokens"), "bon_n": result.n,
                                     "policy": {**result.metrics, "examples": examples}, "base": base.metrics})
        log.write_json("summary.json", {"status": "finished", "algo": "bon", "bon_n": result.n,
                                        "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                                        "eval": {k: v for k, v in numbers.items()}})
        log.close()
        written.append(log.dir)
    return written


def load_base_policy(model: str, trust_remote_code: bool = False):
    """The base model as a :class:`fdpg.policy.Policy` that is its own reference (no copy, no adapter)."""
    from fdpg.models import load_causal_lm, load_tokenizer
    from fdpg.policy import Policy

    tokenizer = load_tokenizer(model, trust_remote_code=trust_remote_code)
    network = load_causal_lm(model, trust_remote_code=trust_remote_code)
    if network.config.pad_token_id is None:
        network.config.pad_token_id = tokenizer.pad_token_id
    return Policy(network, tokenizer, reference=network)
