r"""Sampling a model for evaluation or for fitting a target, and loading a trained run back.

``evaluate_policy`` draws N completions from :math:`\pi` (pure sampling, seeded), scores them with the
task, and reports the task's metrics next to :math:`KL(\pi\|a)` and Distinct-n, so that a base model
and a trained run can be compared side by side (``fdpg eval``). ``base_sampler`` gives tasks whose
target must be fitted before training (distributional constraints) a way to draw base samples.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fdpg.log_probs import completion_token_log_probs, exact_token_kl
from fdpg.metrics import distinct_n
from fdpg.onednn_linears import onednn_linears
from fdpg.sampling import SampleBatch, sample_completions
from fdpg.scores import checked_features

BaseSampler = Callable[[int], tuple[list[str], list[str]]]


def _prompts_for(pool: Sequence[str] | None, n: int, seed: int) -> list[str]:
    pool = list(pool) if pool else [""]
    rng = np.random.default_rng(seed)
    return [pool[i] for i in rng.choice(len(pool), size=n, replace=len(pool) < n)]


def draw_samples(policy, prompts: Sequence[str] | None, n: int, max_new_tokens: int, seed: int,
                 chunk: int = 16, reference: bool = False, progress: bool = True) -> SampleBatch:
    """``n`` pure samples of the policy (or of the reference :math:`a` when ``reference``)."""
    from tqdm.auto import tqdm

    chosen = _prompts_for(prompts, n, seed)
    batches = []
    with policy.reference() if reference else nullcontext(policy.model) as model, torch.no_grad(), \
            onednn_linears(model, prepack_rows=chunk):  # packed once for all chunks (CPU fp32)
        for lo in tqdm(range(0, n, chunk), desc="sampling", disable=not progress, leave=False):
            batches.append(sample_completions(model, policy.tokenizer, chosen[lo:lo + chunk], max_new_tokens,
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


def evaluate_policy(policy, spec, n: int, max_new_tokens: int, seed: int = 0) -> dict[str, Any]:
    """Task metrics, :math:`KL(\\pi\\|a)` and Distinct-n of ``n`` samples from the policy."""
    batch = draw_samples(policy, spec.prompts, n, max_new_tokens, seed)
    features = checked_features(spec.target, spec.scorer(list(batch.texts), list(batch.prompts)), len(batch))
    log_pi = batch.log_pi.double()
    with policy.reference() as ref:
        log_a = sequence_log_probs(ref, batch)
    tokens = [row[:k].tolist() for row, k in zip(batch.completion_ids, batch.lengths)]
    out: dict[str, Any] = {"n": n, **{k: float(v) for k, v in spec.metrics(features).items()}}
    out["kl_pi_a"] = float((log_pi - log_a).mean())
    out["kl_pi_a_stderr"] = float((log_pi - log_a).std() / max(n, 1) ** 0.5)
    # The exact next-token KL and entropy summed over each sample's prefix (never negative, lower variance).
    parts = [exact_token_kl(policy.model, policy.reference, batch.slice(lo, lo + 16)) for lo in range(0, n, 16)]
    kl, entropy = torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
    out["kl_pi_a_exact"] = float(kl.mean())
    out["kl_pi_a_exact_stderr"] = float(kl.std() / max(n, 1) ** 0.5) if n > 1 else None
    out["entropy_exact"] = float(entropy.mean())
    out["completion_length"] = float(batch.lengths.double().mean())
    for k in (1, 2, 3):
        out[f"distinct_{k}"] = distinct_n(tokens, k)
    out["examples"] = [{"prompt": p, "completion": c} for p, c in list(zip(batch.prompts, batch.texts))[:5]]
    return out


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
