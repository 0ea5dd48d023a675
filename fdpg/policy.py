r"""The policy :math:`\pi_\theta` and the reference (base model) :math:`a`.

With LoRA (``lora_r > 0``) the reference is the very same weights with the adapter disabled
(:meth:`peft.PeftModel.disable_adapter`): no second copy in memory. With full fine-tuning the
reference is a frozen deep copy taken before training. Dropout stays off (the model is kept in
``eval`` mode): the gradient must be that of the same :math:`\pi_\theta` that was sampled and scored.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from fdpg.models import load_causal_lm, load_tokenizer


@dataclass
class LoraSettings:
    """LoRA hyper-parameters (Hu et al. 2021): rank r, scale alpha/r, dropout, target modules."""

    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: str = "q_proj,v_proj"

    def peft_config(self):
        from peft import LoraConfig

        modules: str | list[str] = (
            "all-linear" if self.target_modules == "all-linear"
            else [m.strip() for m in self.target_modules.split(",") if m.strip()]
        )
        return LoraConfig(r=self.r, lora_alpha=self.alpha, lora_dropout=self.dropout,
                          target_modules=modules, task_type="CAUSAL_LM", bias="none")


class Policy:
    """A causal LM being aligned, its tokenizer, and access to its reference :math:`a`.

    Attributes:
        model: the trainable model (a ``PeftModel`` when LoRA is used). The trainer may wrap it
            (accelerate/DDP); :meth:`reference` always works on the unwrapped module.
        tokenizer: left-padding tokenizer with a pad token.
        uses_lora: whether the reference is the adapter-disabled policy.
    """

    def __init__(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        lora: LoraSettings | None = None,
        reference: PreTrainedModel | None = None,
    ):
        """Wrap ``model``: add a LoRA adapter (``lora``), or keep ``reference`` (default: a frozen copy).

        A ``model`` that already is a ``PeftModel`` (a trained adapter) is used as it is, with the
        adapter-disabled model as its reference.
        """
        from peft import PeftModel

        self.tokenizer = tokenizer
        self.uses_lora = (lora is not None and lora.r > 0) or isinstance(model, PeftModel)
        self._reference: PreTrainedModel | None = None
        if isinstance(model, PeftModel):
            pass
        elif self.uses_lora:
            from peft import get_peft_model

            try:
                model = get_peft_model(model, lora.peft_config())
            except ValueError as exc:
                names = sorted({name.rsplit(".", 1)[-1] for name, mod in model.named_modules()
                                if isinstance(mod, torch.nn.Linear)})
                raise ValueError(
                    f"--lora_target_modules {lora.target_modules!r} does not match this model's layers: {exc}. "
                    f"Its linear layers are named {names}; or use 'all-linear'."
                ) from exc
        else:
            reference = copy.deepcopy(model) if reference is None else reference
            self._reference = reference.requires_grad_(False).eval()
        self.model = model.eval()

    def checkpoint_activations(self, every_n_layers: int = 1) -> None:
        """Recompute every ``every_n_layers``-th decoder layer's activations in backward instead of keeping them.

        Through transformers' ``activation_checkpointing_enable`` (in 5.19 ``gradient_checkpointing_enable``;
        ``torch.utils.checkpoint``, non-reentrant): the
        backward runs those layers' forward once more, so the gradient is the same up to rounding (no dropout).
        transformers checkpoints a layer only when it is in training mode with gradients on; the policy stays in
        eval mode (dropout off), so only the checkpointed layers' own ``training`` flag is set, not their
        children's: passes without gradients (sampling, reference, scoring) run as before.
        """
        from peft import PeftModel
        from transformers.modeling_layers import GradientCheckpointingLayer

        base = self.model.get_base_model() if isinstance(self.model, PeftModel) else self.model
        if not getattr(base, "supports_gradient_checkpointing", False):
            raise ValueError(f"--activation_checkpointing: {type(base).__name__} does not support activation "
                             "checkpointing in transformers; run without it (0)")
        # 5.25 deprecates gradient_checkpointing_enable for this name; 5.19 (vLLM's CPU build needs < 5.20) lacks it
        enable = getattr(base, "activation_checkpointing_enable", None) or base.gradient_checkpointing_enable
        enable({"use_reentrant": False}, every_n_layers=every_n_layers)
        layers = [m for m in base.modules() if isinstance(m, GradientCheckpointingLayer) and m.gradient_checkpointing]
        if not layers:
            raise ValueError(f"--activation_checkpointing: {type(base).__name__} has no checkpointable decoder "
                             "layers; run without it (0)")
        for layer in layers:
            layer.training = True

    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str,
        lora: LoraSettings | None = None,
        dtype: torch.dtype = torch.float32,
        trust_remote_code: bool = False,
    ) -> Policy:
        tokenizer = load_tokenizer(name_or_path, trust_remote_code=trust_remote_code)
        model = load_causal_lm(name_or_path, dtype=dtype, trust_remote_code=trust_remote_code)
        if model.config.pad_token_id is None:
            model.config.pad_token_id = tokenizer.pad_token_id
        return cls(model, tokenizer, lora)

    def trainable_parameters(self, model: torch.nn.Module | None = None) -> dict[str, torch.nn.Parameter]:
        """Name -> parameter of everything being trained (the adapter with LoRA, all weights otherwise)."""
        model = self.model if model is None else model
        return {name: p for name, p in model.named_parameters() if p.requires_grad}

    @contextlib.contextmanager
    def reference(self, unwrapped: torch.nn.Module | None = None) -> Iterator[torch.nn.Module]:
        """Context yielding the reference model :math:`a` (adapter disabled, or the frozen copy)."""
        if self.uses_lora:
            model = self.model if unwrapped is None else unwrapped
            with model.disable_adapter():
                yield model
        else:
            assert self._reference is not None
            yield self._reference

    def to(self, device: torch.device) -> Policy:
        self.model.to(device)
        if self._reference is not None:
            self._reference.to(device)
        return self

    @property
    def max_positions(self) -> int | None:
        """The model's context length, when its config states one."""
        config = self.model.config
        for attr in ("max_position_embeddings", "n_positions", "max_sequence_length"):
            value = getattr(config, attr, None)
            if isinstance(value, int) and value > 0:
                return value
        return None

    def save_pretrained(self, directory: str, model: torch.nn.Module | None = None) -> None:
        """Save the adapter (LoRA) or the full model, plus the tokenizer, as safetensors."""
        (self.model if model is None else model).save_pretrained(directory, safe_serialization=True)
        self.tokenizer.save_pretrained(directory)
