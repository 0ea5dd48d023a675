r"""The engine every algorithm shares: the loop and run logs, and the phases of the online algorithms.

:class:`TrainingLoop` is the loop of every trainer (f-DPG, PPO, DPO, reward models): run directory, metrics,
checkpoints, signals, resume. An online algorithm (f-DPG in :mod:`fdpg.algorithms.f_dpg`, PPO in
:mod:`fdpg.algorithms.ppo`, SFT, RAFT; DPO in :mod:`fdpg.algorithms.dpo` uses its evaluation phases) subclasses
:class:`OnlineTrainer` and writes only its own step, :meth:`OnlineTrainer.train_step`, from the phases here:

- :meth:`~OnlineTrainer.sample`: this process's share of the step's completions :math:`x \sim q(\cdot\mid c)`
  (:math:`q = \pi_\theta`, or frozen proposal weights when ``self.proposal`` is set), seeded per
  (seed, step, chunk) so that results do not depend on the number of processes;
- :meth:`~OnlineTrainer.score`: the task's features, checked against the target;
- :meth:`~OnlineTrainer.token_log_probs`: per-token :math:`\log\pi` or :math:`\log a` (the reference: the
  adapter disabled, or the frozen copy) in one no-grad pass;
- :meth:`~OnlineTrainer.gather` / :meth:`~OnlineTrainer.gather_list`: the global batch on every process;
- :meth:`~OnlineTrainer.update_log_z` and :meth:`~OnlineTrainer.shared_metrics`: ``log Z`` of the target and
  the metrics every algorithm logs under the same names (``score/...``, ``kl_pi_a``, ``kl_p_pi``, ``d_f``,
  ``entropy``, ``distinct_*``, ``tokens_per_s``, ``time/*``), so that analysis needs no case per algorithm;
- :meth:`~OnlineTrainer.optimizer_step`: gradient clipping, optimizer and zero-grad through ``accelerate``;
  :meth:`~OnlineTrainer.minibatch_updates`: the epochs of shuffled minibatches of the clipped-ratio algorithms
  (PPO, GRPO), one optimizer step each.

The loop (:meth:`~OnlineTrainer.train`) writes ``metrics.jsonl`` and ``samples.jsonl``, checkpoints every
``save_every`` steps (trainable weights, including an algorithm's own modules such as a value head, optimizer,
scheduler and the algorithm's state from :meth:`~OnlineTrainer.algorithm_state`), handles SIGTERM/SIGINT by
saving and stopping, leaves a resumable checkpoint on any error, and resumes from the last checkpoint.
"""

from __future__ import annotations

import contextlib
import copy
import math
import os
import signal
import threading
import time
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import nullcontext
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import gather_object
from tqdm.auto import tqdm
from transformers import get_scheduler

from fdpg.cast_linears import cast_frozen_linears
from fdpg.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from fdpg.config import TrainConfig, incompatible_settings
from fdpg.generation import attach_generator
from fdpg.log_probs import completion_token_log_probs, exact_token_kl
from fdpg.metrics import batch_metrics
from fdpg.onednn_linears import onednn_linears
from fdpg.policy import Policy
from fdpg.run_log import RunLog
from fdpg.sampling import SampleBatch
from fdpg.sampling_copy import SamplingCopy
from fdpg.scores import checked_features
from objectives import Divergence, KLRegularisedReward, LogZEstimator, Target
from objectives.partition import GLOBAL_KEY

#: ``scorer(completions, prompts) -> {feature name: one number per completion}``
Scorer = Callable[[list[str], list[str]], Mapping[str, Any]]
#: ``metrics(features) -> {name: value}``: the task's alignment metrics of a batch.
MetricsFn = Callable[[Mapping[str, torch.Tensor]], Mapping[str, float]]


#: The dtype autocast computes in for each ``--mixed_precision``.
MIXED_PRECISION_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def cpu_bf16_is_native() -> bool:
    """Whether this CPU computes bf16 matmuls natively (avx512_bf16 or AMX, as oneDNN sees it)."""
    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def cpu_has_amx() -> bool:
    """Whether this CPU has AMX tiles enabled (Sapphire Rapids and later): the matrix units that multiply bf16
    several times faster than fp32. avx512_bf16 alone (a dot-product instruction) multiplies bf16 no faster than
    fp32: on a 2-core Xeon with it and no AMX, a 4096^3 product runs at 152 GFLOP/s in bf16, 255 in fp32."""
    probe = getattr(torch.cpu, "_is_amx_tile_supported", None)
    return bool(probe is not None and probe())


def cpu_bf16_warning() -> str | None:
    """Why ``--mixed_precision bf16`` will be slower than fp32 on this CPU, or ``None`` where it can pay."""
    capability = torch.backends.cpu.get_cpu_capability()
    if not cpu_bf16_is_native():
        return (f"--mixed_precision bf16 on a CPU without native bf16 ({capability}, no avx512_bf16/AMX): bf16 "
                "matmuls take a scalar path, ~50x slower than fp32 on a 2-core AVX2 machine. Use --mixed_precision "
                "no here.")
    if not cpu_has_amx():
        return (f"--mixed_precision bf16 on a CPU with avx512_bf16 but no AMX ({capability}): bf16 matmuls run no "
                "faster than fp32 ones here (a 2-core Xeon of this kind: 152 against 255 GFLOP/s), so the step is "
                "slower in bf16 (workload W there: 13.0 s against 10.0 s) and saves little memory. Use "
                "--mixed_precision no on this CPU; bf16 pays on AMX CPUs and GPUs.")
    return None


