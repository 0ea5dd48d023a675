r"""The generic f-DPG trainer: minimise :math:`D_f(\pi_\theta\|p)` toward any energy-based target.

One step (Go et al. 2023, Algorithm 1, with the DPG/CDPG machinery of Khalifa et al. 2021 and
Korbak et al. 2022):

1. draw prompts :math:`c` and sample :math:`x \sim q(\cdot\mid c)` (:math:`q = \pi_\theta` on-policy);
2. score: the task's features, and :math:`\log a(x\mid c)` from the reference in one no-grad pass;
3. :math:`\log P = \log a + \sum_k\log\Phi_k`, update :math:`\log Z` (per prompt when conditional)
   with :math:`\log w = \log P - \log q` gathered over all processes;
4. pseudo-rewards :math:`R = -f'(\pi/p)` with :math:`\log t = \log\pi - \log P + \log Z`, a baseline
   over the global batch, importance weights :math:`\pi/q`;
5. :math:`\mathcal L = -\frac1n\sum_j w_j(R_j - b_j)\log\pi_\theta(x_j)`, backward (micro-batched),
   clip, optimizer and scheduler step, all through ``accelerate``;
6. metrics to ``metrics.jsonl``, samples to ``samples.jsonl``; checkpoints every ``save_every`` steps.
"""

from __future__ import annotations

import math
import os
import signal
import threading
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from contextlib import nullcontext
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import gather_object
from tqdm.auto import tqdm
from transformers import get_scheduler

from fdpg.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from fdpg.config import TrainConfig, incompatible_settings
from fdpg.log_probs import completion_token_log_probs
from fdpg.metrics import batch_metrics
from fdpg.onednn_linears import onednn_linears
from fdpg.policy import Policy
from fdpg.run_log import RunLog
from fdpg.sampling import SampleBatch, sample_completions
from fdpg.scores import checked_features
from objectives import (
    LogZEstimator,
    MovingAverageBaseline,
    Target,
    batch_baseline,
    get_divergence,
    surrogate_loss,
)
from objectives.partition import GLOBAL_KEY

#: ``scorer(completions, prompts) -> {feature name: one number per completion}``
Scorer = Callable[[list[str], list[str]], Mapping[str, Any]]
#: ``metrics(features) -> {name: value}``: the task's alignment metrics of a batch.
MetricsFn = Callable[[Mapping[str, torch.Tensor]], Mapping[str, float]]


def cpu_bf16_is_native() -> bool:
    """Whether this CPU computes bf16 matmuls natively (avx512_bf16 or AMX, as oneDNN sees it)."""
    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


class StopTraining(Exception):
    """Raised inside the loop when SIGTERM/SIGINT asked the run to stop after saving."""


def feature_means(features: Mapping[str, torch.Tensor]) -> dict[str, float]:
    """The default alignment metrics: the batch mean of every feature."""
    return {f"score/{k}": float(v.double().mean()) for k, v in features.items()}


def _seed_for(*parts: int) -> int:
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1)[0])


