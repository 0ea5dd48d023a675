"""The machine's matmul ceiling and the model FLOPs of one step of W, hence the step's efficiency.

Ceiling: the best of several timed ``torch.mm`` of large square matrices (fp32 through MKL, the library torch
uses for fp32 matmuls; fp32 through oneDNN, which on this AMD CPU runs ~2x faster than MKL as MKL dispatches
itself on a non-Intel CPU; bf16), plus the same for
the two matmul shapes the step really runs: a whole-sequence pass (``[16*56, 576] @ [576, 1536]``) and a
decode step (``[16, 576] @ [576, 1536]``, bound by memory, not arithmetic).

Model FLOPs of one step (multiply-add = 2 FLOPs; SmolLM2-135M: 30 layers, d 576, MLP 1536, 9 query / 3 kv
heads of 64, vocab 49152 tied; N_body = 106.2M parameters in the decoder layers' matmuls, N_head = 28.3M in the
LM head). With B rows, prompts left-padded to P and completions of T tokens (W: B 16, P 8, T 48), counting the
shapes the hardware computes (padding included), attention scores/values as ``4 * L * d_attn * context``:

- generation (KV cache): prefill ``B*P`` tokens through the body + the head once per row; then ``T-1``
  decode steps of ``B`` tokens through body + head: ``2*N_body*B*(P+T-1) + 2*N_head*B*T`` + attention;
- reference forward (no grad, head on the T+1 last positions): ``2*N_body*B*(P+T) + 2*N_head*B*(T+1)``;
- training pass: forward as the reference, backward = activation gradients (same FLOPs as the forward) plus
  weight gradients (same again) of *trained* weights only: LoRA ~ 2x forward (4*N per token), full
  fine-tuning 3x forward (the usual 6*N per token).

    python bench/flops.py [--full] [--step_s S] [--phases '{"generate": 6.7, ...}']

Without ``--step_s``, the efficiency is rated from ``bench/results/<cpu capability>/compare[_full].json``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common  # noqa: E402
from common import BATCH, MAX_NEW_TOKENS  # noqa: E402

L, D, FF, HEADS, KV, HD, V = 30, 576, 1536, 9, 3, 64, 49152
N_BODY = L * (D * HEADS * HD + 2 * D * KV * HD + HEADS * HD * D + 3 * D * FF)
N_HEAD = D * V
N_LORA = L * 2 * 8 * (D + D)  # r=8 on q_proj (576->576) and v_proj (576->192): A [8,576] + B [out,8]


def best_seconds(call, reps: int = 5, min_time: float = 0.3) -> float:
    """The best over ``reps`` rounds of the mean time of ``call()``, each round repeating it for ``min_time`` s."""
    call()
    best = float("inf")
    for _ in range(reps):
        it, t0 = 0, time.perf_counter()
        while True:
            call()
            it += 1
            el = time.perf_counter() - t0
            if el >= min_time:
                break
        best = min(best, el / it)
    return best


def mm_gflops(m: int, k: int, n: int, dtype, reps: int = 5, min_time: float = 0.3) -> float:
    import torch

    a = torch.randn(m, k).to(dtype)
    b = torch.randn(k, n).to(dtype)
    return 2 * m * k * n / best_seconds(lambda: torch.mm(a, b), reps, min_time) / 1e9


def onednn_linear_gflops(m: int, k: int, n: int, reps: int = 5, min_time: float = 0.3) -> float:
    """fp32 ``x @ W^T`` through oneDNN (``torch.utils.mkldnn.to_mkldnn``, strict fp32 math), not MKL."""
    import torch
    import torch.utils.mkldnn

    lin = torch.utils.mkldnn.to_mkldnn(torch.nn.Linear(k, n, bias=False).eval())
    x = torch.randn(m, k)
    with torch.inference_mode():
        return 2 * m * k * n / best_seconds(lambda: lin(x), reps, min_time) / 1e9


def attention_flops(b: int, q_tokens_ctx: list[tuple[int, int]]) -> float:
    """Scores + values: 2 matmuls of 2*HEADS*HD FLOPs per (query, key) pair per layer."""
    return sum(4 * L * HEADS * HD * q * ctx for q, ctx in q_tokens_ctx) * b


def step_flops(full: bool, b: int = BATCH, p: int = 8, t: int = MAX_NEW_TOKENS) -> dict[str, float]:
    gen = 2 * N_BODY * b * (p + t - 1) + 2 * N_HEAD * b * t
    gen += attention_flops(b, [(p, p)] + [(1, p + i) for i in range(1, t)])
    fwd = 2 * N_BODY * b * (p + t) + 2 * N_HEAD * b * (t + 1) + attention_flops(b, [(p + t, p + t)])
    ref = fwd
    # backward of the body: activation gradients (= forward) + weight gradients of trained weights
    train = fwd * (3 if full else 2) + (0 if full else 2 * 2 * N_LORA * b * (p + t))
    return {"generate": gen, "reference": ref, "train": train, "total": gen + ref + train}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--full", action="store_true")
    ap.add_argument("--step_s", type=float, default=None, help="a measured step time to rate")
    ap.add_argument("--phases", default=None, help="JSON of measured phase times (generate, reference, backward)")
    ap.add_argument("--results", default=None,
                    help="a compare.py result to rate (default: results/<cpu capability>/compare[_full].json)")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--no_wait", action="store_true", help="start even if other processes keep the CPU busy")
    args = ap.parse_args()
    common.set_threads(args.threads, None)
    import torch

    if not args.no_wait and not getattr(args, "worker", None):
        common.wait_quiet()
    load0 = common.loadavg()
    contention = common.Contention()
    # Without native bf16 (avx512_bf16 / AMX) a bf16 matmul takes a scalar path ~50x slower than fp32: a
    # 4096^3 product would take minutes, so the bf16 rates are measured on a 512^3 product there.
    from fdpg.algorithms.f_dpg import cpu_bf16_is_native

    n_bf16 = 4096 if cpu_bf16_is_native() else 512
    ceiling = {
        "fp32_mm_4096_gflops": mm_gflops(4096, 4096, 4096, torch.float32),
        "fp32_onednn_4096_gflops": onednn_linear_gflops(4096, 4096, 4096),
        f"bf16_mm_{n_bf16}_gflops": mm_gflops(n_bf16, n_bf16, n_bf16, torch.bfloat16),
        "fp32_seq_pass_shape_gflops": mm_gflops(BATCH * 56, D, FF, torch.float32),
        "fp32_decode_shape_gflops": mm_gflops(BATCH, D, FF, torch.float32),
        "bf16_seq_pass_shape_gflops": mm_gflops(BATCH * 56, D, FF, torch.bfloat16),
        "bf16_decode_shape_gflops": mm_gflops(BATCH, D, FF, torch.bfloat16),
    }
    ceiling = {k: round(v, 1) for k, v in ceiling.items()}
    fl = step_flops(args.full)
    out: dict = {"bench": "flops", "workload": "W-full" if args.full else "W", **ceiling,
                 "params_body": N_BODY, "params_head": N_HEAD,
                 "step_gflop": {k: round(v / 1e9, 1) for k, v in fl.items()}}
    measured = {}
    if args.step_s:
        measured = {"fdpg": {"s_per_step": args.step_s, "phases_s": json.loads(args.phases or "{}")}}
    else:
        results = args.results or os.path.join(
            os.path.dirname(os.path.abspath(__file__)), "results", torch.backends.cpu.get_cpu_capability().lower(),
            "compare_full.json" if args.full else "compare.json")
        rec = json.loads(Path(results).read_text().strip().splitlines()[-1]) if os.path.exists(results) else {}
        if rec.get("workload") == out["workload"]:
            measured = {k: rec[k] for k in ("fdpg", "floor") if k in rec}
            out["rated_from"] = os.path.relpath(results)
    peak = max(ceiling["fp32_mm_4096_gflops"], ceiling["fp32_onednn_4096_gflops"])
    out["fp32_ceiling_gflops"] = peak  # the best fp32 matmul this machine ran (MKL as dispatched, or oneDNN)
    for name, m in measured.items():
        s = m["s_per_step"]
        ph = m.get("phases_s", {})
        eff = {"achieved_gflops": round(fl["total"] / s / 1e9, 1),
               "fraction_of_fp32_ceiling": round(fl["total"] / s / 1e9 / peak, 3),
               "fraction_of_torch_mm_fp32": round(fl["total"] / s / 1e9 / ceiling["fp32_mm_4096_gflops"], 3)}
        for phase, key in (("generate", "generate"), ("reference", "reference"), ("backward", "train")):
            if ph.get(phase):
                eff[f"{phase}_gflops"] = round(fl[key] / ph[phase] / 1e9, 1)
        # the fastest the step could be at the fp32 matmul ceiling
        eff["s_per_step_at_ceiling"] = round(fl["total"] / (peak * 1e9), 3)
        out[name] = eff
    out.update(common.footer(contention, load0))
    common.emit(out)


if __name__ == "__main__":
    main()