#: What to install for each tracker of ``--report_to``.
TRACKER_INSTALL = {"tensorboard": 'pip install "fdpg[trackers]"  (tensorboard)', "wandb": "pip install wandb",
                   "mlflow": "pip install mlflow", "comet_ml": "pip install comet_ml", "aim": "pip install aim",
                   "clearml": "pip install clearml", "dvclive": "pip install dvclive"}


def requested_trackers(report_to: str) -> list[str]:
    """The trackers of ``--report_to`` (comma-separated, or ``none``); one that is not installed is refused with
    its install command rather than dropped silently."""
    if report_to.strip() in ("", "none"):
        return []
    from accelerate.tracking import LOGGER_TYPE_TO_CLASS, get_available_trackers

    names = [t.strip() for t in report_to.split(",") if t.strip()]
    available = {str(t) for t in get_available_trackers()}
    for name in names:
        if name not in LOGGER_TYPE_TO_CLASS:
            raise ValueError(f"--report_to {name!r} is not a tracker accelerate knows; choose from "
                             f"{', '.join(sorted(LOGGER_TYPE_TO_CLASS))} (or none)")
        if name not in available:
            raise ImportError(f"--report_to {name}: the {name} package is not installed; "
                              f"{TRACKER_INSTALL.get(name, f'pip install {name}')}")
    return names


def _tracker_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """The run's settings as trackers accept them (numbers, strings and booleans; None as a string)."""
    return {k: (v if isinstance(v, (int, float, str, bool)) else str(v)) for k, v in config.items()}


def reward_target(target: Target, reward_feature: str | None, beta: float, algo: str = "ppo") -> Target:
    r"""The target :math:`a\,e^{r/\beta}` of a reward-maximising algorithm (PPO; DPO's pairs from a task): the
    task's own when it has that form, else one built on the feature the user named (``--reward_feature``); anything
    else is refused with the reason."""
    if reward_feature is not None:
        return Target((KLRegularisedReward(reward_feature, beta),), True, target.conditional)
    energies = target.energies
    if target.include_base and len(energies) == 1 and isinstance(energies[0], KLRegularisedReward):
        return target
    raise ValueError(
        f"--algo {algo} needs a scalar reward, but this task's target is {target.describe()}, not a exp(r/beta) "
        "(a binary or distributional constraint). Use --algo fdpg (e.g. --divergence fkl, as GDC/DPG do), or name "
        f"the feature --algo {algo} should use as its reward with --reward_feature NAME (e.g. the 0/1 constraint).")


class StopTraining(Exception):
    """Raised inside the loop when SIGTERM/SIGINT asked the run to stop after saving."""


def feature_means(features: Mapping[str, torch.Tensor]) -> dict[str, float]:
    """The default alignment metrics: the batch mean of every feature."""
    return {f"score/{k}": float(v.double().mean()) for k, v in features.items()}