class FDPGTrainer:
    """Trains ``policy`` toward ``target`` by f-divergence minimisation; see the module docstring.

    Args:
        config: the run's settings.
        policy: model + tokenizer + reference access.
        target: the unnormalised target :math:`P` (from :mod:`objectives.targets`).
        scorer: computes the features the target needs from completions and prompts.
        prompts: the prompt pool (``None`` or empty: unconditional generation from BOS).
        metrics_fn: the task's alignment metrics (default: the mean of every feature).
        accelerator: an ``accelerate.Accelerator`` (default: one built from the config).
    """

    def __init__(
        self,
        config: TrainConfig,
        policy: Policy,
        target: Target,
        scorer: Scorer,
        prompts: Sequence[str] | None = None,
        metrics_fn: MetricsFn | None = None,
        accelerator: Accelerator | None = None,
    ) -> None:
        self.config = config
        self.divergence = get_divergence(config.divergence)
        self.target = target
        self.scorer = scorer
        self.prompts = list(prompts) if prompts else [""]
        self.conditional = target.conditional if config.conditional is None else config.conditional
        self.metrics_fn = metrics_fn or feature_means
        self.accelerator = accelerator or Accelerator(
            mixed_precision=config.mixed_precision,
            log_with=None if config.report_to == "none" else config.report_to.split(","),
        )
        if (self.accelerator.mixed_precision == "bf16" and self.accelerator.device.type == "cpu"
                and not cpu_bf16_is_native()):
            warnings.warn(
                f"--mixed_precision bf16 on a CPU without native bf16 ({torch.backends.cpu.get_cpu_capability()}, "
                "no avx512_bf16/AMX): bf16 matmuls take a scalar path, ~50x slower than fp32 on a 2-core AVX2 "
                "machine. Use --mixed_precision no here.", stacklevel=2)
        world = self.accelerator.num_processes
        launched = int(os.environ.get("WORLD_SIZE", "1"))
        # Otherwise each process would train alone, all of them writing the same run directory.
        if launched > 1 and launched != world:
            raise ValueError(
                f"launched as {launched} processes (WORLD_SIZE) but accelerate set up {world}; on a machine "
                "without GPUs set ACCELERATE_USE_CPU=1 for data parallelism over CPU processes (gloo)"
            )
        if config.batch_size % world:
            raise ValueError(f"--batch_size ({config.batch_size}) must be divisible by the number of processes "
                             f"({world})")
        self.local_batch = config.batch_size // world
        self.chunk = math.gcd(config.generation_batch_size, self.local_batch)
        self.policy = policy
        self._check_prompt_lengths()

        torch.manual_seed(config.seed)
        trainable = list(policy.trainable_parameters().values())
        if not trainable:
            raise ValueError("the policy has no trainable parameters")
        optimizer = torch.optim.AdamW(trainable, lr=config.learning_rate, weight_decay=config.weight_decay)
        self.scheduler = get_scheduler(config.lr_scheduler, optimizer, num_warmup_steps=config.warmup_steps,
                                       num_training_steps=config.steps)
        self.model, self.optimizer = self.accelerator.prepare(policy.model, optimizer)
        self.log_z = LogZEstimator(config.log_z, config.log_z_window)
        self.moving_baseline = MovingAverageBaseline(config.baseline_decay)
        self.proposal: dict[str, torch.Tensor] | None = None
        if config.off_policy:
            self.proposal = {k: v.detach().clone() for k, v in self._trainable().items()}
        self.step = 0
        #: Extra entries for config.json (e.g. the fitted lambdas of the target), set by the caller.
        self.run_extras: dict[str, Any] = {}
        self.run: RunLog | None = None
        self._stop_signal: int | None = None

    # ------------------------------------------------------------------ helpers
    @property
    def is_main(self) -> bool:
        return self.accelerator.is_main_process

    def _unwrapped(self) -> torch.nn.Module:
        return self.accelerator.unwrap_model(self.model)

    def _trainable(self) -> dict[str, torch.nn.Parameter]:
        return self.policy.trainable_parameters(self._unwrapped())

    def _check_prompt_lengths(self) -> None:
        limit = self.policy.max_positions
        if limit is None:
            return
        tok = self.policy.tokenizer
        longest = max((len(tok(p)["input_ids"]) for p in self.prompts if p), default=1)
        if longest + self.config.max_new_tokens > limit:
            raise ValueError(
                f"the longest prompt has {longest} tokens; with --max_new_tokens {self.config.max_new_tokens} "
                f"that exceeds the model's context of {limit} tokens. Shorten the prompts or --max_new_tokens."
            )

    def _swap_params(self, params: dict[str, torch.Tensor]) -> None:
        """Exchange the policy's trainable weights with ``params`` in place (twice = identity)."""
        with torch.no_grad():
            for name, p in self._trainable().items():
                saved = p.detach().clone()
                p.copy_(params[name].to(p.device))
                params[name] = saved

    def step_prompts(self, step: int) -> list[str]:
        """The global batch's prompts at ``step``: each drawn prompt repeated ``samples_per_prompt`` times."""
        n = self.config.batch_size // self.config.samples_per_prompt
        rng = np.random.default_rng(_seed_for(self.config.seed, step, 1))
        idx = rng.choice(len(self.prompts), size=n, replace=len(self.prompts) < n)
        return [self.prompts[i] for i in idx for _ in range(self.config.samples_per_prompt)]

    # ------------------------------------------------------------------ one step
    def sample(self, step: int) -> SampleBatch:
        """This process's share of the step's samples, drawn chunk by chunk with per-chunk seeds."""
        cfg = self.config
        prompts = self.step_prompts(step)
        start = self.accelerator.process_index * self.local_batch
        model = self._unwrapped()
        chunks = []
        if self.proposal is not None:
            self._swap_params(self.proposal)
        try:
            # Under --mixed_precision the samples come from the same (autocast) pi as the training pass.
            # The oneDNN packing (CPU fp32) is done once for all chunks; no_grad lets it apply.
            with torch.no_grad(), self.accelerator.autocast(), onednn_linears(model, prepack_rows=self.chunk):
                for lo in range(start, start + self.local_batch, self.chunk):
                    chunks.append(sample_completions(
                        model, self.policy.tokenizer, prompts[lo:lo + self.chunk], cfg.max_new_tokens,
                        seed=_seed_for(cfg.seed, step, 2, lo), temperature=cfg.temperature, top_p=cfg.top_p))
        finally:
            if self.proposal is not None:
                self._swap_params(self.proposal)
        return SampleBatch.concat(chunks, self.policy.tokenizer.pad_token_id)

    @torch.inference_mode()
    def _sequence_log_probs(self, batch: SampleBatch, reference: bool) -> torch.Tensor:
        out = []
        ctx = self.policy.reference(self._unwrapped()) if reference else nullcontext(self._unwrapped())
        with ctx as model, self.accelerator.autocast(), onednn_linears(model, prepack_rows=None):
            for lo in range(0, len(batch), self.config.micro_batch_size):
                part = batch.slice(lo, lo + self.config.micro_batch_size)
                out.append(completion_token_log_probs(model, part).sum(-1))
        return torch.cat(out).double()

    def _score(self, batch: SampleBatch) -> dict[str, torch.Tensor]:
        return checked_features(self.target, self.scorer(list(batch.texts), list(batch.prompts)), len(batch))

    def _gather(self, t: torch.Tensor) -> torch.Tensor:
        if self.accelerator.num_processes == 1:
            return t
        return self.accelerator.gather(t.to(self.accelerator.device).contiguous()).cpu()

    def _gather_list(self, items: list) -> list:
        return items if self.accelerator.num_processes == 1 else gather_object(items)

    def _baseline(self, rewards: torch.Tensor, keys: list[str]) -> torch.Tensor:
        if self.config.baseline == "moving_average":
            return self.moving_baseline(rewards)
        return batch_baseline(rewards, self.config.baseline, keys)

    def train_step(self, step: int) -> dict[str, Any]:
        """Run optimisation step ``step`` (0-based) and return its metrics."""
        cfg, acc = self.config, self.accelerator
        timings: dict[str, float] = {}
        t0 = time.perf_counter()

        batch = self.sample(step)
        timings["time/generate"] = time.perf_counter() - t0

        t = time.perf_counter()
        features = self._score(batch)
        timings["time/score"] = time.perf_counter() - t

        t = time.perf_counter()
        log_a = self._sequence_log_probs(batch, reference=True)
        timings["time/reference"] = time.perf_counter() - t

        t = time.perf_counter()
        log_q = batch.log_q.double()
        if self.proposal is not None:
            log_pi_now = self._sequence_log_probs(batch, reference=False)
        else:
            log_pi_now = batch.log_pi.double()
        log_P = self.target.log_P(log_a, features)
        keys = [p if self.conditional else GLOBAL_KEY for p in batch.prompts]

        # Everything below is over the global batch, identical on every process.
        g_keys = self._gather_list(keys)
        g_log_P, g_log_q, g_log_pi, g_log_a = (self._gather(x) for x in (log_P, log_q, log_pi_now, log_a))
        g_features = {k: self._gather(v) for k, v in features.items()}
        self.log_z.update(g_log_P - g_log_q, g_keys)
        # P(x) = 0 means p(x) = 0 whatever Z is (and Z is 0 while no sample of a key has had P > 0).
        g_log_p = torch.where(g_log_P == -math.inf, g_log_P, g_log_P - self.log_z.log_z_many(g_keys))
        g_rewards = self.divergence.pseudo_reward(g_log_pi, g_log_p, max_log_ratio=cfg.max_log_ratio)
        g_baseline = self._baseline(g_rewards, g_keys)
        g_weights = torch.exp(g_log_pi - g_log_q)
        if cfg.importance_weight_clip is not None:
            g_weights = g_weights.clamp(max=cfg.importance_weight_clip)
        refresh = False
        if self.proposal is not None:
            d_pi = float(self.divergence.estimate(g_log_pi, g_log_p, g_log_q))
            d_q = float(self.divergence.estimate(g_log_q, g_log_p))
            refresh = d_pi < d_q
            if refresh:
                self.proposal = {k: v.detach().clone() for k, v in self._trainable().items()}
        lo_idx = acc.process_index * self.local_batch
        local = slice(lo_idx, lo_idx + self.local_batch)
        rewards, baseline, weights = g_rewards[local], g_baseline[local], g_weights[local]
        # Metrics (the task's code, collectives) before the update: once the weights have moved, nothing
        # may fail, or the last checkpoint written after a failure would hold this step's weights.
        g_tokens = self._gather_list([row[:n].tolist() for row, n in zip(batch.completion_ids, batch.lengths)])
        g_texts = self._gather_list(list(batch.texts))
        metrics: dict[str, Any] = {"step": step + 1}
        metrics.update({k: float(v) for k, v in self.metrics_fn(g_features).items()})
        metrics.update(batch_metrics(self.divergence, g_log_pi, g_log_q, g_log_a, g_log_p, g_tokens, g_rewards,
                                     g_texts))
        metrics.update(self.log_z.summary())
        self._last_samples = (g_texts, self._gather_list(list(batch.prompts)), g_features, g_log_pi, g_log_a,
                              g_log_p, g_rewards)
        timings["time/bookkeeping"] = time.perf_counter() - t

        t = time.perf_counter()
        n_micro = math.ceil(len(batch) / cfg.micro_batch_size)
        for i in range(n_micro):
            lo, hi = i * cfg.micro_batch_size, (i + 1) * cfg.micro_batch_size
            part = batch.slice(lo, hi)
            sync = nullcontext() if i == n_micro - 1 else acc.no_sync(self.model)
            with sync, acc.autocast():
                log_pi = completion_token_log_probs(self.model, part).sum(-1)
                loss = surrogate_loss(log_pi, rewards[lo:hi].to(log_pi.device), baseline[lo:hi].to(log_pi.device),
                                      weights[lo:hi].to(log_pi.device) if cfg.proposal_differs else None,
                                      normaliser=self.local_batch)
                acc.backward(loss)
        timings["time/backward"] = time.perf_counter() - t

        t = time.perf_counter()
        grad_norm = None
        if cfg.max_grad_norm is not None:
            grad_norm = float(acc.clip_grad_norm_(list(self._trainable().values()), cfg.max_grad_norm))
        lr = self.scheduler.get_last_lr()[0]
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        timings["time/optimizer"] = time.perf_counter() - t
        total = time.perf_counter() - t0

        metrics.update({"lr": lr, "grad_norm": grad_norm, "proposal_refreshed": refresh,
                        "tokens_per_s": sum(len(r) for r in g_tokens) / total, "time/step": total, **timings})
        return metrics

    # ------------------------------------------------------------------ logging and checkpoints
    def _log_samples(self, step: int) -> None:
        texts, prompts, feats, log_pi, log_a, log_p, rewards = self._last_samples
        records = [
            {"step": step, "prompt": prompts[i], "completion": texts[i],
             "scores": {k: float(v[i]) for k, v in feats.items()}, "log_pi": float(log_pi[i]),
             "log_a": float(log_a[i]), "log_p": float(log_p[i]), "pseudo_reward": float(rewards[i])}
            for i in range(len(texts))
        ]
        self.run.samples.write_many(records)

    def _trainer_state(self) -> dict[str, Any]:
        return {"log_z": self.log_z.state_dict(), "moving_baseline": self.moving_baseline.state_dict()}

    def save(self, barrier: bool = True) -> None:
        """Checkpoint the state after ``self.step`` completed steps (the main process writes)."""
        if barrier:
            self.accelerator.wait_for_everyone()
        if self.is_main and self.run is not None:
            save_checkpoint(self.run.dir, self.step, dict(self._trainable()), self.optimizer.state_dict(),
                            self.scheduler.state_dict(), self._trainer_state(), proposal=self.proposal)
        if barrier:
            self.accelerator.wait_for_everyone()

    def _restore(self, run: RunLog) -> None:
        saved = run.saved_config()
        diff = incompatible_settings(saved, self.config)
        # config.json holds the resolved `conditional` (unset = the target decides): compare resolved values.
        if "conditional" in diff and saved.get("conditional") == self.conditional:
            del diff["conditional"]
        if diff:
            lines = ", ".join(f"{k}: checkpoint {a!r} vs now {b!r}" for k, (a, b) in sorted(diff.items()))
            raise ValueError(f"cannot resume {run.dir}: settings differ ({lines}). Resume with the same settings.")
        if saved.get("target") not in (None, self.target.describe()) and self.is_main:
            print(f"[fdpg] warning: the target was {saved['target']!r} in {run.dir} but is "
                  f"{self.target.describe()!r} now (a refitted lambda may differ slightly)", flush=True)
        path = latest_checkpoint(run.dir)
        if path is None:
            raise FileNotFoundError(f"--resume {run.dir}: no checkpoint in {run.dir / 'checkpoints'}")
        ckpt = load_checkpoint(path)
        params = self._trainable()
        missing = sorted(set(params) - set(ckpt.trainable))
        if missing:
            raise ValueError(f"checkpoint {path} lacks parameters {missing[:5]}...: was it made with another model?")
        with torch.no_grad():
            for name, p in params.items():
                p.copy_(ckpt.trainable[name].to(p.device))
        self.optimizer.load_state_dict(ckpt.optimizer)
        self.scheduler.load_state_dict(ckpt.scheduler)
        self.log_z.load_state_dict(ckpt.state["log_z"])
        self.moving_baseline.load_state_dict(ckpt.state["moving_baseline"])
        self.proposal = ckpt.proposal
        self.step = ckpt.step
        if self.is_main:
            run.metrics.truncate_after_step(self.step)
            run.samples.truncate_after_step(self.step)
            print(f"[fdpg] resumed {run.dir} from {path.name}", flush=True)

    def _on_signal(self, signum: int, frame: Any) -> None:
        self._stop_signal = signum

    # ------------------------------------------------------------------ the loop
    def train(self) -> dict[str, Any]:
        """Run until ``config.steps``; returns the summary. Resumes when ``config.resume`` is set."""
        cfg = self.config
        if cfg.resume:
            self.run = RunLog.open_existing(cfg.resume)
            self._restore(self.run)
        elif self.is_main:
            self.run = RunLog.create(cfg.output_dir, {**cfg.to_dict(), "target": self.target.describe(),
                                                      "conditional": self.conditional, **self.run_extras})
        if self.is_main and cfg.report_to != "none":
            self.accelerator.init_trackers("fdpg", config=cfg.to_dict())
        # Signal handlers can only be installed from the main thread; elsewhere the caller handles signals.
        in_main_thread = threading.current_thread() is threading.main_thread()
        previous = {s: signal.signal(s, self._on_signal) for s in (signal.SIGTERM, signal.SIGINT)} \
            if in_main_thread else {}
        status, error = "finished", None
        last: dict[str, Any] = {}
        started = time.perf_counter()
        bar = tqdm(total=cfg.steps, initial=self.step, disable=not (cfg.progress and self.is_main), desc="f-DPG")
        try:
            while self.step < cfg.steps:
                snapshot = (self.log_z.state_dict(), self.moving_baseline.state_dict(), self.proposal)
                try:
                    last = self.train_step(self.step)
                except BaseException:
                    self.log_z.load_state_dict(snapshot[0])
                    self.moving_baseline.load_state_dict(snapshot[1])
                    self.proposal = snapshot[2]
                    raise
                self.step += 1
                if self.is_main:
                    self.run.metrics.write(last)
                    if cfg.log_samples_every and self.step % cfg.log_samples_every == 0:
                        self._log_samples(self.step)
                    if cfg.report_to != "none":
                        self.accelerator.log({k: v for k, v in last.items() if isinstance(v, (int, float))},
                                             step=self.step)
                    bar.set_postfix(self._postfix(last), refresh=False)
                    bar.update(1)
                if self.step % cfg.save_every == 0 or self.step == cfg.steps:
                    self.save()
                if self._stop_signal is not None:
                    raise StopTraining(f"stopped by signal {signal.Signals(self._stop_signal).name}")
        except StopTraining as exc:
            status, error = "interrupted", str(exc)
            self._emergency_save()
        except BaseException as exc:
            status, error = "failed", f"{type(exc).__name__}: {exc}"
            self._emergency_save()
            raise
        finally:
            bar.close()
            for s, handler in previous.items():
                signal.signal(s, handler)
            summary = {"status": status, "error": error, "steps_completed": self.step, "steps": cfg.steps,
                       "wall_time_s": time.perf_counter() - started, "last_metrics": last}
            if self.is_main and self.run is not None:
                self.run.write_json("summary.json", summary)
                if status == "finished":
                    self.policy.save_pretrained(str(self.run.dir / "final"), self._unwrapped())
                self.run.close()
            if cfg.report_to != "none":
                self.accelerator.end_training()
        return summary

    def _emergency_save(self) -> None:
        """Leave a resumable checkpoint of the last completed step (if not already saved)."""
        if self.run is None or self.step == 0:
            return
        path = latest_checkpoint(self.run.dir)
        if path is None or path.name != f"step-{self.step}":
            try:
                self.save(barrier=False)  # other processes may be gone: no collective calls here
            except Exception as exc:  # never hide the original error behind a saving error
                print(f"[fdpg] could not save a checkpoint after the error: {exc}", flush=True)

    @staticmethod
    def _postfix(metrics: Mapping[str, Any]) -> dict[str, str]:
        keys = [k for k in metrics if k.startswith("score/")][:2] + ["kl_pi_a", "d_f"]
        return {k.removeprefix("score/"): f"{metrics[k]:.3g}" for k in keys
                if isinstance(metrics.get(k), (int, float))}

    @property
    def run_dir(self):
        return None if self.run is None else self.run.dir
