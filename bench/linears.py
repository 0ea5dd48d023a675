"""MKL against oneDNN for the model's linear layers, alone and inside sampling and the reference pass (W, fp32).

Three measurements, each alternated over ``--rounds`` (medians reported), on workload W's LoRA model:

1. ``layers``: every ``nn.Linear`` of the model once (the 30 layers' 7 projections and the LM head), ``x W^T``
   for ``rows`` = 16 (a decode step) and 450 (a reference micro-batch of 8 x ~56 tokens), through MKL
   (``F.linear``), oneDNN on the weight as it is, and oneDNN on a weight reordered for that row count; the
   weights are walked in order, so they come from memory, not cache, as in a real pass;
2. ``generate``: ``fdpg.sampling.sample_completions`` (16 prompts x 48 tokens) with and without
   ``fdpg.onednn_linears.onednn_linears`` (prepacked, LoRA merged, packing time included);
3. ``reference``: the trainer's reference log-probs of one step's batch with and without it (weights as they are).

On a CPU with native bf16 also what ``--mixed_precision bf16`` multiplies by: in 1., the bf16 copies of the weights
through ``F.linear`` and prepacked for oneDNN; and a whole ``generate`` under bf16 autocast with the cast copies
plain or prepacked (``fdpg.cast_linears``).

    python bench/linears.py [--rounds 3]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
from contextlib import contextmanager

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common  # noqa: E402
from common import MAX_NEW_TOKENS, PROMPTS  # noqa: E402
from step import build_trainer  # noqa: E402


def bf16_generate_s(model, tokenizer, rounds: int) -> dict[str, float]:
    """Seconds for a whole ``generate`` under bf16 autocast with the weights cast once, prepacked for oneDNN or not
    (``fdpg.cast_linears``; packing time included), alternated over rounds."""
    import torch

    import fdpg.cast_linears

    available = fdpg.cast_linears.bf16_prepacking_available
    times: dict[str, list[float]] = {"generate_bf16_cast_s": [], "generate_bf16_prepacked_s": []}
    try:
        for r in range(rounds + 1):
            order = [("generate_bf16_cast_s", lambda *_: False), ("generate_bf16_prepacked_s", available)]
            for name, packing in order if r % 2 else order[::-1]:
                fdpg.cast_linears.bf16_prepacking_available = packing
                start = common.now()
                with torch.autocast("cpu", dtype=torch.bfloat16):
                    fdpg.sampling.sample_completions(model, tokenizer, PROMPTS, MAX_NEW_TOKENS, seed=r)
                if r:
                    times[name].append(common.now() - start)
                common.log(f"[linears] round {r} {name}: {common.now() - start:.2f} s")
    finally:
        fdpg.cast_linears.bf16_prepacking_available = available
    return {k: round(statistics.median(v), 3) for k, v in times.items()}


def layer_pass_ms(model, rows: int, rounds: int) -> dict[str, float]:
    """Milliseconds for one product with every linear layer of ``model`` (``rows`` rows), per implementation."""
    import torch
    import torch.nn.functional as F

    linears = [m for m in model.modules() if type(m) is torch.nn.Linear and min(m.weight.shape) > 64]  # not A, B
    weights = [m.weight.detach() for m in linears]
    inputs = {k: torch.randn(rows, k) for k in {w.shape[1] for w in weights}}
    packed = [torch.ops.mkldnn._reorder_linear_weight(w.contiguous(), rows) for w in weights]

    def mkl():
        for w in weights:
            F.linear(inputs[w.shape[1]], w)

    def onednn(ws):
        for w in ws:
            torch.ops.mkldnn._linear_pointwise(inputs[w.shape[1]], w, None, "none", [], "")

    variants = {"mkl": mkl, "onednn": lambda: onednn(weights), "onednn_prepacked": lambda: onednn(packed)}
    from fdpg.engine import cpu_bf16_is_native

    if cpu_bf16_is_native():  # what --mixed_precision bf16 multiplies by: the cast copies, plain or prepacked
        bf16 = [w.to(torch.bfloat16) for w in weights]
        bf16_packed = [torch.ops.mkldnn._reorder_linear_weight(w, rows) for w in bf16]
        bf16_inputs = {k: x.to(torch.bfloat16) for k, x in inputs.items()}

        def bf16_pass(ws, packed_weights: bool):
            for w in ws:
                x = bf16_inputs[w.shape[1]]
                if packed_weights:
                    torch.ops.mkldnn._linear_pointwise(x, w, None, "none", [], "")
                else:
                    F.linear(x, w)

        variants |= {"bf16_linear": lambda: bf16_pass(bf16, False),
                     "bf16_onednn_prepacked": lambda: bf16_pass(bf16_packed, True)}
    times: dict[str, list[float]] = {k: [] for k in variants}
    with torch.inference_mode():
        for _ in range(rounds + 1):  # the first round warms up
            for name, run in variants.items():
                start = common.now()
                run()
                times[name].append((common.now() - start) * 1e3)
    return {k: round(statistics.median(v[1:]), 1) for k, v in times.items()} | {"layers": len(weights)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--no_wait", action="store_true")
    args = ap.parse_args()
    if not args.no_wait:
        common.wait_quiet()
    load0 = common.loadavg()
    contention = common.Contention()

    import fdpg.engine
    import fdpg.sampling
    from fdpg.engine import cpu_bf16_is_native
    from fdpg.onednn_linears import onednn_linears

    @contextmanager
    def plain(model, prepack_rows):
        yield 0

    trainer = build_trainer()
    model = trainer._unwrapped()
    tokenizer = trainer.policy.tokenizer
    record: dict = {"bench": "linears", "workload": "W", "rows_decode": len(PROMPTS)}
    record["layers_decode_ms"] = layer_pass_ms(model, len(PROMPTS), args.rounds)
    record["layers_reference_ms"] = layer_pass_ms(model, 450, args.rounds)
    common.log("[linears] layers:", record["layers_decode_ms"], record["layers_reference_ms"])

    times: dict[str, list[float]] = {f"{phase}_{impl}": [] for phase in ("generate", "reference")
                                     for impl in ("mkl", "onednn")}
    batch = trainer.sample(0)
    for r in range(args.rounds + 1):
        order = [("mkl", plain), ("onednn", onednn_linears)]
        for impl, ctx in order if r % 2 else order[::-1]:
            fdpg.sampling.onednn_linears = fdpg.engine.onednn_linears = ctx
            start = common.now()
            fdpg.sampling.sample_completions(model, tokenizer, PROMPTS, MAX_NEW_TOKENS, seed=r)
            generate = common.now() - start
            start = common.now()
            trainer.sequence_log_probs(batch, reference=True)
            reference = common.now() - start
            if r:  # round 0 warms up
                times[f"generate_{impl}"].append(generate)
                times[f"reference_{impl}"].append(reference)
            common.log(f"[linears] round {r} {impl}: generate {generate:.2f} s, reference {reference:.2f} s")
    fdpg.sampling.onednn_linears = fdpg.engine.onednn_linears = onednn_linears
    for name, values in times.items():
        record[f"{name}_s"] = round(statistics.median(values), 3)
    for phase in ("generate", "reference"):
        record[f"{phase}_speedup"] = round(record[f"{phase}_mkl_s"] / record[f"{phase}_onednn_s"], 3)
    if cpu_bf16_is_native():
        record |= bf16_generate_s(model, tokenizer, args.rounds)
    common.emit(record | common.footer(contention, load0))


if __name__ == "__main__":
    main()
