r"""A low-precision copy of the policy to sample from under ``--mixed_precision bf16`` (``--bf16_sampling copy``).

Under autocast a decode step of 16 rows is dominated not by its products but by what surrounds them: every
operator goes through autocast's dispatch, every linear layer casts its fp32 input to bf16, the residual stream
and the rotary keys stay fp32 (so the KV cache holds fp32 keys that attention casts again at every step), and a
LoRA layer runs its adapter as two more products, a scale and an add. On a 2-core Xeon with AMX, 16 x 48 tokens
of SmolLM2-135M (LoRA r=8): 3.9-4.1 s under autocast with the weights cast (and prepacked) once, 3.2-3.3 s from
this copy (1 thread).

The copy is the policy's model in bf16 throughout, with each LoRA layer merged,
:math:`W' = \mathrm{bf16}(W + s\,BA)`, and every linear layer's weight reordered once for oneDNN's products of the
decode step's rows (:func:`fdpg.cast_linears._cast_forward`). It is made once (the first time it is needed) and
kept in step with the policy by :meth:`SamplingCopy.refreshed`: a weight is cast (and repacked) again only when a
tensor it comes from changed since (its storage or its version counter), so with LoRA only the adapted layers
are refreshed at each step, and with full fine-tuning everything.

What this changes is the proposal, not the policy that is trained: the samples come from the copy's distribution
:math:`q`, recorded exactly as it is drawn (the copy's own logits), while every estimate and gradient under bf16
reads :math:`\log\pi_\theta` from the training forward (the engine's rewards from the forward pass and the
importance weights :math:`\pi/q`). The autocast sampler is not :math:`\pi_\theta` either (its KV-cached decode
rounds otherwise): on the workload above its recorded :math:`\log q` is 0.33 nats a completion from the training
forward's :math:`\log\pi` on average (max 1.0), the copy's 0.25 (max 0.74).

Used where oneDNN prepacks bf16 (a CPU with native bf16: :func:`fdpg.cast_linears.bf16_prepacking_available`):
elsewhere a bf16 copy multiplies through ``F.linear``, slower than autocast's path on a CPU, unmeasured on a GPU.
Models whose adapters cannot be merged into a weight (DoRA, other PEFT methods) keep autocast's sampler.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable

import torch

from fdpg.cast_linears import _cast_forward, bf16_prepacking_available, frozen_cast


def lora_layers(model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """``model``'s LoRA layers by their name in the base model (PEFT's ``base_model.model.`` prefix dropped)."""
    try:
        from peft.tuners.lora import LoraLayer
    except ImportError:  # pragma: no cover  (peft is a dependency)
        return {}
    prefix = "base_model.model."
    return {name.removeprefix(prefix): module for name, module in model.named_modules()
            if isinstance(module, LoraLayer)}


def mergeable(model: torch.nn.Module) -> bool:
    """Whether every adapter of ``model`` is a plain LoRA whose update :math:`s\\,BA` merges into its weight."""
    from peft import PeftModel

    if not isinstance(model, PeftModel):
        return True
    if any(getattr(config, "peft_type", None) != "LORA" for config in model.peft_config.values()):
        return False
    return all(not any(layer.use_dora.get(a, False) for a in layer.active_adapters) and not layer.merged
               for layer in lora_layers(model).values())


def merged_weight(layer: torch.nn.Module) -> torch.Tensor:
    """A LoRA layer's weight with its active adapters' updates added: :math:`W + \\sum_a s_a B_a A_a`."""
    weight = layer.get_base_layer().weight.detach()
    if getattr(layer, "disable_adapters", False):
        return weight
    for adapter in layer.active_adapters:
        if adapter in layer.lora_A:
            weight = weight + layer.get_delta_weight(adapter).to(weight.dtype)
    return weight


def _key(tensors: Iterable[torch.Tensor]) -> tuple:
    return tuple((t.data_ptr(), t._version) for t in tensors)


class SamplingCopy:
    """The policy's model in ``dtype``, LoRA merged, linear layers prepacked for ``prepack_rows`` rows, kept in
    step with the policy's weights (see the module's docstring)."""

    def __init__(self, dtype: torch.dtype, prepack_rows: int):
        self.dtype, self.prepack_rows = dtype, prepack_rows
        self.model: torch.nn.Module | None = None
        self._seen: dict[str, tuple] = {}  # target -> the key of its sources when last copied
        #: How many weights the last :meth:`refreshed` copied again (for tests and benches).
        self.last_refreshed = 0

    @staticmethod
    def applies(model: torch.nn.Module, dtype: torch.dtype) -> bool:
        """Whether the copy is used for ``model`` under ``dtype`` here (prepacking available, adapters mergeable)."""
        try:
            device = next(model.parameters()).device
        except StopIteration:
            return False
        return bf16_prepacking_available(device, dtype) and mergeable(model)

    def _build(self, model: torch.nn.Module) -> torch.nn.Module:
        """The model's structure in ``dtype``, LoRA merged; its linear layers' weights left empty (they multiply by
        the prepacked copies :meth:`refreshed` makes)."""
        from peft import PeftModel

        with torch.no_grad():
            built = copy.deepcopy(model).merge_and_unload() if isinstance(model, PeftModel) else copy.deepcopy(model)
            for module in built.modules():
                if isinstance(module, torch.nn.Linear):
                    module.weight = torch.nn.Parameter(torch.empty(0, device=module.weight.device),
                                                       requires_grad=False)
            built = built.to(self.dtype).eval()
        for p in built.parameters():
            p.requires_grad_(False)
        return built

    def refreshed(self, model: torch.nn.Module) -> torch.nn.Module:
        """The copy, its weights those of ``model`` now (made on the first call)."""
        from peft import PeftModel

        if self.model is None:
            self.model = self._build(model)
        live = model.get_base_model() if isinstance(model, PeftModel) else model
        adapted = lora_layers(model)
        inside = tuple(f"{name}." for name in adapted)  # the LoRA layers' own sub-modules: merged below
        targets = dict(self.model.named_modules())
        refreshed = 0
        with torch.no_grad():
            for name, layer in adapted.items():
                key = _key(layer.parameters())
                if self._seen.get(name) != key:
                    base = layer.get_base_layer()
                    self._pack(targets[name], merged_weight(layer).to(self.dtype), base.bias)
                    self._seen[name] = key
                    refreshed += 1
            for name, module in live.named_modules():
                if name in adapted or name.startswith(inside):
                    continue
                linear = isinstance(module, torch.nn.Linear)
                for pname, source in module.named_parameters(recurse=False):
                    tag = f"{name}.{pname}"
                    if self._seen.get(tag) == _key([source]):
                        continue
                    if linear:  # packed from the frozen weight's one bf16 copy (fdpg.cast_linears.frozen_cast)
                        self._pack(targets[name], module.weight, module.bias)
                    elif not source.requires_grad:  # a frozen embedding, a norm: that very copy, shared
                        targets[name]._parameters[pname] = torch.nn.Parameter(frozen_cast(source, self.dtype),
                                                                              requires_grad=False)
                    else:
                        getattr(targets[name], pname).copy_(source.detach())
                    self._seen[tag] = _key([source])
                    refreshed += 1
        self.last_refreshed = refreshed
        return self.model

    def _pack(self, linear: torch.nn.Module, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        """The copy's layer multiplies by ``weight`` (and ``bias``) in bf16, reordered for oneDNN now."""
        linear.forward = _cast_forward(weight, bias, self.dtype, self.prepack_rows)
