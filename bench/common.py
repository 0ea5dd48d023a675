"""Shared pieces of the benchmarks: workload W, measurement helpers, the one-JSON-line output.

Workload W (see README.md): SmolLM2-135M-Instruct, LoRA r=8 alpha=16 on q_proj,v_proj (W-full: full
fine-tuning), 16 completions per step of at most 48 new tokens by pure sampling (temperature 1, top_k 0,
top_p 1) from 16 short raw prompts, reward = VADER compound, beta = 0.1, Adam lr 1e-4, one update per batch.

Completion lengths: every framework samples with the model's own end-of-sequence token (pure sampling; no
``min_new_tokens``, which would change the distribution). ``generate`` runs until the *longest* of the 16
completions ends, so a step almost always costs 48 decoding steps; the scripts report the completion tokens
per step and per second besides completions/s, so that a step that happened to stop early is visible.
"""

from __future__ import annotations

import json
import os
import resource
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

MODEL = "smollm2-135m-instruct"
BATCH = 16
MAX_NEW_TOKENS = 48
BETA = 0.1
LR = 1e-4
LORA_R, LORA_ALPHA, LORA_TARGETS = 8, 16.0, "q_proj,v_proj"

#: 16 short raw prompts ("Movie review:"-style; the sentiment task's 8 and 8 more of the same kind).
PROMPTS = [
    "Movie review:",
    "Here is my review of the film:",
    "I just watched this movie and",
    "Review of the new restaurant downtown:",
    "My honest opinion of the book:",
    "The concert last night was",
    "Customer review:",
    "What I think about this product:",
    "Film review:",
    "The new album is",
    "My review of the hotel:",
    "Book review:",
    "I tried the new cafe and",
    "The play I saw yesterday was",
    "Product review:",
    "This series is",
]


def log(*args: Any) -> None:
    print(*args, file=sys.stderr, flush=True)


def emit(record: dict[str, Any]) -> None:
    """The script's one JSON line on stdout."""
    print(json.dumps(record, sort_keys=False), flush=True)


def peak_rss_mb() -> float:
    """Peak resident set size of this process (ru_maxrss is in KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def loadavg() -> float:
    return round(os.getloadavg()[0], 2)


def _machine_busy_s() -> float:
    """CPU seconds all processes of the machine have spent busy since boot (/proc/stat)."""
    with open("/proc/stat") as fh:
        parts = [int(x) for x in fh.readline().split()[1:]]
    idle = parts[3] + parts[4]  # idle + iowait
    return (sum(parts[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def _own_user_sys_s() -> tuple[float, float]:
    """User and kernel CPU seconds of this process and its finished children."""
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + kids.ru_utime, me.ru_stime + kids.ru_stime


def _own_cpu_s() -> float:
    return sum(_own_user_sys_s())


class Contention:
    """How many cores *other* processes kept busy while this measurement ran (0 = a quiet machine).

    Machine-wide busy CPU time (/proc/stat) minus this process's (and its finished children's) CPU time,
    divided by the wall time. A value above ~0.2 means the numbers were taken under load.
    """

    def __init__(self) -> None:
        self.t, self.busy, self.own = time.perf_counter(), _machine_busy_s(), _own_cpu_s()
        self.user, self.sys = _own_user_sys_s()

    def own_split(self) -> dict[str, float]:
        """This process's (and its finished children's) user and kernel CPU seconds per wall second since the
        start (kernel time: page faults, ...)."""
        wall = time.perf_counter() - self.t
        user, sys_ = _own_user_sys_s()
        return {"own_user_cores": round((user - self.user) / wall, 2),
                "own_sys_cores": round((sys_ - self.sys) / wall, 2)}

    def others_cores(self) -> float:
        wall = time.perf_counter() - self.t
        others = (_machine_busy_s() - self.busy) - (_own_cpu_s() - self.own)
        return round(max(others, 0.0) / wall, 2) if wall > 0 else 0.0


def wait_quiet(threshold: float = 0.3, probe_s: float = 5.0, max_wait_s: float = 900.0) -> float:
    """Wait (up to ``max_wait_s``) until other processes use less than ``threshold`` cores; return the wait."""
    start = time.perf_counter()
    while True:
        c = Contention()
        time.sleep(probe_s)
        busy = c.others_cores()
        waited = time.perf_counter() - start
        if busy < threshold or waited >= max_wait_s:
            log(f"[bench] machine: other processes use {busy} cores (waited {waited:.0f} s)")
            return waited
        log(f"[bench] machine busy ({busy} cores used by others); waiting")
        time.sleep(30)


def footer(contention: Contention, load_start: float) -> dict[str, Any]:
    """The fields every result line ends with: contention, load averages, machine."""
    return {"others_busy_cores": contention.others_cores(), **contention.own_split(), "load_start": load_start,
            "load_end": loadavg(), **machine()}


def machine() -> dict[str, Any]:
    import torch

    from fdpg.engine import cpu_bf16_is_native, cpu_has_amx

    return {"cores": os.cpu_count(), "cpu": torch.backends.cpu.get_cpu_capability(),
            "bf16_native": cpu_bf16_is_native(), "amx": cpu_has_amx(), "torch": torch.__version__,
            "threads": torch.get_num_threads(), "interop_threads": torch.get_num_interop_threads()}


def median(xs: Sequence[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def summarise(times: Sequence[float], tokens: Sequence[int], completions: int = BATCH) -> dict[str, float]:
    """s/step (median), completions/s and completion tokens/s (at the median step time)."""
    s = median(times)
    tok = median(tokens) if tokens else float("nan")
    return {"s_per_step": round(s, 3), "s_per_step_min": round(min(times), 3), "s_per_step_max": round(max(times), 3),
            "completions_per_s": round(completions / s, 3), "tokens_per_step": tok,
            "tokens_per_s": round(tok / s, 1), "steps_timed": len(times)}


NOT_PHASES = {"time", "tokens", "reward", "others", "proposal"}


QUIET = 0.2  # other processes' cores above which a timed step counts as taken under load


def quiet(records: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """The records of steps during which other processes used less than QUIET cores."""
    return [r for r in records if r.get("others", 0.0) < QUIET]


def phase_medians(records: Sequence[dict[str, float]]) -> dict[str, float]:
    """Median of every phase time in step records (keys other than NOT_PHASES)."""
    phases = [{k: v for k, v in r.items() if k not in NOT_PHASES} for r in records]
    keys = sorted({k for p in phases for k in p})
    return {k: round(median([p[k] for p in phases if k in p]), 3) for k in keys}


def set_threads(threads: int | None, interop: int | None) -> None:
    import torch

    if threads:
        torch.set_num_threads(threads)
    if interop:
        try:
            torch.set_num_interop_threads(interop)
        except RuntimeError as exc:  # only possible before any parallel work started
            log(f"[bench] could not set interop threads: {exc}")


def timed_loop(step: Callable[[int], dict[str, Any]], warmup: int, steps: int) -> list[dict[str, Any]]:
    """Run ``warmup`` untimed then ``steps`` timed calls; each returns a dict with at least 'time'."""
    out = []
    for i in range(warmup + steps):
        c = Contention()
        rec = step(i)
        rec["others"] = c.others_cores()
        log(f"[bench] step {i}{' (warm-up)' if i < warmup else ''}: {rec['time']:.2f} s, "
            f"other processes {rec['others']} cores")
        if i >= warmup:
            out.append(rec)
    return out


def now() -> float:
    return time.perf_counter()
