"""How far bf16 autocast moves the per-token log-probs log pi(y_t | x, y_<t) of workload W's model from fp32.

Samples ``--n`` completions (pure sampling, up to 48 tokens) from the first ``--n`` prompts of W in fp32, then
scores them twice with :func:`fdpg.log_probs.completion_token_log_probs`: in fp32 and under
``torch.autocast("cpu", dtype=torch.bfloat16)``. Prints one JSON line: mean and max absolute per-token
difference, and the absolute difference of each completion's log pi(y|x) (what enters the ratio pi/p).
Runs on any CPU (slowly where bf16 is not native: ~30 s for 4 completions on a 2-core AVX2 machine).

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
    from fdpg.sampling import sample_completions

    model, tok = load_causal_lm(MODEL), load_tokenizer(MODEL)
    batch = sample_completions(model, tok, PROMPTS[:args.n], MAX_NEW_TOKENS, seed=0)
    mask = batch.completion_mask.bool()
    with torch.inference_mode():
        fp32 = completion_token_log_probs(model, batch)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            bf16 = completion_token_log_probs(model, batch)
    diff = (bf16 - fp32).double()
    common.emit({
        "bench": "bf16_error", "tokens": int(mask.sum()),
        "token_abs_mean": round(float(diff[mask].abs().mean()), 4),
        "token_abs_max": round(float(diff[mask].abs().max()), 4),
        "sequence_abs": [round(float(x), 4) for x in (diff * mask).sum(-1).abs()],
        "sequence_log_pi_fp32": [round(float(x), 2) for x in (fp32 * mask).sum(-1)],
        **common.machine(),
    })


if __name__ == "__main__":
    main()
