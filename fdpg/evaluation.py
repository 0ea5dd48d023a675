r"""Sampling a model for evaluation or for fitting a target, and loading a trained run back.

``evaluate_policy`` draws N completions from :math:`\pi` (pure sampling, seeded), scores them with the
task, and reports the task's metrics next to :math:`KL(\pi\|a)` and Distinct-n, so that a base model
and a trained run can be compared side by side (``fdpg eval``). ``base_sampler`` gives tasks whose
target must be fitted before training (distributional constraints) a way to draw base samples.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fdpg.generation import generator_of
from fdpg.log_probs import completion_token_log_probs, exact_token_kl
from fdpg.metrics import distinct_n
from fdpg.onednn_linears import onednn_linears
from fdpg.sampling import SampleBatch
from fdpg.scores import checked_features

BaseSampler = Callable[[int], tuple[list[str], list[str]]]


def draw_prompts(pool: Sequence[str] | None, n: int, seed: int) -> list[str]:
    """``n`` prompts drawn (seeded) from ``pool`` (``None``: the empty prompt), with replacement only when the pool
    is smaller than ``n``."""
    pool = list(pool) if pool else [""]
    rng = np.random.default_rng(seed)
    return [pool[i] for i in rng.choice(len(pool), size=n, replace=len(pool) < n)]


def draw_samples(policy, prompts: Sequence[str] | None, n: int, max_new_tokens: int, seed: int,
                 chunk: int = 16, reference: bool = False, progress: bool = True) -> SampleBatch:
    """``n`` pure samples of the policy (or of the reference :math:`a` when ``reference``), prompts drawn from the
    pool with replacement when it is smaller than ``n``."""
    return sample_for_prompts(policy, draw_prompts(prompts, n, seed), max_new_tokens, seed, chunk, reference,
                              progress)


def sample_for_prompts(policy, prompts: Sequence[str], max_new_tokens: int, seed: int, chunk: int = 16,
                       reference: bool = False, progress: bool = True) -> SampleBatch:
    """One pure sample of the policy (or of the reference :math:`a`) per entry of ``prompts``, in that order,
    ``chunk`` completions per seeded ``generate`` call."""
    from tqdm.auto import tqdm

    generator = generator_of(policy)
    batches = []
    with policy.reference() if reference else nullcontext(policy.model) as model, torch.no_grad(), \
            onednn_linears(model, prepack_rows=chunk) if generator.exact_policy else nullcontext():
        for lo in tqdm(range(0, len(prompts), chunk), desc="sampling", disable=not progress, leave=False):
            batches.append(generator.generate(model, policy.tokenizer, prompts[lo:lo + chunk], max_new_tokens,
                                              seed=seed * 100_003 + lo))
    return SampleBatch.concat(batches, policy.tokenizer.pad_token_id)


def base_sampler(policy, prompts: Sequence[str] | None, max_new_tokens: int, seed: int) -> BaseSampler:
    """A function ``n -> (completions, prompts)`` drawing from the base model :math:`a`."""

    def sample(n: int) -> tuple[list[str], list[str]]:
        batch = draw_samples(policy, prompts, n, max_new_tokens, seed, reference=True)
        return list(batch.texts), list(batch.prompts)

    return sample


@torch.inference_mode()
def sequence_log_probs(model, batch: SampleBatch, micro_batch: int = 16) -> torch.Tensor:
    return torch.cat([completion_token_log_probs(model, batch.slice(lo, lo + micro_batch)).sum(-1)
                      for lo in range(0, len(batch), micro_batch)]).double()


def grouped_jackknife_se(statistic: Callable[[torch.Tensor], float], n: int, groups: int = 32) -> float | None:
    r"""Standard error of ``statistic(index)`` (a function of the samples ``index`` of ``n``) by the grouped
    jackknife: with the samples cut into :math:`g` groups and :math:`\theta_{-k}` the statistic without group
    :math:`k`, :math:`SE = \sqrt{\frac{g-1}{g}\sum_k(\theta_{-k} - \bar\theta)^2}`. Equals the usual
    :math:`s/\sqrt n` for a mean when :math:`g = n`; works for fractions, ratios and Distinct-n alike.
    ``None`` for fewer than 2 samples or a statistic that is not finite."""
    g = min(groups, n)
    if g < 2:
        return None
    order = torch.arange(n)
    values = []
    for k in range(g):
        keep = order[order % g != k]
        values.append(float(statistic(keep)))
    t = torch.tensor(values, dtype=torch.float64)
    if not bool(torch.isfinite(t).all()):
        return None
    return float(((g - 1) / g * ((t - t.mean()) ** 2).sum()).sqrt())


def evaluate_policy(policy, spec, n: int, max_new_tokens: int, seed: int = 0, divergence=None,
                    progress: bool = True, of_reference: bool = False, chunk: int = 16,
                    keep_log_ratios: bool = False) -> dict[str, Any]:
    r"""Task metrics, :math:`KL(\pi\|a)` (plain and exact per token), entropy, Distinct-n and, with a
    ``divergence``, :math:`D_f(\pi\|p)` of ``n`` samples from the policy; each ``NAME`` with ``NAME_se`` (the
    grouped jackknife, :func:`grouped_jackknife_se`).

    :math:`D_f` uses :math:`\log Z` estimated from the same samples, :math:`\log\frac1n\sum_j P(x_j)/\pi(x_j)`
    (per prompt when the target is conditional), inside the jackknife too. ``of_reference``: evaluate the
    reference :math:`a` itself (the origin of every frontier: its KL to itself is 0). ``chunk``: completions
    per ``generate`` call (each chunk has its own seed). ``keep_log_ratios``: also return the per-sample
    ``log_ratios`` (``log_pi``, ``log_P`` and the prompt ``keys``), from which :func:`divergence_statistic` gives
    :math:`D_f` for any other divergence without sampling again."""
    from objectives.partition import GLOBAL_KEY

    batch = draw_samples(policy, spec.prompts, n, max_new_tokens, seed, chunk=chunk, progress=progress,
                         reference=of_reference)
    features = checked_features(spec.target, spec.scorer(list(batch.texts), list(batch.prompts)), len(batch))
    tokens = [row[:k].tolist() for row, k in zip(batch.completion_ids, batch.lengths)]
    # One pass of each model gives log a(x) and the exact next-token KL and entropy summed over each sample's
    # prefix (never negative, lower variance); the reference's own evaluation is a pass of a against itself.
    parts = []
    for lo in range(0, n, 16):
        part = batch.slice(lo, lo + 16)
        if of_reference:
            with policy.reference() as ref:
                parts.append(exact_token_kl(ref, None, part))  # a against itself: one pass
        else:
            parts.append(exact_token_kl(policy.model, policy.reference, part))
    exact_kl, exact_entropy, log_a = (torch.cat([getattr(p, k) for p in parts]) for k in ("kl", "entropy", "log_a"))
    # pi = a: KL(a||a) is exactly 0. log pi from the same forward pass as log a, not the sampler's record (another
    # engine's, vLLM's, is a proposal's: fdpg.generation).
    log_pi = log_a if of_reference else torch.cat([p.log_pi for p in parts]).double()
    log_P = spec.target.log_P(log_a, features)
    keys = list(batch.prompts) if spec.target.conditional else [GLOBAL_KEY] * n

    statistics: dict[str, Callable[[torch.Tensor], float]] = {
        name: (lambda index, name=name: float(spec.metrics({k: v[index] for k, v in features.items()})[name]))
        for name in spec.metrics(features)
    }
    statistics.update({
        "kl_pi_a": lambda index: float((log_pi - log_a)[index].mean()),
        "kl_pi_a_exact": lambda index: float(exact_kl[index].mean()),
        "entropy": lambda index: float(-log_pi[index].mean()),
        "entropy_exact": lambda index: float(exact_entropy[index].mean()),
        "completion_length": lambda index: float(batch.lengths[index].double().mean()),
        **{f"distinct_{k}": (lambda index, k=k: distinct_n([tokens[i] for i in index.tolist()], k)) for k in (1, 2, 3)},
    })
    if divergence is not None:
        statistics["d_f"] = divergence_statistic(log_pi, log_P, keys, divergence)
    out: dict[str, Any] = {"n": n, **jackknifed(statistics, n)}
    out["examples"] = [{"prompt": p, "completion": c} for p, c in list(zip(batch.prompts, batch.texts))[:5]]
    if keep_log_ratios:
        out["log_ratios"] = {"log_pi": log_pi.tolist(), "log_P": log_P.tolist(), "keys": keys}
    return out


def jackknifed(statistics: dict[str, Callable[[torch.Tensor], float]], n: int) -> dict[str, float | None]:
    """Each statistic of all ``n`` samples (``None`` when not finite) and its grouped-jackknife ``NAME_se``."""
    everything = torch.arange(n)
    out: dict[str, float | None] = {}
    for name, statistic in statistics.items():
        value = statistic(everything)
        out[name] = value if math.isfinite(value) else None
        out[f"{name}_se"] = grouped_jackknife_se(statistic, n) if out[name] is not None else None
    return out


def divergence_statistic(log_pi: torch.Tensor, log_P: torch.Tensor, keys: Sequence[str], divergence
                         ) -> Callable[[torch.Tensor], float]:
    r"""``index -> D_f(pi||p)`` estimated from the samples ``index`` of :math:`\pi` with their :math:`\log P`, and
    :math:`\log Z` estimated from the same samples, :math:`\log\frac1n\sum_j P(x_j)/\pi(x_j)` (per prompt
    ``keys`` when the target is conditional)."""
    from objectives import LogZEstimator

    def tensor(values) -> torch.Tensor:  # JSON keeps log P = -inf (a violated constraint) as null
        if isinstance(values, torch.Tensor):
            return values.double()
        return torch.tensor([-math.inf if v is None else v for v in values], dtype=torch.float64)

    log_pi, log_P = tensor(log_pi), tensor(log_P)

    def d_f(index: torch.Tensor) -> float:
        estimator = LogZEstimator("running")
        chosen = [keys[i] for i in index.tolist()]
        estimator.update((log_P - log_pi)[index], chosen)
        log_z = estimator.log_z_many(chosen)
        log_p = torch.where(log_P[index] == -math.inf, log_P[index], log_P[index] - log_z)
        return float(divergence.estimate(log_pi[index], log_p))

    return d_f


def load_run_policy(run_dir: str | Path, trust_remote_code: bool = False):
    """The trained policy of a run directory (``final/``) with its reference, ready to sample."""
    from fdpg.models import load_causal_lm, load_tokenizer
    from fdpg.policy import Policy

    run_dir = Path(run_dir)
    config = json.loads((run_dir / "config.json").read_text())["config"]
    final = run_dir / "final"
    if not final.is_dir():
        raise FileNotFoundError(f"{run_dir} has no final/ model: the run did not finish (resume it first)")
    tokenizer = load_tokenizer(str(final), trust_remote_code=trust_remote_code)
    base = load_causal_lm(config["model"], trust_remote_code=trust_remote_code)
    if (final / "adapter_config.json").is_file():
        from peft import PeftModel

        return Policy(PeftModel.from_pretrained(base, str(final)), tokenizer)
    trained = load_causal_lm(str(final), trust_remote_code=trust_remote_code)
    return Policy(trained, tokenizer, reference=base)


#: The sampling seed of every run's final evaluation and of the base model's (the same prompts and uniforms),
#: and their completions per ``generate`` call (on a CPU, 64 rows cost little more than 16 in a decode step).
EVAL_SEED = 1234
EVAL_CHUNK = 64


def evaluation_cache_dir() -> Path:
    """``$FDPG_EVAL_CACHE``, else ``$FDPG_CACHE/evals`` (``~/.cache/fdpg/evals``): base-model evaluations, one JSON
    file per setting."""
    import os

    if os.environ.get("FDPG_EVAL_CACHE"):
        return Path(os.environ["FDPG_EVAL_CACHE"]).expanduser()
    return Path(os.environ.get("FDPG_CACHE") or "~/.cache/fdpg").expanduser() / "evals"


def base_evaluation(policy, spec, n: int, max_new_tokens: int, key: dict[str, Any], divergence=None,
                    progress: bool = True, cache_dir: Path | None = None) -> dict[str, Any]:
    r"""The reference model's own evaluation, computed once per ``key`` (model, task, prompts, length, n, seed,
    target) and cached as JSON in :func:`evaluation_cache_dir`, with its samples' log-ratios, so that runs with
    different divergences share it (their :math:`D_f(a\|p)` is computed from the cached log-ratios)."""
    import hashlib
    import os

    from fdpg.run_log import dumps

    key = {**key, "n": n, "max_new_tokens": max_new_tokens, "seed": EVAL_SEED, "chunk": EVAL_CHUNK,
           "prompts": hashlib.sha256("\n".join(spec.prompts or [""]).encode()).hexdigest(),
           "target": spec.target.describe()}
    backend = getattr(generator_of(policy), "name", "torch")
    if backend != "torch":  # other samples (vLLM's seeds, its bf16 q): not the torch loop's cached evaluation
        key["generation"] = backend
    digest = hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:16]
    path = (cache_dir or evaluation_cache_dir()) / f"base-{digest}.json"
    cached = None
    if path.is_file():
        try:
            cached = json.loads(path.read_text())["evaluation"]
            cached["log_ratios"]["log_pi"]  # a file without them (or torn): evaluate again
        except (ValueError, KeyError, TypeError):
            cached = None
    if cached is None:
        cached = evaluate_policy(policy, spec, n, max_new_tokens, EVAL_SEED, None, progress, of_reference=True,
                                 chunk=EVAL_CHUNK, keep_log_ratios=True)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(dumps({"key": key, "evaluation": cached}) + "\n")
        tmp.replace(path)
    ratios = cached.pop("log_ratios")
    if divergence is not None:  # D_f(a||p) of this divergence, from the cached samples' log-ratios
        statistic = divergence_statistic(ratios["log_pi"], ratios["log_P"], ratios["keys"], divergence)
        cached.update(jackknifed({"d_f": statistic}, len(ratios["keys"])))
    return cached


def run_evaluation(policy, spec, n: int, max_new_tokens: int, key: dict[str, Any], divergence=None,
                   progress: bool = True) -> dict[str, Any]:
    """What ``eval.json`` holds: the trained policy's and the base model's evaluations under the same settings."""
    return {"n": n, "seed": EVAL_SEED, "max_new_tokens": max_new_tokens,
            "policy": evaluate_policy(policy, spec, n, max_new_tokens, EVAL_SEED, divergence, progress,
                                      chunk=EVAL_CHUNK),
            "base": base_evaluation(policy, spec, n, max_new_tokens, key, divergence, progress)}
