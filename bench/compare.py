"""fdpg's step against the lean floor, alternated step by step in one process (same machine state).

Builds the fdpg trainer (bench/step.py) and the floor (bench/floor.py) on W (``--full``: W-full), runs
``--warmup`` untimed steps of each, then ``--steps`` rounds of (fdpg step, floor step) — the order flips every
round so neither always runs right after the other — and prints one JSON line with both medians, the ratio
fdpg/floor (target <= 1.15), the per-round ratios and each side's phase medians. Peak RSS is not reported
here (two models live in this process): see step.py / floor.py / peers.py.

    python bench/compare.py [--full] [--steps 10] [--warmup 1] [--mixed_precision bf16]
        [--floors generate,lean+tlin]   (several floor variants, each alternated with fdpg; the first one is
                                          "floor", the reference of ratio_fdpg_over_floor)
        [--fdpg_autocast_casts]          (bf16: also fdpg with autocast's own casts, side "fdpg:autocast_casts")
        [--fdpg_fp32]                    (bf16: also fdpg in fp32, side "fdpg:fp32": ratio_bf16_over_fp32)
        [--floors ""]                    (no floor: fdpg's sides only)

``--fdpg_autocast_casts`` alternates, in the same process, a second fdpg trainer whose steps run without the
cast-once copies this engine adds under bf16 (no prepacked bf16 weights for sampling, autocast's per-call casts of
the frozen weights in the training pass and of the LM head at every chunk; what fdpg did before them): their
before and after on one machine state, as ``ratio_fdpg_over_autocast_casts``.
"""

from __future__ import annotations

import argparse
import os
import sys
from contextlib import contextmanager

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common  # noqa: E402
from floor import Floor  # noqa: E402
from step import FdpgStepper  # noqa: E402


@contextmanager
def autocast_casts():
    """Within the block fdpg's bf16 passes cast as plain autocast does (the engine before the cast-once copies)."""
    import fdpg.cast_linears
    import fdpg.engine
    import fdpg.log_probs

    @contextmanager
    def nothing(*_):
        yield 0

    patches = [(fdpg.cast_linears, "bf16_prepacking_available", lambda *_: False),
               (fdpg.engine, "cast_frozen_linears", nothing),
               (fdpg.log_probs, "frozen_product_weights", lambda head: (head.weight, head.bias))]
    saved = [(module, name, getattr(module, name)) for module, name, _ in patches]
    try:
        for module, name, value in patches:
            setattr(module, name, value)
        yield
    finally:
        for module, name, value in saved:
            setattr(module, name, value)


class AutocastCastsStepper(FdpgStepper):
    """fdpg's step with autocast's own casts (:func:`autocast_casts`)."""

    def __call__(self, i: int) -> dict:
        with autocast_casts():
            return super().__call__(i)