def seed_for(*parts: int) -> int:
    """A 32-bit seed from integers (the run's seed, the step, a phase, a position)."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1)[0])


class EpochBatches:
    """Batches of a fixed dataset, epoch after epoch: each epoch a permutation of ``indices`` seeded by
    (``seed``, epoch), laid end to end, step ``s`` taking positions ``s * B .. (s + 1) * B`` (an epoch's end runs
    into the next one's start). The same steps give the same batches on every process and after a resume."""

    def __init__(self, indices: Sequence[int], batch_size: int, seed: int) -> None:
        self.indices, self.batch_size, self.seed = list(indices), batch_size, seed
        self._orders: dict[int, list[int]] = {}

    def order(self, epoch: int) -> list[int]:
        """The indices in the seeded order of ``epoch``."""
        if epoch not in self._orders:
            rng = np.random.default_rng(seed_for(self.seed, epoch, 3))
            self._orders[epoch] = [self.indices[i] for i in rng.permutation(len(self.indices))]
        return self._orders[epoch]

    def step(self, step: int) -> list[int]:
        """The global batch of ``step`` (0-based)."""
        n, b = len(self.indices), self.batch_size
        return [self.order(i // n)[i % n] for i in range(step * b, (step + 1) * b)]


class TrainingLoop:
    """The loop every fdpg trainer shares (the online algorithms, DPO, reward models): run directory, one
    ``metrics.jsonl`` line per step, checkpoints every ``save_every`` steps (the trainable weights, optimizer,
    scheduler, the algorithm's state), SIGTERM/SIGINT saved and stopped, a resumable checkpoint left on any
    error, and resume from the last checkpoint.

    A subclass sets ``config`` (with ``steps``, ``output_dir``, ``resume``, ``save_every``, ``progress``; optional
    ``report_to`` and ``log_samples_every``), ``accelerator``, ``optimizer`` and ``scheduler``, calls
    :meth:`init_loop`, and implements :meth:`train_step` and :meth:`_trainable` (plus the optional hooks).
    """

    #: Shown on the progress bar.
    algorithm = "training"
    #: Frozen weights checkpointed with the run (f-DPG's off-policy proposal), or ``None``.
    proposal: dict[str, torch.Tensor] | None = None

    def init_loop(self) -> None:
        """The loop's own state: no step done, no run directory yet."""
        self.step = 0
        #: Extra entries for config.json (e.g. the fitted lambdas of the target), set by the caller.
        self.run_extras: dict[str, Any] = {}
        self.run: RunLog | None = None
        self._stop_signal: int | None = None
        self._timings: dict[str, float] = {}

    # ------------------------------------------------------------------ what a trainer adds

    def train_step(self, step: int) -> dict[str, Any]:
        """Run optimisation step ``step`` (0-based) and return its metrics."""
        raise NotImplementedError

    def prepare_run(self) -> None:
        """Work done once the run directory exists (created or resumed), before the first step: e.g. DPO's
        reference log-probabilities of its pairs, computed once and stored there."""

    def algorithm_state(self) -> dict[str, Any]:
        """The algorithm's JSON-serialisable state (estimators, controllers) for checkpoints."""
        return {}

    def load_algorithm_state(self, state: Mapping[str, Any]) -> None:
        """Restore what :meth:`algorithm_state` returned."""

    def _trainable(self) -> dict[str, torch.nn.Parameter]:
        """Every trained parameter by name (what a checkpoint holds)."""
        raise NotImplementedError

    def run_config(self) -> dict[str, Any]:
        """What ``config.json`` records: the settings and :attr:`run_extras`."""
        return {**self.config.to_dict(), **self.run_extras}

    def check_resumable(self, run: RunLog) -> None:
        """Refuse to resume ``run`` when its saved settings differ from these in a way that cannot change."""

    def _log_samples(self, step: int) -> None:
        """Write the step's samples (``samples.jsonl``); nothing by default."""

    def save_final(self, directory: str) -> None:
        """The trained weights, for use after training (``RUN/final``)."""

    def final_evaluation(self) -> dict[str, Any]:
        """Work done once when the run finishes (an evaluation); its summary entries."""
        return {}

    # ------------------------------------------------------------------ helpers of a step
    def begin_step(self) -> float:
        """Start timing a step's phases (:meth:`timed`); returns the step's start time."""
        self._timings = {}
        self._proposal_gaps: list[torch.Tensor] = []
        return time.perf_counter()

    def note_proposal_gap(self, log_q: torch.Tensor, log_pi: torch.Tensor) -> None:
        r"""Record :math:`\log q - \log\pi` of some of this step's sequences: the sampler's log-prob against the
        training forward's (logged as ``proposal/log_q_minus_log_pi_mean`` and ``..._max_abs``, so that a drift of a
        sampler that is not the policy itself, vLLM or the bf16 copy, shows)."""
        self._proposal_gaps.append(log_q.detach().double().cpu() - log_pi.detach().double().cpu())


    @contextlib.contextmanager
    def timed(self, phase: str) -> Iterator[None]:
        """Adds the time spent inside to the step's ``time/<phase>`` metric."""
        start = time.perf_counter()
        try:
            yield
        finally:
            key = f"time/{phase}"
            self._timings[key] = self._timings.get(key, 0.0) + time.perf_counter() - start


    def optimizer_step(self) -> float | None:
        """Clip the gradient (``max_grad_norm``), step the optimizer, zero the gradients; the norm before clipping."""
        grad_norm = None
        if self.config.max_grad_norm is not None:
            grad_norm = float(self.accelerator.clip_grad_norm_(list(self._trainable().values()),
                                                               self.config.max_grad_norm))
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return grad_norm


    def accumulation(self, items: Sequence, size: int | None = None
                     ) -> Iterator[tuple[Sequence, contextlib.AbstractContextManager]]:
        """``items`` in micro-batches of ``size`` (default ``config.micro_batch_size``), each with the context its
        backward runs in: no gradient all-reduce across processes (accelerate's ``no_sync``) but for the last."""
        size = size or self.config.micro_batch_size
        n = math.ceil(len(items) / size)
        # Under --mixed_precision the frozen weights are cast once for the whole loop, not at each forward.
        with cast_frozen_linears(self.accelerator.unwrap_model(self.model), MIXED_PRECISION_DTYPES.get(
                self.accelerator.mixed_precision)):
            for i in range(n):
                yield (items[i * size:(i + 1) * size],
                       nullcontext() if i == n - 1 else self.accelerator.no_sync(self.model))

    # ------------------------------------------------------------------ the loop
    @property
    def is_main(self) -> bool:
        return self.accelerator.is_main_process

    def save(self, barrier: bool = True) -> None:
        """Checkpoint the state after ``self.step`` completed steps (the main process writes)."""
        if barrier:
            self.accelerator.wait_for_everyone()
        if self.is_main and self.run is not None:
            save_checkpoint(self.run.dir, self.step, dict(self._trainable()), self.optimizer.state_dict(),
                            self.scheduler.state_dict(), self.algorithm_state(), proposal=self.proposal)
        if barrier:
            self.accelerator.wait_for_everyone()

    def _restore(self, run: RunLog) -> None:
        self.check_resumable(run)
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
        self.load_algorithm_state(ckpt.state)
        self.proposal = ckpt.proposal
        self.step = ckpt.step
        if self.is_main:
            run.metrics.truncate_after_step(self.step)
            run.samples.truncate_after_step(self.step)
            print(f"[fdpg] resumed {run.dir} from {path.name}", flush=True)

    def _on_signal(self, signum: int, frame: Any) -> None:
        self._stop_signal = signum

    def train(self) -> dict[str, Any]:
        """Run until ``config.steps``; returns the summary. Resumes when ``config.resume`` is set."""
        cfg = self.config
        if cfg.resume:
            self.run = RunLog.open_existing(cfg.resume)
            self._restore(self.run)
        elif self.is_main:
            self.run = RunLog.create(cfg.output_dir, self.run_config())
        report_to = getattr(cfg, "report_to", "none")
        if self.is_main and report_to != "none":
            self.accelerator.project_configuration.logging_dir = str(self.run.dir / "trackers")
            self.accelerator.init_trackers("fdpg", config=_tracker_config(cfg.to_dict()))
        self.prepare_run()
        # Signal handlers can only be installed from the main thread; elsewhere the caller handles signals.
        in_main_thread = threading.current_thread() is threading.main_thread()
        previous = {s: signal.signal(s, self._on_signal) for s in (signal.SIGTERM, signal.SIGINT)} \
            if in_main_thread else {}
        status, error = "finished", None
        last: dict[str, Any] = {}
        started = time.perf_counter()
        bar = tqdm(total=cfg.steps, initial=self.step, disable=not (cfg.progress and self.is_main),
                   desc=self.algorithm)
        try:
            while self.step < cfg.steps:
                # A failed step leaves the estimators as they were before it (the weights have not moved).
                snapshot = (copy.deepcopy(self.algorithm_state()), self.proposal)
                try:
                    last = self.train_step(self.step)
                except BaseException:
                    self.load_algorithm_state(snapshot[0])
                    self.proposal = snapshot[1]
                    raise
                self.step += 1
                if self.is_main:
                    self.run.metrics.write(last)
                    every = getattr(cfg, "log_samples_every", 0)
                    if every and self.step % every == 0:
                        self._log_samples(self.step)
                    if report_to != "none":
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
                    self.save_final(str(self.run.dir / "final"))
                    summary.update(self.final_evaluation())
                    self.run.write_json("summary.json", summary)
                self.run.close()
            if report_to != "none":
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


class OnlineTrainer(TrainingLoop):
    """The shared engine of the online algorithms; subclasses implement :meth:`train_step`.

    Args:
        config: the run's settings.
        policy: model + tokenizer + reference access.
        target: the unnormalised target :math:`P` (from :mod:`objectives.targets`); its ``log Z`` is tracked.
        scorer: computes the features the target needs from completions and prompts.
        prompts: the prompt pool (``None`` or empty: unconditional generation from BOS).
        metrics_fn: the task's alignment metrics (default: the mean of every feature).
        accelerator: an ``accelerate.Accelerator`` (default: one built from the config).
        fine_grained: the task's :class:`objectives.fine_grained.FineGrainedReward` (``None``: one score per
            completion); :meth:`score` then also places its segment rewards on the generated tokens
            (:attr:`dense_rewards`), whose row sums must equal the feature ``fine_grained_feature``.
    """

    #: Shown on the progress bar.
    algorithm = "online"

    def __init__(
        self,
        config: TrainConfig,
        policy: Policy,
        target: Target,
        scorer: Scorer,
        prompts: Sequence[str] | None = None,
        metrics_fn: MetricsFn | None = None,
        accelerator: Accelerator | None = None,
        fine_grained: Any = None,
        fine_grained_feature: str = "reward",
    ) -> None:
        self.config = config
        self.fine_grained = fine_grained
        self.fine_grained_feature = fine_grained_feature
        #: ``[B, T]`` float64 per-token rewards of the last :meth:`score` (``None`` without a fine-grained reward).
        self.dense_rewards: torch.Tensor | None = None
        self.target = target
        self.scorer = scorer
        self.prompts = list(prompts) if prompts else [""]
        self.conditional = target.conditional if config.conditional is None else config.conditional
        self.metrics_fn = metrics_fn or feature_means
        trackers = requested_trackers(config.report_to)
        # The trackers' files go into the run directory (set when it exists, in train()).
        self.accelerator = accelerator or Accelerator(
            mixed_precision=config.mixed_precision, log_with=trackers or None,
            project_dir=config.resume or config.output_dir,
        )
        slow_bf16 = cpu_bf16_warning() if (self.accelerator.mixed_precision == "bf16"
                                           and self.accelerator.device.type == "cpu") else None
        if slow_bf16:
            warnings.warn(slow_bf16, stacklevel=3)
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

        if config.activation_checkpointing:
            policy.checkpoint_activations(config.activation_checkpointing)

        torch.manual_seed(config.seed)
        #: The algorithm's own trainable modules (a value head, ...), trained and checkpointed with the policy.
        self.extra_modules: dict[str, torch.nn.Module] = self.build_extra_modules()
        trainable = list(policy.trainable_parameters().values())
        if not trainable:
            raise ValueError("the policy has no trainable parameters")
        trainable += [p for m in self.extra_modules.values() for p in m.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(trainable, lr=config.learning_rate, weight_decay=config.weight_decay)
        self.scheduler = get_scheduler(config.lr_scheduler, optimizer, num_warmup_steps=config.warmup_steps,
                                       num_training_steps=config.steps)
        names = list(self.extra_modules)
        prepared = self.accelerator.prepare(policy.model, *self.extra_modules.values(), optimizer)
        self.model, self.optimizer = prepared[0], prepared[-1]
        self.extra_modules = dict(zip(names, prepared[1:-1]))
        self.log_z = LogZEstimator(config.log_z, config.log_z_window)
        #: Frozen weights to sample from instead of the current ones (DPG's off-policy proposal), or ``None``.
        self.proposal: dict[str, torch.Tensor] | None = None
        #: Whether sampling keeps the last layer's hidden states (``SampleBatch.final_hidden``; PPO's value head).
        self.record_hidden = False
        #: The bf16 copy of the policy sampled from (``--bf16_sampling copy``), made on the first step that needs it.
        self.sampling_copy: SamplingCopy | None = None
        #: What draws the samples (:mod:`fdpg.generation`): the policy's generator, the torch loop by default.
        self.generator = attach_generator(policy, config)
        self.init_loop()
        self._last_samples: dict[str, Any] | None = None
        self._tokens_this_step = 0
        self._exact_kl: tuple[torch.Tensor, torch.Tensor] | None = None
        #: True during the first pass of :meth:`minibatch_updates`.
        self.first_epoch = False

    def build_extra_modules(self) -> dict[str, torch.nn.Module]:
        """The algorithm's own trainable modules besides the policy (called once, before the optimizer)."""
        return {}

    def algorithm_state(self) -> dict[str, Any]:
        return {"log_z": self.log_z.state_dict()}

    def load_algorithm_state(self, state: Mapping[str, Any]) -> None:
        self.log_z.load_state_dict(state["log_z"])

    def _unwrapped(self) -> torch.nn.Module:
        return self.accelerator.unwrap_model(self.model)

    def _trainable(self) -> dict[str, torch.nn.Parameter]:
        """Every trained parameter: the policy's, then each extra module's under ``NAME.`` (checkpointed)."""
        params = self.policy.trainable_parameters(self._unwrapped())
        for name, module in self.extra_modules.items():
            for key, p in self.accelerator.unwrap_model(module).named_parameters():
                if p.requires_grad:
                    params[f"{name}.{key}"] = p
        return params

    def _policy_trainable(self) -> dict[str, torch.nn.Parameter]:
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
            for name, p in self._policy_trainable().items():
                saved = p.detach().clone()
                p.copy_(params[name].to(p.device))
                params[name] = saved

    @contextlib.contextmanager
    def _sampling_weights(self) -> Iterator[None]:
        """The proposal's weights in the policy for the duration (nothing when there is no proposal)."""
        if self.proposal is None:
            yield
            return
        self._swap_params(self.proposal)
        try:
            yield
        finally:
            self._swap_params(self.proposal)

    def step_prompts(self, step: int) -> list[str]:
        """The global batch's prompts at ``step``: each drawn prompt repeated ``samples_per_prompt`` times."""
        n = self.config.batch_size // self.config.samples_per_prompt
        rng = np.random.default_rng(seed_for(self.config.seed, step, 1))
        idx = rng.choice(len(self.prompts), size=n, replace=len(self.prompts) < n)
        return [self.prompts[i] for i in idx for _ in range(self.config.samples_per_prompt)]

    def minibatch_updates(self, step: int, epochs: int, minibatches: int,
                          loss_fn: Callable[[Sequence[int], torch.Tensor], tuple[torch.Tensor, dict[str, float]]],
                          after_minibatch: Callable[[int, int], dict[str, float]] | None = None
                          ) -> dict[str, float]:
        r"""The inner loop of the clipped-ratio algorithms (PPO, GRPO): ``epochs`` passes over this process's batch,
        each in ``minibatches`` shuffled minibatches (seeded by (seed, step, epoch): the same after a resume), one
        optimizer step per minibatch (timed ``optimizer``), its backward micro-batched (timed ``backward``).

        ``loss_fn(rows, minibatch)`` gives one micro-batch's loss, normalised over its whole minibatch (the rows
        ``minibatch``), and its statistics (that micro-batch's share: they add up over the minibatch);
        ``after_minibatch(epoch, m)`` may backpropagate more before the step (PPO-ptx) and return statistics.
        :attr:`first_epoch` is true during the first pass (whose forwards give the sampler's gap). Returns each
        statistic's mean over the minibatches, and ``grad_norm``'s."""
        n = self.local_batch
        size = n // minibatches
        stats: dict[str, list[float]] = {}
        for epoch in range(epochs):
            self.first_epoch = epoch == 0
            order = torch.randperm(n, generator=torch.Generator().manual_seed(seed_for(self.config.seed, step, 3,
                                                                                       epoch)))
            for m in range(minibatches):
                index = order[m * size:(m + 1) * size]
                minibatch: dict[str, float] = {}
                for rows, sync in self.accumulation(index):
                    with self.timed("backward"), sync, self.accelerator.autocast():
                        loss, part_stats = loss_fn(rows, index)
                        self.accelerator.backward(loss)
                    for key, value in part_stats.items():
                        minibatch[key] = minibatch.get(key, 0.0) + value
                if after_minibatch is not None:
                    minibatch.update(after_minibatch(epoch, m))
                with self.timed("optimizer"):
                    grad_norm = self.optimizer_step()
                if grad_norm is not None:
                    minibatch["grad_norm"] = grad_norm
                for key, value in minibatch.items():
                    stats.setdefault(key, []).append(value)
        self.first_epoch = False
        return {key: float(sum(v) / len(v)) for key, v in stats.items()}

    def prompt_keys(self, prompts: Sequence[str]) -> list[str]:
        """The ``log Z`` key of each sample: its prompt when the target is conditional, else one global key."""
        return [p if self.conditional else GLOBAL_KEY for p in prompts]

    def rollout(self, step: int) -> tuple[SampleBatch, dict[str, torch.Tensor], torch.Tensor]:
        r"""The phases every online algorithm starts with: this process's completions (``generate``), the task's
        features (``score``) and the per-token :math:`\log a` of the reference (``reference``), timed."""
        if not self.generator.exact_policy:  # an engine of its own (vLLM): the policy's weights into it first
            with self.timed("weight_sync"), self._sampling_weights():
                self.generator.sync(self._unwrapped())
        with self.timed("generate"):
            batch = self.sample(step)
        if not self.generator.exact_policy and self.config.proposal_differs:
            with self.timed("policy_pass"):  # the sampler's log-probs are of q: log pi from the policy itself
                batch.token_log_pi = self.token_log_probs(batch, reference=False).float()
        with self.timed("score"):
            features = self.score(batch)
        every = self.config.exact_kl_every
        if every and step % every == 0:  # its reference pass gives the per-token log a too: no second one
            with self.timed("exact_kl"):
                kl, entropy, token_log_a = self.exact_kl(batch)
            self._exact_kl = (kl, entropy)
            self._timings.setdefault("time/reference", 0.0)  # the reference ran inside time/exact_kl
        else:
            with self.timed("reference"):
                token_log_a = self.token_log_probs(batch, reference=True)
        return batch, features, token_log_a

    def exact_kl(self, batch: SampleBatch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        r"""``[B]`` exact next-token KL(pi||a) and entropy summed over each sample's prefix, and the ``[B, T]``
        float64 per-token :math:`\log a` from the same reference pass (:func:`fdpg.log_probs.exact_token_kl`),
        micro-batched."""
        model = self._unwrapped()
        width = batch.completion_ids.shape[1]
        parts = []
        with self.accelerator.autocast():
            for lo in range(0, len(batch), self.config.micro_batch_size):
                parts.append(exact_token_kl(model, lambda: self.policy.reference(model),
                                            batch.slice(lo, lo + self.config.micro_batch_size)))
        token_log_a = torch.cat([torch.nn.functional.pad(p.token_log_a, (0, width - p.token_log_a.shape[1]))
                                 for p in parts])
        return (torch.cat([p.kl for p in parts]).cpu(), torch.cat([p.entropy for p in parts]).cpu(),
                token_log_a.double())

    @contextlib.contextmanager
    def _sampler(self, model: torch.nn.Module) -> Iterator[torch.nn.Module]:
        """The model to sample from, inside the block: under ``--mixed_precision bf16`` with ``--bf16_sampling copy``
        (where it applies) the bf16 copy of the policy kept in step with it (:mod:`fdpg.sampling_copy`), else the
        policy itself, under the training pass's autocast, its linear layers cast (bf16) or packed (CPU fp32) once
        for all chunks."""
        if not self.generator.exact_policy:  # vLLM samples from its own copy of the weights
            yield model
            return
        dtype = MIXED_PRECISION_DTYPES.get(self.accelerator.mixed_precision)
        if self.sampling_copy is None and dtype is not None and self.config.bf16_sampling == "copy" \
                and SamplingCopy.applies(model, dtype):
            self.sampling_copy = SamplingCopy(dtype, prepack_rows=self.chunk)
        if self.sampling_copy is not None:
            yield self.sampling_copy.refreshed(model)
            return
        with self.accelerator.autocast(), onednn_linears(model, prepack_rows=self.chunk):
            yield model

    def sample(self, step: int) -> SampleBatch:
        """This process's share of the step's samples, drawn chunk by chunk with per-chunk seeds."""
        cfg = self.config
        prompts = self.step_prompts(step)
        start = self.accelerator.process_index * self.local_batch
        model = self._unwrapped()
        chunks = []
        with self._sampling_weights(), torch.no_grad(), self._sampler(model) as sampler:
            for lo in range(start, start + self.local_batch, self.chunk):
                chunks.append(self.generator.generate(
                    sampler, self.policy.tokenizer, prompts[lo:lo + self.chunk], cfg.max_new_tokens,
                    seed=seed_for(cfg.seed, step, 2, lo), temperature=cfg.temperature, top_p=cfg.top_p,
                    min_new_tokens=cfg.min_new_tokens, record_hidden=self.record_hidden))
        return SampleBatch.concat(chunks, self.policy.tokenizer.pad_token_id)

    @torch.inference_mode()
    def token_log_probs(self, batch: SampleBatch, reference: bool) -> torch.Tensor:
        """``[B, T]`` float64 per-token :math:`\\log a` (``reference``) or :math:`\\log\\pi_\\theta`, no grad."""
        out = []
        ctx = self.policy.reference(self._unwrapped()) if reference else nullcontext(self._unwrapped())
        with ctx as model, self.accelerator.autocast(), onednn_linears(model, prepack_rows=None):
            for lo in range(0, len(batch), self.config.micro_batch_size):
                part = batch.slice(lo, lo + self.config.micro_batch_size)
                values = completion_token_log_probs(model, part)
                out.append(torch.nn.functional.pad(values, (0, batch.completion_ids.shape[1] - values.shape[1])))
        return torch.cat(out).double()

    def sequence_log_probs(self, batch: SampleBatch, reference: bool) -> torch.Tensor:
        """``[B]`` float64 :math:`\\log a(x\\mid c)` or :math:`\\log\\pi_\\theta(x\\mid c)`, no grad."""
        return self.token_log_probs(batch, reference).sum(-1)

    def score(self, batch: SampleBatch) -> dict[str, torch.Tensor]:
        """The task's features of the batch; with a fine-grained reward also its per-token rewards
        (:attr:`dense_rewards`)."""
        features = checked_features(self.target, self.scorer(list(batch.texts), list(batch.prompts)), len(batch))
        self.dense_rewards = None if self.fine_grained is None else self.token_rewards(batch, features)
        return features

    def token_rewards(self, batch: SampleBatch, features: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """``[B, T]`` the fine-grained reward's segment rewards on the tokens that complete each segment, aligned
        from the generated ids (:mod:`objectives.fine_grained`); their row sums are checked against the feature."""
        from objectives import ScoreError

        tokenizer = self.policy.tokenizer
        result = self.fine_grained(list(batch.texts), batch.completion_ids.cpu(),
                                   lambda ids: tokenizer.decode(ids, skip_special_tokens=True),
                                   mask=batch.completion_mask.cpu())
        feature = self.fine_grained_feature
        total = features[feature].double().cpu()
        if not torch.allclose(result.dense.sum(-1), total, atol=1e-6, rtol=1e-9):
            worst = int((result.dense.sum(-1) - total).abs().argmax())
            raise ScoreError(f"the fine-grained reward's per-token rewards of completion {worst} sum to "
                             f"{float(result.dense[worst].sum()):.6g}, but the scorer's {feature!r} is "
                             f"{float(total[worst]):.6g}: the scorer must return FineGrainedReward.totals(texts)")
        return result.dense

    def gather(self, t: torch.Tensor) -> torch.Tensor:
        if self.accelerator.num_processes == 1:
            return t
        return self.accelerator.gather(t.to(self.accelerator.device).contiguous()).cpu()

    def gather_tokens(self, t: torch.Tensor) -> torch.Tensor:
        """A ``[B, T]`` per-token tensor of every process (padded with zeros to the widest before gathering)."""
        if self.accelerator.num_processes == 1:
            return t
        padded = self.accelerator.pad_across_processes(t.to(self.accelerator.device).contiguous(), dim=1)
        return self.accelerator.gather(padded).cpu()

    def gather_list(self, items: list) -> list:
        return items if self.accelerator.num_processes == 1 else gather_object(items)

    def local_slice(self) -> slice:
        """This process's rows of the gathered global batch."""
        lo = self.accelerator.process_index * self.local_batch
        return slice(lo, lo + self.local_batch)

    def update_log_z(self, g_log_P: torch.Tensor, g_log_q: torch.Tensor, g_keys: list) -> torch.Tensor:
        """Add the global batch to the ``log Z`` estimate; return :math:`\\log p = \\log P - \\log Z` per sample.

        :math:`P(x) = 0` means :math:`p(x) = 0` whatever Z is (and Z is 0 while no sample of a key had P > 0).
        """
        self.log_z.update(g_log_P - g_log_q, g_keys)
        return torch.where(g_log_P == -math.inf, g_log_P, g_log_P - self.log_z.log_z_many(g_keys))

    def shared_metrics(self, step: int, batch: SampleBatch, divergence: Divergence,
                       g_features: Mapping[str, torch.Tensor], g_log_pi: torch.Tensor, g_log_q: torch.Tensor,
                       g_log_a: torch.Tensor, g_log_p: torch.Tensor, g_rewards: torch.Tensor,
                       **per_sample: torch.Tensor) -> dict[str, Any]:
        """The metrics every algorithm logs, and the step's samples for ``samples.jsonl`` (``per_sample``: more
        per-sample columns). Call before the update: once the weights move nothing may fail (collectives)."""
        g_tokens = self.gather_list([row[:n].tolist() for row, n in zip(batch.completion_ids, batch.lengths)])
        g_texts = self.gather_list(list(batch.texts))
        metrics: dict[str, Any] = {"step": step + 1}
        metrics.update({k: float(v) for k, v in self.metrics_fn(g_features).items()})
        metrics.update(batch_metrics(divergence, g_log_pi, g_log_q, g_log_a, g_log_p, g_tokens, g_rewards, g_texts))
        metrics.update(self.log_z.summary())
        if self._exact_kl is not None:  # E_q[(pi/q) sum_t KL_t]: the same samples, weighted as kl_pi_a is
            w = torch.exp(g_log_pi - g_log_q).double()
            kl, entropy = (self.gather(x) * w for x in self._exact_kl)
            metrics.update({"kl_pi_a_exact": float(kl.mean()),
                            "kl_pi_a_exact_se": float(kl.std() / math.sqrt(len(kl))) if len(kl) > 1 else None,
                            "entropy_exact": float(entropy.mean())})
            self._exact_kl = None
        self._last_samples = {"completion": g_texts, "prompt": self.gather_list(list(batch.prompts)),
                              "scores": g_features, "log_pi": g_log_pi, "log_a": g_log_a, "log_p": g_log_p,
                              "pseudo_reward": g_rewards, **per_sample}
        self._tokens_this_step = sum(len(r) for r in g_tokens)
        return metrics

    def policy_sample_metrics(self, step: int, divergence: Divergence,
                              pseudo_reward: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> dict[str, Any]:
        r"""The metrics every algorithm logs (:meth:`shared_metrics`), of ``batch_size`` fresh samples of the policy
        on the task's prompts: the periodic evaluation of the offline algorithms (DPO, SFT), whose steps sample
        nothing. ``pseudo_reward(log_pi, log_a)`` fills the pseudo-reward column (DPO: the implicit reward)."""
        batch, features, token_log_a = self.rollout(step)
        with self.timed("bookkeeping"):
            log_a, log_pi = token_log_a.sum(-1), batch.log_pi.double()
            log_P = self.target.log_P(log_a, features)
            g_keys = self.gather_list(self.prompt_keys(batch.prompts))
            g_log_P, g_log_pi, g_log_a = (self.gather(x) for x in (log_P, log_pi, log_a))
            g_features = {k: self.gather(v) for k, v in features.items()}
            g_log_p = self.update_log_z(g_log_P, g_log_pi, g_keys)
            metrics = self.shared_metrics(step, batch, divergence, g_features, g_log_pi, g_log_pi, g_log_a,
                                          g_log_p, pseudo_reward(g_log_pi, g_log_a))
        metrics.pop("step", None)
        return metrics

    def finish_metrics(self, metrics: dict[str, Any], started: float) -> dict[str, Any]:
        """Add the phase timings, the step's time and the throughput (completion tokens per second)."""
        total = time.perf_counter() - started
        gaps = getattr(self, "_proposal_gaps", [])
        if gaps:
            gap = self.gather(torch.cat(gaps))
            metrics.update({"proposal/log_q_minus_log_pi_mean": float(gap.mean()),
                            "proposal/log_q_minus_log_pi_max_abs": float(gap.abs().max())})
        metrics.update({"tokens_per_s": self._tokens_this_step / total, "time/step": total, **self._timings})
        return metrics

    def _log_samples(self, step: int) -> None:
        columns = self._last_samples
        if columns is None:  # a step that sampled nothing (DPO between its evaluations)
            return
        scores = columns["scores"]
        numeric = [k for k in columns if k not in ("completion", "prompt", "scores")]
        records = [
            {"step": step, "prompt": columns["prompt"][i], "completion": columns["completion"][i],
             "scores": {k: float(v[i]) for k, v in scores.items()},
             **{k: float(columns[k][i]) for k in numeric}}
            for i in range(len(columns["completion"]))
        ]
        self.run.samples.write_many(records)

    def run_config(self) -> dict[str, Any]:
        return {**self.config.to_dict(), "target": self.target.describe(), "conditional": self.conditional,
                **self.run_extras}

    def check_resumable(self, run: RunLog) -> None:
        """Refuse to resume ``run`` with settings that cannot change (:func:`fdpg.config.incompatible_settings`)."""
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

    def save_final(self, directory: str) -> None:
        """The trained policy (adapter or model) and the algorithm's modules (``NAME.safetensors``)."""
        from safetensors.torch import save_file

        self.policy.save_pretrained(directory, self._unwrapped())
        for name, module in self.extra_modules.items():
            state = {k: v.detach().cpu().contiguous() for k, v in self.accelerator.unwrap_model(module)
                     .state_dict().items()}
            save_file(state, os.path.join(directory, f"{name}.safetensors"))

    def final_evaluation(self) -> dict[str, Any]:
        """``eval.json``: ``--eval_samples`` completions of the final policy and of the base model (cached), scored
        by the task with standard errors (:func:`fdpg.evaluation.run_evaluation`). Done once per run: a run that
        finished without it (interrupted while evaluating) evaluates when resumed. A failure is reported in the
        summary, never raised: the training itself is saved by then."""
        from fdpg.evaluation import run_evaluation
        from fdpg.task_spec import TaskSpec

        cfg = self.config
        path = self.run.dir / "eval.json"
        if not cfg.eval_samples or path.is_file():
            return {}
        spec = TaskSpec(prompts=self.prompts, scorer=self.scorer, target=self.target, metrics=self.metrics_fn)
        key = {"model": cfg.model, "task": cfg.task, "task_args": cfg.task_args}
        started = time.perf_counter()
        try:
            with torch.no_grad():
                result = run_evaluation(self.policy, spec, cfg.eval_samples, cfg.max_new_tokens, key,
                                        getattr(self, "divergence", None), progress=cfg.progress)
        except Exception as exc:  # the trained weights are in final/ already
            print(f"[fdpg] the final evaluation failed: {type(exc).__name__}: {exc}", flush=True)
            return {"eval_error": f"{type(exc).__name__}: {exc}"}
        result["time_s"] = time.perf_counter() - started
        self.run.write_json("eval.json", result)
        return {"eval": {k: result["policy"].get(k) for k in result["policy"] if k != "examples"},
                "eval_time_s": result["time_s"]}
