"""How far bf16 autocast moves the per-token log-probs log pi(y_t | x, y_<t) of workload W's model from fp32.

Two comparisons, one JSON line:

1. bf16 against fp32 (``token_abs_*``, ``sequence_abs``): ``--n`` completions (pure sampling, up to 48 tokens) of
   the first ``--n`` prompts of W sampled in fp32, scored twice with :func:`fdpg.log_probs.completion_token_log_probs`:
   in fp32 and under ``torch.autocast("cpu", dtype=torch.bfloat16)``: how far the bf16 policy is from the fp32 one;
2. what sampling records against the training forward, both in bf16 (``sampling_vs_forward_bf16_*``): completions
   sampled as ``--mixed_precision bf16`` samples them (autocast, the weights cast once:
   :mod:`fdpg.cast_linears`, KV-cached decode), their recorded per-token ``log q`` against a grad-enabled forward
   under autocast over the same tokens (the training pass); and the same pair in fp32
   (``sampling_vs_forward_fp32_*``, the oneDNN-merged decode against the MKL forward) for scale. This is the
   size of log q - log pi_theta that the f-DPG estimate treats as 0.

Runs on any CPU (slowly where bf16 is not native: a few minutes for 4 completions on a 2-core AVX2 machine).

    python bench/bf16_error.py [--n 4]
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common  # noqa: E402
from common import MAX_NEW_TOKENS, MODEL, PROMPTS  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=4, help="completions (at most the 16 prompts of W)")
    args = ap.parse_args()
    import torch

    from fdpg.log_probs import completion_token_log_probs
    from fdpg.models import load_causal_lm, load_tokenizer
    from fdpg.onednn_linears import onednn_linears
    from fdpg.sampling import sample_completions

    model, tok = load_causal_lm(MODEL), load_tokenizer(MODEL)
    batch = sample_completions(model, tok, PROMPTS[:args.n], MAX_NEW_TOKENS, seed=0)
    mask = batch.completion_mask.bool()
    with torch.inference_mode():
        fp32 = completion_token_log_probs(model, batch)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            bf16 = completion_token_log_probs(model, batch)
    diff = (bf16 - fp32).double()
    recorded = {}
    for name, autocast in (("fp32", False), ("bf16", True)):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            with torch.no_grad(), onednn_linears(model, prepack_rows=args.n):
                sampled = sample_completions(model, tok, PROMPTS[:args.n], MAX_NEW_TOKENS, seed=1)
            forward = completion_token_log_probs(model, sampled).detach()  # grad on: the training pass
        gap = (sampled.token_log_q - forward).double() * sampled.completion_mask
        recorded[name] = {f"sampling_vs_forward_{name}_token_abs_max": round(float(gap.abs().max()), 5),
                          f"sampling_vs_forward_{name}_sequence_abs": [round(float(x), 5) for x in gap.sum(-1).abs()]}
    common.emit({
        "bench": "bf16_error", "tokens": int(mask.sum()),
        "token_abs_mean": round(float(diff[mask].abs().mean()), 4),
        "token_abs_max": round(float(diff[mask].abs().max()), 4),
        "sequence_abs": [round(float(x), 4) for x in (diff * mask).sum(-1).abs()],
        "sequence_log_pi_fp32": [round(float(x), 2) for x in (fp32 * mask).sum(-1)],
        **recorded["bf16"], **recorded["fp32"],
        **common.machine(),
    })


if __name__ == "__main__":
    main()
