"""The sampling commands' ``--generation`` flags (``fdpg eval``, ``bon``, ``filter-samples``, ``label-rankings``), and
the checked settings they make for :func:`fdpg.generation.attach_generator`."""

from __future__ import annotations

from fdpg.generation import GENERATION_BACKENDS


def add_generation_arguments(parser) -> None:
    """``--generation`` and ``--vllm_kv_cache_gb`` / ``--vllm_gpu_memory_utilization`` / ``--vllm_enforce_eager`` on
    a sampling command (``fdpg eval``, ``bon``, ``filter-samples``, ``label-rankings``)."""
    parser.add_argument("--generation", choices=GENERATION_BACKENDS, default="torch",
                        help="what samples: fdpg's torch loop or a vLLM engine (`make setup-vllm`)")
    parser.add_argument("--vllm_kv_cache_gb", "--vllm-kv-cache-gb", type=float, default=None,
                        help="--generation vllm on a CPU: the KV cache in GiB (default 1)")
    parser.add_argument("--vllm_gpu_memory_utilization", "--vllm-gpu-memory-utilization", type=float, default=None,
                        help="--generation vllm on CUDA: the fraction of GPU memory vLLM may take (default 0.3)")
    parser.add_argument("--vllm_enforce_eager", "--vllm-enforce-eager", action="store_true",
                        help="--generation vllm: no compilation (a fast start, slower calls)")


def generation_from_arguments(args):
    """The settings of :func:`add_generation_arguments`' flags as a checked config (call it before loading a model:
    vLLM settings without ``--generation vllm``, or vLLM missing, are refused as ``fdpg train`` refuses them);
    give it to :func:`attach_generator` with the policy."""
    from fdpg.config import TrainConfig

    return TrainConfig(generation=args.generation, vllm_kv_cache_gb=args.vllm_kv_cache_gb,
                       vllm_gpu_memory_utilization=args.vllm_gpu_memory_utilization,
                       vllm_enforce_eager=args.vllm_enforce_eager)
