"""fdpg's DPO against Hugging Face TRL's DPOTrainer on workload W-DPO (TRL: the ``bench`` extra).

Workload W-DPO: SmolLM2-135M-Instruct (embedded), LoRA r 8 alpha 16 on q_proj/v_proj (dropout 0), fp32, DPO with
the sigmoid loss and beta 0.1, ``--pairs`` (64) preference pairs of 48-token responses, 16 pairs per optimisation
step (one update each), AdamW lr 1e-4 constant without weight decay, max_grad_norm 1, seed 0.

The pairs (the same rows for both frameworks, built in every worker by :func:`build_rows` and checked by their
SHA-256, ``pairs_sha256``): prompts = ``common.PROMPTS`` cycled (pair i has prompt i mod 16); responses = consecutive
48-token windows of the tokenizer applied to a fixed list of Python standard-library module docstrings
(``TEXT_MODULES``, whitespace collapsed; they change only with the Python version), each window starting at a
word (a token with a leading space), decoded back to text and kept only if re-tokenising it gives exactly the same
48 ids, alone and after its prompt (so fdpg, which tokenises prompt and response apart, and TRL, which tokenises
prompt + response together, see the same tokens); windows 2i and 2i+1 are the chosen and the rejected of pair i.
Both frameworks append EOS, so every response is 49 tokens; each worker reports the response lengths it actually
trains on (``response_tokens``: min and max) and the prompt lengths, and fails if any response is not 49 tokens.

fdpg settings: ``TrainConfig(algo="dpo", preferences="bench", divergence="rkl", preference_loss="sigmoid",
beta=0.1, lora_r=8, lora_alpha=16, lora_target_modules="q_proj,v_proj", learning_rate=1e-4,
lr_scheduler="constant", weight_decay=0, max_grad_norm=1, batch_size=16, micro_batch_size=(the variant's: 8
sequences = 4 pairs per forward/backward as shipped), activation_checkpointing=(the variant's), eval_every=0,
eval_samples=0,
exact_kl_every=0, heldout_fraction=0, mixed_precision="no", progress=False, log_samples_every=0, seed=0)``
(``train()`` is never called, so no run directory is written), the policy from
``Policy.from_pretrained(MODEL, lora=LoraSettings(...))``, pairs from ``fdpg.preferences.tokenize_pairs``
(no length limit) and
``fdpg.algorithms.dpo.DPOTrainer``. The reference log-probabilities of every pair are computed once
(``trainer.reference_pass()``, in the variant's micro-batches, as ``prepare_run`` does), timed as
``reference_once_s`` and not part of the step time; step time = ``trainer.train_step(step)`` (batch assembly,
the micro-batched forward/backward, clipping, the optimizer and scheduler steps, the step's metrics).

TRL settings (TRL 1.16, transformers 5.x): the same model object type (float32, loaded by
``fdpg.models.load_causal_lm``; tokenizer by ``load_tokenizer``), ``ref_model=None`` with ``peft_config`` =
the same LoRA (TRL then disables the adapter for the reference), ``train_dataset`` = the same rows as a
``datasets.Dataset`` (text prompt/chosen/rejected columns), ``DPOConfig(loss_type=["sigmoid"], beta=0.1,
learning_rate=1e-4, lr_scheduler_type="constant", weight_decay=0, max_grad_norm=1,
per_device_train_batch_size=--micro_batch, gradient_accumulation_steps=16/--micro_batch (8 x 2: 16 pairs per
step with the same forward/backward size as fdpg; also TRL's default per-device batch of 8), max_length=None
(no truncation: TRL's default 1024 would not cut these ~58-token sequences either), bf16=False (TRL defaults
bf16 on, even on CPU), fp16=False, use_cpu=True, max_steps=warmup+steps (several epochs when needed),
logging_steps=1, save_strategy="no", report_to=[], disable_tqdm=True, seed=0, dataloader_num_workers=0)``, the
rest as shipped (``padding_free=False``, ``pad_to_multiple_of=None`` on CPU, right padding of prompt + response,
``optim="adamw_torch_fused"``, the fused LM head that also computes the entropy / mean-logit / top-1 metrics).
In transformers >= 5.24 ``gradient_checkpointing`` is a deprecated alias of ``activation_checkpointing``; each TRL
worker reads the model's own flag during the steps (``settings.model_checkpointing``). Variants (``--frameworks``):

- ``trl``: as shipped: ``gradient_checkpointing=True`` (TRL's default: less memory, one more forward pass per
  micro-batch in backward) and ``precompute_ref_log_probs=False`` (TRL's default: a no-grad reference forward
  over every micro-batch in every step);
- ``trl-nogc``: ``gradient_checkpointing=False``, the reference still per step;
- ``trl-precompute``: ``precompute_ref_log_probs=True`` (reference log-probs of the whole dataset once, in
  batches of ``per_device_train_batch_size``, timed as ``reference_once_s``), checkpointing as shipped;
- ``trl-precompute-nogc``: both: the same arithmetic per step as fdpg (no reference pass, no recomputation).

fdpg variants (``FDPG_VARIANTS``): ``fdpg`` as shipped (``micro_batch_size`` 8 sequences = 4 pairs per
forward/backward, no activation checkpointing), ``fdpg-ac`` (the same with ``activation_checkpointing=1``: every
decoder layer recomputed in backward, as TRL's default), ``fdpg-mb16`` (16 sequences = 8 pairs per pass, TRL's
per-device batch), ``fdpg-mb16-ac`` and ``fdpg-mb16-ac2`` (with every layer, every second layer checkpointed).
``--micro_batch`` sets TRL's ``per_device_train_batch_size`` only.

Step time = ``on_step_begin`` to ``on_step_end`` of a TrainerCallback: the gradient-accumulation micro-batches'
forward/backward (and, without precompute, their reference forwards), clipping, the optimizer and scheduler
steps. It excludes the collation of the step's batches (TRL's ``get_batch_samples`` runs before
``on_step_begin``; fdpg's ``train_step`` includes its batch assembly, a few ms) and TRL's logging after
``on_step_end``.

Every framework runs in its own subprocess (so each peak RSS is its own), and the parent alternates them:
``--rounds`` rounds, each subprocess doing ``--warmup`` untimed and ``--steps`` timed optimisation steps; the order
rotates every round. Prints one JSON line: per framework the median s/step over its quiet timed steps (all if none
was quiet; ``steps_quiet``), pairs/s, response tokens/s, peak RSS (the largest over its subprocesses),
``reference_once_s`` (median over its subprocesses; null where the reference runs every step), the first step's
loss (``first_loss``: ln 2 = 0.6931 on both sides, since LoRA starts at the reference) and the settings read back;
the ratios fdpg/TRL of pairs/s and of peak RSS; and ``common.footer``.

    python bench/dpo_peers.py [--rounds 2] [--steps 5] [--warmup 1] [--pairs 64] [--micro_batch 8]
                              [--frameworks fdpg,fdpg-ac,fdpg-mb16,fdpg-mb16-ac,fdpg-mb16-ac2,trl,trl-nogc,
                              trl-precompute,trl-precompute-nogc] [--no_wait]
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common  # noqa: E402
from common import BETA, LORA_ALPHA, LORA_R, LORA_TARGETS, LR, MODEL, PROMPTS  # noqa: E402

#: Pairs per optimisation step.
BATCH_PAIRS = 16
#: Tokens of every response (before the EOS both frameworks append).
RESPONSE_TOKENS = 48
#: Standard-library modules whose docstrings (in this order, whitespace collapsed) are cut into the responses.
TEXT_MODULES = ("statistics", "json", "argparse", "re", "sys", "csv", "unittest", "itertools", "subprocess", "heapq",
                "copy", "io", "urllib.parse", "os", "inspect", "typing", "sqlite3", "tempfile", "difflib", "random",
                "collections", "string", "pprint", "pickle", "struct", "socket")
FRAMEWORKS = ("fdpg", "fdpg-ac", "fdpg-mb16", "fdpg-mb16-ac", "fdpg-mb16-ac2", "trl", "trl-nogc", "trl-precompute",
              "trl-precompute-nogc")


# ---------------------------------------------------------------------------------------------------- the pairs
def build_rows(tokenizer, n_pairs: int) -> dict[str, list[str]]:
    """``n_pairs`` rows {prompt, chosen, rejected}: see the module docstring."""
    import importlib

    ids: list[int] = []
    for module in TEXT_MODULES:  # module by module (each under the tokenizer's length limit)
        text = " " + " ".join((importlib.import_module(module).__doc__ or "").split())
        ids += tokenizer(text, add_special_tokens=False)["input_ids"]
    need = 2 * n_pairs
    windows: list[str] = []
    pos = 0
    while len(windows) < need and pos + RESPONSE_TOKENS <= len(ids):
        window = ids[pos:pos + RESPONSE_TOKENS]
        piece = tokenizer.decode(window)
        prompt = PROMPTS[(len(windows) // 2) % len(PROMPTS)]
        prompt_ids = tokenizer(prompt, add_special_tokens=True)["input_ids"]
        ok = (piece.startswith(" ") and not piece.startswith("  ")
              and tokenizer(piece, add_special_tokens=False)["input_ids"] == window
              and tokenizer(prompt + piece, add_special_tokens=True)["input_ids"] == prompt_ids + window
              and (len(windows) % 2 == 0 or piece != windows[-1]))
        if ok:
            windows.append(piece)
            pos += RESPONSE_TOKENS
        else:
            pos += 1
    if len(windows) < need:
        raise SystemExit(f"the docstrings of {len(TEXT_MODULES)} modules give only {len(windows) // 2} pairs of "
                         f"{RESPONSE_TOKENS}-token responses; ask for fewer --pairs")
    return {"prompt": [PROMPTS[i % len(PROMPTS)] for i in range(n_pairs)],
            "chosen": windows[0::2], "rejected": windows[1::2]}


def rows_sha(rows: dict[str, list[str]]) -> str:
    return hashlib.sha256(json.dumps(rows, sort_keys=True).encode()).hexdigest()[:16]


def check_lengths(name: str, lengths: list[int]) -> None:
    if any(n != RESPONSE_TOKENS + 1 for n in lengths):
        raise SystemExit(f"{name}: responses of {min(lengths)}-{max(lengths)} tokens, not {RESPONSE_TOKENS} + EOS: "
                         "the pairs are not what the benchmark says")


# ---------------------------------------------------------------------------------------------------- fdpg
#: fdpg's variants: name -> (micro_batch_size in sequences, activation_checkpointing).
FDPG_VARIANTS = {"fdpg": (8, 0), "fdpg-ac": (8, 1), "fdpg-mb16": (16, 0), "fdpg-mb16-ac": (16, 1),
                 "fdpg-mb16-ac2": (16, 2)}


def run_fdpg(steps: int, warmup: int, n_pairs: int, rows: int, activation_checkpointing: int = 0) -> dict:
    import datasets
    import torch

    from fdpg.algorithms.dpo import DPOTrainer
    from fdpg.config import TrainConfig
    from fdpg.policy import LoraSettings, Policy
    from fdpg.preferences import tokenize_pairs
    from objectives import rl_with_kl

    out_dir = tempfile.mkdtemp(prefix="fdpg-dpo-bench-")
    try:
        config = TrainConfig(
            algo="dpo", preferences="bench", model=MODEL, divergence="rkl", preference_loss="sigmoid", beta=BETA,
            lora_r=LORA_R, lora_alpha=LORA_ALPHA, lora_dropout=0.0, lora_target_modules=LORA_TARGETS,
            learning_rate=LR, lr_scheduler="constant", warmup_steps=0, weight_decay=0.0, max_grad_norm=1.0,
            mixed_precision="no", batch_size=BATCH_PAIRS, micro_batch_size=rows, steps=warmup + steps,
            eval_every=0, eval_samples=0, exact_kl_every=0, heldout_fraction=0.0, progress=False,
            log_samples_every=0, save_every=10**9, seed=0, output_dir=os.path.join(out_dir, "run"),
            activation_checkpointing=activation_checkpointing)
        torch.manual_seed(0)
        policy = Policy.from_pretrained(MODEL, lora=LoraSettings(LORA_R, LORA_ALPHA, 0.0, LORA_TARGETS))
        rows = build_rows(policy.tokenizer, n_pairs)
        pairs = tokenize_pairs(datasets.Dataset.from_dict(rows), policy.tokenizer, None)
        lengths = [len(x) for x in pairs.chosen_ids + pairs.rejected_ids]
        check_lengths("fdpg", lengths)

        def trivial_scorer(completions, prompts):  # never called: eval_every=0 samples nothing
            return {"reward": [0.0] * len(completions)}

        trainer = DPOTrainer(config, policy, rl_with_kl("reward", BETA), trivial_scorer, PROMPTS, pairs=pairs)
        t0 = time.perf_counter()
        trainer.reference_log_probs = trainer.reference_pass()
        reference_once = time.perf_counter() - t0
        common.log(f"[dpo_peers] fdpg reference pass over {n_pairs} pairs: {reference_once:.2f} s (once, not timed "
                   "in the steps)")
        times, others, first_loss = [], [], None
        for i in range(warmup + steps):
            c = common.Contention()
            t = time.perf_counter()
            m = trainer.train_step(i)
            elapsed = time.perf_counter() - t
            busy = c.others_cores()
            first_loss = m["loss"] if first_loss is None else first_loss
            common.log(f"[dpo_peers] fdpg step {i}{' (warm-up)' if i < warmup else ''}: {elapsed:.2f} s "
                       f"(backward {m.get('time/backward', float('nan')):.2f}, optimizer "
                       f"{m.get('time/optimizer', float('nan')):.3f}), loss {m['loss']:.4f}, other processes {busy} "
                       "cores")
            if i >= warmup:
                times.append(elapsed)
                others.append(busy)
        settings = {"micro_batch_size": config.micro_batch_size, "batch_size": config.batch_size,
                    "activation_checkpointing": config.activation_checkpointing, "reference": "once (precomputed)"}
        return {"times": times, "others": others, "reference_once_s": reference_once, "first_loss": first_loss,
                "response_tokens": [min(lengths), max(lengths)],
                "prompt_tokens": [min(map(len, pairs.prompt_ids)), max(map(len, pairs.prompt_ids))],
                "tokens_per_step": BATCH_PAIRS * 2 * (RESPONSE_TOKENS + 1), "pairs_sha256": rows_sha(rows),
                "settings": settings}
    finally:
        shutil.rmtree(out_dir, ignore_errors=True)


# ---------------------------------------------------------------------------------------------------- TRL
def run_trl(variant: str, steps: int, warmup: int, n_pairs: int, micro: int) -> dict:
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import TrainerCallback
    from trl import DPOConfig, DPOTrainer

    from fdpg.models import load_causal_lm, load_tokenizer

    precompute = "precompute" in variant
    gradient_checkpointing = not variant.endswith("nogc")

    class Timer(TrainerCallback):
        def __init__(self):
            self.times, self.others, self.losses, self.t0, self.c = [], [], [], None, None
            self.checkpointing = None

        def on_step_begin(self, args, state, control, **kw):
            self.c = common.Contention()
            self.t0 = time.perf_counter()

        def on_step_end(self, args, state, control, model=None, **kw):
            self.times.append(time.perf_counter() - self.t0)
            self.others.append(self.c.others_cores())
            base = model.get_base_model() if hasattr(model, "get_base_model") else model
            self.checkpointing = bool(base.is_activation_checkpointing if hasattr(base, "is_activation_checkpointing")
                                      else base.is_gradient_checkpointing)
            i = len(self.times) - 1
            common.log(f"[dpo_peers] {variant} step {i}{' (warm-up)' if i < warmup else ''}: {self.times[-1]:.2f} s, "
                       f"other processes {self.others[-1]} cores")

        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "loss" in logs:
                self.losses.append(float(logs["loss"]))

    class TimedDPOTrainer(DPOTrainer):
        reference_once = None

        def _precompute_ref_logps(self, dataset, name, batch_size):
            t = time.perf_counter()
            out = super()._precompute_ref_logps(dataset, name, batch_size)
            self.reference_once = (self.reference_once or 0.0) + time.perf_counter() - t
            return out

    out_dir = tempfile.mkdtemp(prefix="trl-dpo-bench-")
    try:
        torch.manual_seed(0)
        tokenizer = load_tokenizer(MODEL)
        model = load_causal_lm(MODEL, dtype=torch.float32)
        rows = build_rows(tokenizer, n_pairs)
        peft_config = LoraConfig(r=LORA_R, lora_alpha=LORA_ALPHA, lora_dropout=0.0,
                                 target_modules=LORA_TARGETS.split(","), task_type="CAUSAL_LM", bias="none")
        args = DPOConfig(
            output_dir=out_dir, loss_type=["sigmoid"], beta=BETA, learning_rate=LR, lr_scheduler_type="constant",
            warmup_steps=0, weight_decay=0.0, max_grad_norm=1.0, per_device_train_batch_size=micro,
            gradient_accumulation_steps=BATCH_PAIRS // micro, max_length=None, bf16=False, fp16=False,
            use_cpu=True, gradient_checkpointing=gradient_checkpointing, precompute_ref_log_probs=precompute,
            max_steps=warmup + steps, logging_steps=1, save_strategy="no", report_to=[], disable_tqdm=True, seed=0,
            dataloader_num_workers=0,
        )
        timer = Timer()
        trainer = TimedDPOTrainer(model=model, ref_model=None, args=args, train_dataset=Dataset.from_dict(rows),
                                  processing_class=tokenizer, callbacks=[timer], peft_config=peft_config)
        data = trainer.train_dataset
        lengths = [len(x) for x in data["chosen_ids"]] + [len(x) for x in data["rejected_ids"]]
        check_lengths(variant, lengths)
        prompt_lengths = [len(x) for x in data["prompt_ids"]]
        if len(data) != n_pairs:
            raise SystemExit(f"{variant}: TRL kept {len(data)} of the {n_pairs} pairs")
        if trainer.reference_once is not None:
            common.log(f"[dpo_peers] {variant} reference precompute over {n_pairs} pairs: "
                       f"{trainer.reference_once:.2f} s (once, not timed in the steps)")
        trainer.train()
        if len(timer.times) != warmup + steps:
            raise SystemExit(f"{variant}: {len(timer.times)} optimisation steps ran, not {warmup + steps}")
        a = trainer.args
        settings = {"model_checkpointing": timer.checkpointing,  # read off the model during the steps
                    "per_device_train_batch_size": a.per_device_train_batch_size,
                    "gradient_accumulation_steps": a.gradient_accumulation_steps,
                    "gradient_checkpointing": a.gradient_checkpointing,
                    "precompute_ref_log_probs": a.precompute_ref_log_probs,
                    "precompute_ref_batch_size": a.precompute_ref_batch_size or a.per_device_train_batch_size,
                    "bf16": a.bf16, "max_length": a.max_length, "padding_free": trainer.padding_free,
                    "pad_to_multiple_of": a.pad_to_multiple_of, "optim": str(a.optim),
                    "reference": "once (precomputed)" if precompute else "adapter disabled, every micro-batch"}
        return {"times": timer.times[warmup:], "others": timer.others[warmup:],
                "reference_once_s": trainer.reference_once,
                "first_loss": timer.losses[0] if timer.losses else None,
                "response_tokens": [min(lengths), max(lengths)],
                "prompt_tokens": [min(prompt_lengths), max(prompt_lengths)],
                "tokens_per_step": BATCH_PAIRS * 2 * (RESPONSE_TOKENS + 1), "pairs_sha256": rows_sha(rows),
                "settings": settings}
    finally:
        shutil.rmtree(out_dir, ignore_errors=True)


# ---------------------------------------------------------------------------------------------------- driver
def worker(args) -> None:
    import datasets

    datasets.disable_progress_bars()
    if args.worker.startswith("fdpg"):
        rows, checkpointing = FDPG_VARIANTS[args.worker]
        res = run_fdpg(args.steps, args.warmup, args.pairs, rows, activation_checkpointing=checkpointing)
    else:
        res = run_trl(args.worker, args.steps, args.warmup, args.pairs, args.micro_batch)
    res["peak_rss_mb"] = round(common.peak_rss_mb(), 1)
    common.emit(res)


def summarise(res: dict) -> dict:
    calm = [k for k, o in enumerate(res["others"]) if o < common.QUIET] or list(range(len(res["times"])))
    times = [res["times"][k] for k in calm]
    s = common.median(times)
    refs = [r for r in res["reference_once_s"] if r is not None]
    return {"steps_quiet": f"{len([o for o in res['others'] if o < common.QUIET])}/{len(res['times'])}",
            "s_per_step": round(s, 3), "s_per_step_min": round(min(times), 3), "s_per_step_max": round(max(times), 3),
            "pairs_per_s": round(BATCH_PAIRS / s, 3), "tokens_per_step": res["tokens_per_step"],
            "tokens_per_s": round(res["tokens_per_step"] / s, 1), "steps_timed": len(res["times"]),
            "peak_rss_mb": res["peak_rss_mb"],
            "reference_once_s": round(common.median(refs), 3) if refs else None,
            "first_loss": [None if x is None else round(x, 5) for x in res["first_loss"]],
            "response_tokens": res["response_tokens"], "prompt_tokens": res["prompt_tokens"],
            "settings": res["settings"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--pairs", type=int, default=64, help="preference pairs (a multiple of 16)")
    ap.add_argument("--micro_batch", type=int, default=8,
                    help="pairs per forward/backward of TRL (per_device_train_batch_size) "
                         "(with gradient_accumulation_steps = 16 / it); a divisor of 16")
    ap.add_argument("--frameworks", default=",".join(FRAMEWORKS))
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--no_wait", action="store_true", help="start even if other processes keep the CPU busy")
    args = ap.parse_args()
    if args.worker:
        worker(args)
        return
    if args.pairs < BATCH_PAIRS or args.pairs % BATCH_PAIRS:
        raise SystemExit(f"--pairs must be a positive multiple of {BATCH_PAIRS}, got {args.pairs}")
    if args.micro_batch < 1 or BATCH_PAIRS % args.micro_batch:
        raise SystemExit(f"--micro_batch must divide {BATCH_PAIRS}, got {args.micro_batch}")
    names = [n.strip() for n in args.frameworks.split(",") if n.strip()]
    unknown = [n for n in names if n not in FRAMEWORKS]
    if unknown or not names:
        raise SystemExit(f"--frameworks: unknown {unknown}; choose among {', '.join(FRAMEWORKS)}")
    if any(not n.startswith("fdpg") for n in names) and importlib.util.find_spec("trl") is None:
        raise SystemExit("TRL is not installed: `.venv/bin/pip install -e '.[bench]'` (or --frameworks fdpg)")
    if not args.no_wait:
        common.wait_quiet()
    load0 = common.loadavg()
    contention = common.Contention()
    keys = ("times", "others", "reference_once_s", "first_loss")
    results: dict[str, dict] = {n: {**{k: [] for k in keys}, "peak_rss_mb": 0.0} for n in names}
    shas = set()
    for r in range(args.rounds):
        order = names[r % len(names):] + names[:r % len(names)]
        for name in order:
            cmd = [sys.executable, os.path.abspath(__file__), "--worker", name, "--steps", str(args.steps),
                   "--warmup", str(args.warmup), "--pairs", str(args.pairs), "--micro_batch", str(args.micro_batch)]
            common.log(f"[dpo_peers] round {r}: {name}")
            proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
            if proc.returncode != 0:
                raise SystemExit(f"{name} worker failed with exit code {proc.returncode}")
            res = json.loads(proc.stdout.strip().splitlines()[-1])
            acc = results[name]
            acc["times"] += res["times"]
            acc["others"] += res["others"]
            acc["reference_once_s"].append(res["reference_once_s"])
            acc["first_loss"].append(res["first_loss"])
            acc["peak_rss_mb"] = max(acc["peak_rss_mb"], res["peak_rss_mb"])
            for k in ("response_tokens", "prompt_tokens", "tokens_per_step", "settings"):
                acc[k] = res[k]
            shas.add(res["pairs_sha256"])
    if len(shas) != 1:
        raise SystemExit(f"the workers trained on different pairs (sha256 {sorted(shas)})")
    out: dict = {"bench": "dpo_peers", "workload": "W-DPO", "pairs": args.pairs, "pairs_per_step": BATCH_PAIRS,
                 "response_tokens": RESPONSE_TOKENS, "micro_batch": args.micro_batch, "pairs_sha256": shas.pop(),
                 "rounds": args.rounds, "warmup": args.warmup, "steps": args.steps}
    for name, res in results.items():
        out[name] = summarise(res)
    for mine in (n for n in names if n.startswith("fdpg")):
        for peer in (n for n in names if not n.startswith("fdpg")):
            out[f"pairs_per_s_{mine}_over_{peer}"] = round(out[mine]["pairs_per_s"] / out[peer]["pairs_per_s"], 3)
            out[f"peak_rss_{mine}_over_{peer}"] = round(out[mine]["peak_rss_mb"] / out[peer]["peak_rss_mb"], 3)
    try:
        import transformers
        import trl

        out["trl_version"] = trl.__version__  # not "trl": that is a framework's key here
        out["transformers_version"] = transformers.__version__
    except ImportError:
        pass
    out.update(common.footer(contention, load0))
    common.emit(out)


if __name__ == "__main__":
    main()
