"""fdpg against Hugging Face TRL's RLOOTrainer and GRPOTrainer on workload W (TRL: the ``bench`` extra).

Every framework runs in its own subprocess (so each peak RSS is its own), and the parent alternates them:
``--rounds`` rounds of (fdpg, RLOO, GRPO), each subprocess doing ``--warmup`` untimed and ``--steps`` timed
optimisation steps; the order rotates every round. Prints one JSON line: per framework the median s/step
over all its timed steps, completions/s, completion tokens/s, peak RSS (the largest over its subprocesses),
and the ratios fdpg/TRL of completions/s.

TRL settings (TRL 1.16, transformers 5.23): the same model object type (float32, loaded by
``fdpg.models.load_causal_lm``), ``peft_config`` = the same LoRA (r 8, alpha 16, q_proj/v_proj, dropout 0), a
``datasets.Dataset`` of the 16 raw prompts, reward = VADER compound as a Python function, beta 0.1,
lr 1e-4 constant, AdamW without weight decay, max_grad_norm 1, 16 completions per optimisation step as
4 prompts x 4 generations (``per_device_train_batch_size=16, num_generations=4,
gradient_accumulation_steps=1`` so ``generation_batch_size=16``, one update per batch, ``num_iterations=1``),
``max_completion_length=48``, pure sampling (``temperature=1, top_k=0, top_p=1``, the model's EOS), fp32
(``bf16=False``; ``--mixed_precision bf16``: TRL ``bf16=True`` against fdpg ``mixed_precision="bf16"``, both
bf16 autocast over fp32 weights), ``use_cpu=True``. Each TRL trainer runs twice: as shipped (``rloo``, ``grpo``: TRL's
default ``gradient_checkpointing=True``, less memory, one more forward pass) and without checkpointing
(``rloo-nogc``, ``grpo-nogc``: the same arithmetic as fdpg, which does not checkpoint). Step time =
``on_step_begin`` to ``on_step_end`` of a TrainerCallback (generation, scoring,
reference, forward/backward and optimizer step; the same span as fdpg's ``train_step``).

    python bench/peers.py [--rounds 2] [--steps 5] [--warmup 1] [--frameworks fdpg,rloo,rloo-nogc,grpo,grpo-nogc]
                          [--mixed_precision bf16]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common  # noqa: E402
from common import BATCH, BETA, LORA_ALPHA, LORA_R, LORA_TARGETS, LR, MAX_NEW_TOKENS, MODEL, PROMPTS  # noqa: E402

GENERATIONS = 4


def vader_reward(completions, **kwargs) -> list[float]:
    from tasks.sentiment import vader_compound

    return [float(x) for x in vader_compound(list(completions))]


def run_trl(kind: str, steps: int, warmup: int, gradient_checkpointing: bool, full: bool, bf16: bool,
            use_vllm: bool = False) -> dict:
    import time

    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import TrainerCallback

    from fdpg.models import load_causal_lm, load_tokenizer

    if kind == "rloo":
        from trl import RLOOConfig as Config
        from trl import RLOOTrainer as Trainer
    else:
        from trl import GRPOConfig as Config
        from trl import GRPOTrainer as Trainer

    class Timer(TrainerCallback):
        def __init__(self):
            self.times, self.lengths, self.others, self.t0, self.c = [], [], [], None, None

        def on_step_begin(self, args, state, control, **kw):
            self.c = common.Contention()
            self.t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            self.times.append(time.perf_counter() - self.t0)
            self.others.append(self.c.others_cores())
            common.log(f"[peers] {kind} step {len(self.times) - 1}: {self.times[-1]:.2f} s, "
                       f"other processes {self.others[-1]} cores")

        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "completions/mean_length" in logs:
                self.lengths.append(float(logs["completions/mean_length"]))

    torch.manual_seed(0)
    tokenizer = load_tokenizer(MODEL)
    model = load_causal_lm(MODEL, dtype=torch.float32)
    peft_config = None if full else LoraConfig(r=LORA_R, lora_alpha=LORA_ALPHA, lora_dropout=0.0,
                                               target_modules=LORA_TARGETS.split(","), task_type="CAUSAL_LM",
                                               bias="none")
    kw = dict(
        output_dir=os.path.join(tempfile.mkdtemp(prefix="trl-bench-")), per_device_train_batch_size=BATCH,
        num_generations=GENERATIONS, gradient_accumulation_steps=1, max_completion_length=MAX_NEW_TOKENS,
        beta=BETA, learning_rate=LR, lr_scheduler_type="constant", weight_decay=0.0, max_grad_norm=1.0,
        temperature=1.0, top_k=0, top_p=1.0, num_iterations=1, bf16=bf16, fp16=False, use_cpu=True,
        gradient_checkpointing=gradient_checkpointing, max_steps=warmup + steps, logging_steps=1,
        save_strategy="no", report_to=[], disable_tqdm=True, seed=0, dataloader_num_workers=0,
    )
    if use_vllm:  # TRL's own vLLM option, colocated in the training process (its mode without a server)
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        kw.update(use_vllm=True, vllm_mode="colocate", vllm_gpu_memory_utilization=0.3)
    args = Config(**kw)
    timer = Timer()
    trainer = Trainer(model=model, reward_funcs=vader_reward, args=args,
                      train_dataset=Dataset.from_dict({"prompt": PROMPTS}), processing_class=tokenizer,
                      callbacks=[timer], peft_config=peft_config)
    trainer.train()
    times = timer.times[warmup:]
    lengths = timer.lengths[warmup:] if len(timer.lengths) >= len(timer.times) else timer.lengths
    return {"times": times, "tokens": [round(x * BATCH) for x in lengths], "others": timer.others[warmup:]}


def run_fdpg(steps: int, warmup: int, full: bool, mixed_precision: str, generation: str = "torch") -> dict:
    from step import FdpgStepper

    stepper = FdpgStepper(full, mixed_precision, generation=generation)
    recs = common.timed_loop(stepper, warmup, steps)
    return {"times": [r["time"] for r in recs], "tokens": [r["tokens"] for r in recs],
            "others": [r["others"] for r in recs], "phases": [{k: v for k, v in r.items()
                                                               if k not in common.NOT_PHASES} for r in recs],
            "proposal": [r["proposal"] for r in recs if "proposal" in r]}


def worker(args) -> None:
    kind, _, variant = args.worker.partition("-")
    if kind == "fdpg":
        res = run_fdpg(args.steps, args.warmup, args.full, args.mixed_precision, variant or "torch")
    else:
        res = run_trl(kind, args.steps, args.warmup, variant != "nogc", args.full, args.mixed_precision == "bf16",
                      use_vllm=variant == "vllm")
    res["peak_rss_mb"] = round(common.peak_rss_mb(), 1)
    common.emit(res)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--frameworks", default="fdpg,rloo,rloo-nogc,grpo,grpo-nogc",
                    help="also fdpg-vllm (fdpg --generation vllm) and rloo-vllm (TRL's use_vllm, colocated)")
    ap.add_argument("--vllm_python", default=sys.executable,
                    help="the interpreter of the *-vllm workers (vLLM's environment: .venv-vllm/bin/python)")
    ap.add_argument("--full", action="store_true", help="W-full (TRL then keeps a separate reference model)")
    ap.add_argument("--mixed_precision", default="no", choices=["no", "bf16"])
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--no_wait", action="store_true", help="start even if other processes keep the CPU busy")
    args = ap.parse_args()
    if args.worker:
        worker(args)
        return
    names = [n.strip() for n in args.frameworks.split(",") if n.strip()]
    if any(not n.startswith("fdpg") for n in names) and importlib.util.find_spec("trl") is None:
        raise SystemExit("TRL is not installed: `.venv/bin/pip install -e '.[bench]'` (or --frameworks fdpg)")
    if not args.no_wait and not getattr(args, "worker", None):
        common.wait_quiet()
    load0 = common.loadavg()
    contention = common.Contention()
    results: dict[str, dict] = {n: {"times": [], "tokens": [], "others": [], "peak_rss_mb": 0.0} for n in names}
    for r in range(args.rounds):
        order = names[r % len(names):] + names[:r % len(names)]
        for name in order:
            python = args.vllm_python if name.endswith("-vllm") else sys.executable
            cmd = [python, os.path.abspath(__file__), "--worker", name, "--steps", str(args.steps),
                   "--warmup", str(args.warmup), "--mixed_precision", args.mixed_precision]
            cmd += ["--full"] if args.full else []
            common.log(f"[peers] round {r}: {name}")
            proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
            if proc.returncode != 0:
                if name == "rloo-vllm":  # recorded, not fatal: whether TRL's vLLM path runs here is a result too
                    results[name]["failed"] = f"exit code {proc.returncode} (its traceback is on stderr)"
                    continue
                raise SystemExit(f"{name} worker failed with exit code {proc.returncode}")
            res = json.loads(proc.stdout.strip().splitlines()[-1])
            results[name].setdefault("phases", []).extend(res.get("phases", []))
            results[name].setdefault("proposal", []).extend(res.get("proposal", []))
            results[name]["times"] += res["times"]
            results[name]["tokens"] += res["tokens"]
            results[name]["others"] += res["others"]
            results[name]["peak_rss_mb"] = max(results[name]["peak_rss_mb"], res["peak_rss_mb"])
    out: dict = {"bench": "peers", "workload": "W-full" if args.full else "W", "mixed_precision": args.mixed_precision}
    for name, res in results.items():
        if not res["times"]:
            out[name] = {"failed": res.get("failed", "no timed step")}
            continue
        quiet = [k for k, o in enumerate(res["others"]) if o < common.QUIET]
        calm = quiet or list(range(len(res["times"])))  # medians over the quiet steps (all when none was)
        out[name] = {"steps_quiet": f"{len(quiet)}/{len(res['times'])}",
                     **common.summarise([res["times"][k] for k in calm], [res["tokens"][k] for k in calm]),
                     "peak_rss_mb": res["peak_rss_mb"]}
        if res.get("phases"):
            out[name]["phases_s"] = common.phase_medians([res["phases"][k] for k in calm if k < len(res["phases"])])
        if res.get("proposal"):
            out[name]["proposal_gap"] = res["proposal"]
    ok = {n for n, r in out.items() if isinstance(r, dict) and "completions_per_s" in r}
    for ours in ("fdpg", "fdpg-vllm"):
        for peer in ("rloo", "rloo-nogc", "rloo-vllm", "grpo", "grpo-nogc"):
            if ours in ok and peer in ok:
                out[f"completions_per_s_{ours}_over_{peer}"] = round(
                    out[ours]["completions_per_s"] / out[peer]["completions_per_s"], 3)
                out[f"peak_rss_{ours}_over_{peer}"] = round(out[ours]["peak_rss_mb"] / out[peer]["peak_rss_mb"], 3)
    if {"fdpg", "fdpg-vllm"} <= ok:
        torch_gen = out["fdpg"]["phases_s"].get("generate", float("nan"))
        vllm_gen = out["fdpg-vllm"]["phases_s"].get("generate", 0.0) + out["fdpg-vllm"]["phases_s"].get(
            "weight_sync", 0.0)
        out["generation_with_sync_vllm_over_torch"] = round(vllm_gen / torch_gen, 3)
    try:
        import trl

        out["trl"] = trl.__version__
    except ImportError:
        pass
    out.update(common.footer(contention, load0))
    common.emit(out)


if __name__ == "__main__":
    main()
