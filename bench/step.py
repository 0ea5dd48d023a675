"""fdpg's f-DPG step (``--algo ppo``: its PPO step) on workload W (``--full``: W-full), through the public API.

Builds ``FDPGTrainer`` (``PPOTrainer``: one epoch of one minibatch, the value head on the policy) from a
``TrainConfig`` (batch 16, 1 sample per prompt, generation batch 16, micro batch 8,
48 new tokens, LoRA r=8 alpha=16 on q_proj,v_proj, lr 1e-4, beta 0.1, reverse KL, VADER reward) and times
``train_step`` after warm-up. Prints one JSON line: median s/step, completions/s, completion tokens/s, peak RSS
and the median of each phase (the trainer's own ``time/*`` metrics).

    python bench/step.py [--algo fdpg|ppo] [--full] [--steps 10] [--warmup 2] [--mixed_precision bf16]
                          [--generation vllm]  # the vLLM one with .venv-vllm/bin/python
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common  # noqa: E402
from common import BATCH, BETA, LORA_ALPHA, LORA_R, LORA_TARGETS, LR, MAX_NEW_TOKENS, MODEL, PROMPTS  # noqa: E402

PHASES = ("time/weight_sync", "time/generate", "time/policy_pass",
          "time/score", "time/reference", "time/exact_kl", "time/values", "time/bookkeeping",
          "time/backward", "time/optimizer")


def build_trainer(full: bool = False, mixed_precision: str = "no", seed: int = 0, algo: str = "fdpg",
                  exact_kl_every: int = 0, generation: str = "torch", vllm_enforce_eager: bool = False):
    """The f-DPG (or PPO) trainer on W (or W-full) as a user would build it (``generation="vllm"``: every
    rollout sampled by a colocated vLLM engine, its weights synced before each sampling phase)."""
    import torch

    from fdpg.algorithms.f_dpg import FDPGTrainer
    from fdpg.algorithms.ppo import PPOTrainer
    from fdpg.config import TrainConfig
    from fdpg.policy import LoraSettings, Policy
    from tasks import get_task

    config = TrainConfig(
        model=MODEL, task="sentiment", divergence="rkl", beta=BETA, steps=10_000, batch_size=BATCH,
        samples_per_prompt=1, generation_batch_size=BATCH, max_new_tokens=MAX_NEW_TOKENS,  # micro batch 8: the default
        lora_r=0 if full else LORA_R, lora_alpha=LORA_ALPHA, lora_target_modules=LORA_TARGETS, learning_rate=LR,
        baseline="loo",  # one sample per prompt: the whole-batch leave-one-out baseline
        mixed_precision=mixed_precision, seed=seed, progress=False, log_samples_every=0, save_every=10**9,
        output_dir=os.path.join(tempfile.gettempdir(), "fdpg-bench-unused"),
        algo=algo, ppo_epochs=1, ppo_minibatches=1, exact_kl_every=exact_kl_every, eval_samples=0,
        generation=generation, vllm_enforce_eager=vllm_enforce_eager,
    )
    spec = get_task("sentiment").build(config.beta, {}, PROMPTS)
    torch.manual_seed(seed)
    lora = None if full else LoraSettings(config.lora_r, config.lora_alpha, config.lora_dropout,
                                          config.lora_target_modules)
    policy = Policy.from_pretrained(config.model, lora=lora)
    algorithm = PPOTrainer if algo == "ppo" else FDPGTrainer
    return algorithm(config, policy, spec.target, spec.scorer, spec.prompts, spec.metrics)


class FdpgStepper:
    """Callable ``step(i) -> {'time', 'tokens', phases...}`` around the trainer's ``train_step``."""

    def __init__(self, full: bool = False, mixed_precision: str = "no", algo: str = "fdpg", exact_kl_every: int = 0,
                 generation: str = "torch", vllm_enforce_eager: bool = False):
        t = common.now()
        self.trainer = build_trainer(full, mixed_precision, algo=algo, exact_kl_every=exact_kl_every,
                                     generation=generation, vllm_enforce_eager=vllm_enforce_eager)
        self.build_s = common.now() - t  # model load (and, with vLLM, the engine's start on the first step)
        self.i = 0

    def __call__(self, _: int) -> dict:
        t = common.now()
        m = self.trainer.train_step(self.i)
        elapsed = common.now() - t
        self.i += 1
        rec = {"time": elapsed, "tokens": int(round(m["tokens_per_s"] * m["time/step"])),
               "reward": m.get("score/reward")}
        rec.update({k.removeprefix("time/"): m[k] for k in PHASES if k in m})
        for k in ("proposal/log_q_minus_log_pi_mean", "proposal/log_q_minus_log_pi_max_abs"):
            if k in m:
                rec.setdefault("proposal", {})[k.removeprefix("proposal/")] = round(float(m[k]), 4)
        return rec


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--algo", default="fdpg", choices=["fdpg", "ppo"])
    ap.add_argument("--exact_kl_every", type=int, default=0,
                    help="log kl_pi_a_exact every N steps (1: every step, to time it; 0: never, the default here)")
    ap.add_argument("--full", action="store_true", help="W-full: full fine-tuning (frozen reference copy)")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--mixed_precision", default="no", choices=["no", "bf16"])
    ap.add_argument("--generation", default="torch", choices=["torch", "vllm"],
                    help="vllm: sample on a colocated vLLM engine (run with the .venv-vllm python)")
    ap.add_argument("--vllm_enforce_eager", action="store_true")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--interop_threads", type=int, default=None)
    ap.add_argument("--no_wait", action="store_true", help="start even if other processes keep the CPU busy")
    args = ap.parse_args()
    common.set_threads(args.threads, args.interop_threads)
    if not args.no_wait and not getattr(args, "worker", None):
        common.wait_quiet()
    load0 = common.loadavg()
    contention = common.Contention()
    stepper = FdpgStepper(args.full, args.mixed_precision, args.algo, args.exact_kl_every, args.generation,
                          args.vllm_enforce_eager)
    recs = common.timed_loop(stepper, args.warmup, args.steps)
    calm = common.quiet(recs) or recs
    common.emit({
        "bench": "step", "framework": "fdpg", "algo": args.algo, "exact_kl_every": args.exact_kl_every,
        "workload": "W-full" if args.full else "W",
        "mixed_precision": args.mixed_precision, "generation": args.generation,
        "steps_quiet": f"{len(common.quiet(recs))}/{len(recs)}",  # medians over the quiet steps (all if none)
        **common.summarise([r["time"] for r in calm], [r["tokens"] for r in calm]),
        "peak_rss_mb": round(common.peak_rss_mb(), 1), "phases_s": common.phase_medians(calm),
        "proposal_gap": [r["proposal"] for r in calm if "proposal" in r],
        **common.footer(contention, load0),
    })


if __name__ == "__main__":
    main()