class OwnAcceleratorState:
    """A stepper run with its own accelerate state: ``AcceleratorState`` is one shared (Borg) dict per process, so
    trainers of two ``--mixed_precision`` settings live side by side only if each step runs with the dict its trainer
    was built with (``--fdpg_fp32``: the fp32 trainer is built first, its state kept, then the state reset for the
    bf16 one)."""

    def __init__(self, build):
        from accelerate.state import AcceleratorState

        AcceleratorState._reset_state()
        self.stepper = build()
        self.state = dict(AcceleratorState._shared_state)

    def __call__(self, i: int) -> dict:
        from accelerate.state import AcceleratorState

        shared = AcceleratorState._shared_state
        saved = dict(shared)
        shared.clear()
        shared.update(self.state)
        try:
            return self.stepper(i)
        finally:
            shared.clear()
            shared.update(saved)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--full", action="store_true")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--mixed_precision", default="no", choices=["no", "bf16"],
                    help="bf16: accelerate autocast in fdpg and torch.autocast in the floor")
    ap.add_argument("--floors", default="lean,generate",
                    help="comma-separated floor variants (bench/floor.py --variant); the first is the reference")
    ap.add_argument("--no_fdpg", action="store_true", help="alternate the floor variants only")
    ap.add_argument("--fdpg_autocast_casts", action="store_true",
                    help="also alternate fdpg without its bf16 cast-once copies (side fdpg:autocast_casts)")
    ap.add_argument("--fdpg_fp32", action="store_true",
                    help="also alternate fdpg in fp32 (side fdpg:fp32): the bf16 step over the fp32 step")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--interop_threads", type=int, default=None)
    ap.add_argument("--no_wait", action="store_true", help="start even if other processes keep the CPU busy")
    args = ap.parse_args()
    common.set_threads(args.threads, args.interop_threads)
    if not args.no_wait and not getattr(args, "worker", None):
        common.wait_quiet()
    load0 = common.loadavg()
    contention = common.Contention()
    sides = {}
    if args.fdpg_fp32:
        sides["fdpg:fp32"] = OwnAcceleratorState(lambda: FdpgStepper(args.full, "no"))
    if not args.no_fdpg:
        sides["fdpg"] = (OwnAcceleratorState(lambda: FdpgStepper(args.full, args.mixed_precision)) if args.fdpg_fp32
                         else FdpgStepper(args.full, args.mixed_precision))
    if args.fdpg_autocast_casts:
        sides["fdpg:autocast_casts"] = AutocastCastsStepper(args.full, args.mixed_precision)
    variants = [v.strip() for v in args.floors.split(",") if v.strip()]
    if args.mixed_precision == "bf16":
        variants = [v if "bf16" in v.split("+") else v + "+bf16" for v in variants]
    for j, v in enumerate(variants):
        sides["floor" if j == 0 else f"floor:{v}"] = Floor(args.full, v)
    names = list(sides)
    recs: dict[str, list[dict]] = {k: [] for k in sides}
    ratios, cast_ratios, fp32_ratios = [], [], []
    for i in range(args.warmup + args.steps):
        order = names[i % len(names):] + names[:i % len(names)]  # rotate: nobody always runs first
        this = {}
        for name in order:
            c = common.Contention()
            this[name] = sides[name](i)
            this[name]["others"] = c.others_cores()
        warm = i < args.warmup
        common.log(f"[compare] round {i}{' (warm-up)' if warm else ''}: "
                   + ", ".join(f"{n} {this[n]['time']:.2f} s" for n in names)
                   + f"; other processes {max(r['others'] for r in this.values())} cores")
        if not warm:
            for name in sides:
                recs[name].append(this[name])
            if "fdpg:fp32" in this:
                fp32_ratios.append(this["fdpg"]["time"] / this["fdpg:fp32"]["time"])
            if "fdpg" in this and "floor" in this:
                ratios.append(this["fdpg"]["time"] / this["floor"]["time"])
            if "fdpg:autocast_casts" in this:
                cast_ratios.append(this["fdpg"]["time"] / this["fdpg:autocast_casts"]["time"])
    out: dict = {"bench": "compare", "workload": "W-full" if args.full else "W",
                 "mixed_precision": args.mixed_precision, "floor_variant": variants[0] if variants else None}
    busy = [max(recs[n][k]["others"] for n in names) for k in range(args.steps)]
    calm = [k for k in range(args.steps) if busy[k] < common.QUIET] or list(range(args.steps))
    out["rounds_quiet"] = f"{len(calm)}/{args.steps}"  # medians below are over these rounds only
    for name, rs in recs.items():
        rs = [rs[k] for k in calm]
        out[name] = {**common.summarise([r["time"] for r in rs], [r["tokens"] for r in rs]),
                     "phases_s": common.phase_medians(rs)}
    if fp32_ratios:
        out["ratio_bf16_over_fp32"] = round(out["fdpg"]["s_per_step"] / out["fdpg:fp32"]["s_per_step"], 3)
        out["ratio_bf16_over_fp32_per_round_median"] = round(common.median([fp32_ratios[k] for k in calm]), 3)
        out["phase_ratios_bf16_over_fp32"] = {
            k: round(v / out["fdpg:fp32"]["phases_s"][k], 3) for k, v in out["fdpg"]["phases_s"].items()
            if out["fdpg:fp32"]["phases_s"].get(k)}
    if "fdpg" in out and "floor" in out:
        out["ratio_fdpg_over_floor"] = round(out["fdpg"]["s_per_step"] / out["floor"]["s_per_step"], 3)
        out["ratio_per_round_median"] = round(common.median([ratios[k] for k in calm]), 3)
        out["ratios_per_round"] = [round(r, 3) for r in ratios]
    if cast_ratios:
        out["ratio_fdpg_over_autocast_casts"] = round(
            out["fdpg"]["s_per_step"] / out["fdpg:autocast_casts"]["s_per_step"], 3)
        out["ratio_over_autocast_casts_per_round_median"] = round(common.median([cast_ratios[k] for k in calm]), 3)
    out["others_busy_per_round"] = busy
    out.update(common.footer(contention, load0))
    common.emit(out)


if __name__ == "__main__":
    main()
