r"""Linear layers through oneDNN for no-grad passes: prepacked for sampling, as they are for the reference pass.

A decode step multiplies a few rows (one per sequence, ``B`` = 16 on workload W) by every weight matrix of the
model: ``y = x W^T + c`` with ``x`` of ``B x d_in``. With so few rows MKL's ``sgemm`` runs far below the
machine's matmul rate; oneDNN's inner-product kernel on a weight reordered once into its blocked layout
(``torch.ops.mkldnn._reorder_linear_weight``, what TorchInductor's CPU weight prepacking uses) does the same
product ~1.6x faster on the 211 products of a SmolLM2-135M decode step with 16 rows (2-core AVX2 EPYC, weights
from memory: 165 -> 104 ms; ``bench/linears.py``), and a whole 16 x 48-token ``generate`` 13.5 -> 7.9 s.

A LoRA layer (peft) is packed merged, :math:`W' = W + \frac{\alpha}{r} B A`: one product instead of three and
none of peft's per-call Python, while the adapter's parameters are left untouched. The packed copies live only
inside the block (they are rebuilt on every entry, ~0.3 s for 135M parameters, so the weights may change between
blocks but must not change inside one), so the extra memory is one copy of the packed weights, during sampling.

Passes with many rows (the reference log-probs: 8 sequences x ~56 tokens) gain less (~3-10% against MKL on the
same machine) and use the weights as they are, without a copy.

The result is the same function to float32 rounding (oneDNN sums in another order; a merged LoRA rounds
:math:`W + BA` once): logits agree to ~1e-6 relative, so a token drawn within that distance of a boundary of the
inverse CDF can differ from MKL's.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch

from fdpg.cast_linears import autocast_dtype, cast_once_linears, onednn_packing_available  # noqa: F401  (re-exported)


def _onednn_forward(
    weight: torch.Tensor, bias: torch.Tensor | None, prepack_rows: int | None
) -> Callable[[torch.Tensor], torch.Tensor]:
    """``x -> x weight^T + bias`` through oneDNN; ``weight`` (``out x in``) reordered once for ``prepack_rows``."""
    weight = weight.detach().contiguous()
    packed = weight if prepack_rows is None else torch.ops.mkldnn._reorder_linear_weight(weight, prepack_rows)
    bias = bias.detach().contiguous() if bias is not None else None
    out_features = weight.shape[0]

    def forward(x: torch.Tensor) -> torch.Tensor:
        y = torch.ops.mkldnn._linear_pointwise(x.reshape(-1, x.shape[-1]), packed, bias, "none", [], "")
        return y.view(*x.shape[:-1], out_features)

    return forward


def _plain(module: torch.nn.Module) -> bool:
    """A module whose forward may be replaced: no hooks, no forward already patched on the instance."""
    return not (module._forward_hooks or module._forward_pre_hooks or "forward" in vars(module))


def _packable_linear(module: torch.nn.Module) -> bool:
    return (
        type(module) is torch.nn.Linear and _plain(module)
        and module.weight.dtype == torch.float32 and module.weight.device.type == "cpu"
    )


def _is_lora(module: torch.nn.Module) -> bool:
    try:
        from peft.tuners.lora.layer import LoraLayer
    except ImportError:  # peft is a dependency, but the packing must not need it
        return False
    return isinstance(module, LoraLayer)


def _mergeable_lora(module: torch.nn.Module) -> bool:
    """A peft LoRA ``Linear`` whose output is exactly ``x (W + sum_a delta_a)^T + c`` right now."""
    from peft.tuners.lora.layer import Linear as LoraLinear

    if not isinstance(module, LoraLinear) or not _plain(module) or module.disable_adapters or module.merged:
        return False
    if not _packable_linear(module.base_layer):
        return False
    for name in module.active_adapters:
        if name not in module.lora_A:
            continue
        dropout = module.lora_dropout[name]
        live_dropout = dropout.training and not isinstance(dropout, torch.nn.Identity)
        if name in getattr(module, "lora_variant", {}) or live_dropout:
            return False  # DoRA and other variants, or live dropout: not a plain merged product
        if module.lora_A[name].weight.dtype != torch.float32:
            return False
    return True


def _merged_weight(module: torch.nn.Module) -> torch.Tensor:
    weight = module.base_layer.weight.detach()
    for name in module.active_adapters:
        if name in module.lora_A:
            weight = weight + module.get_delta_weight(name)
    return weight


@contextmanager
def onednn_linears(model: torch.nn.Module, prepack_rows: int | None) -> Iterator[int]:
    """Within the block, the model's float32 CPU linear layers run through oneDNN (entered without grad only).

    ``prepack_rows``: for sampling, the rows of a decode step (the batch size): the weights are reordered for
    that many rows on entry (other row counts, such as the prompt's prefill, work too). ``None``: the weights
    are used as they are, for passes with many rows (the reference log-probs, no copy).

    Under autocast (``--mixed_precision bf16``, on any device) the block is :func:`fdpg.cast_linears.cast_once_linears`
    instead: the linear layers multiply by weights cast to bf16 once on entry (prepacked for ``prepack_rows`` on a CPU
    with native bf16), the same arithmetic as autocast's.

    Yields the number of layers patched: 0 (nothing changed) where gradients are enabled (the oneDNN op has no
    backward), without oneDNN, or for a model with no such layer. Left as they are:
    ``nn.Linear`` layers with hooks or of other dtypes or devices, other layer types (GPT-2's ``Conv1D``), the
    adapters' own ``A`` and ``B``, and LoRA layers that are disabled, merged, DoRA or with live dropout (their
    base layer alone goes through oneDNN). On exit every forward is restored and the packed copies are freed.

    Blocks nest: an inner block leaves the layers an enclosing one replaced alone (and yields 0 for a model the
    enclosing block covers), so a caller that samples in chunks packs once around its loop, not once a chunk.
    """
    if not torch.is_grad_enabled() and autocast_dtype(model) not in (None, torch.float32):
        with cast_once_linears(model, prepack_rows) as n:  # --mixed_precision: bf16 weights cast (and packed) once
            yield n
        return
    if torch.is_grad_enabled() or torch.is_autocast_enabled("cpu") or not onednn_packing_available():
        yield 0
        return
    patched: list[torch.nn.Module] = []
    skip: set[int] = set()  # the adapters' own small layers, and everything inside a merged LoRA layer
    try:
        with torch.no_grad():
            for module in model.modules():
                if id(module) in skip:
                    continue
                if "forward" in vars(module):  # replaced already (an enclosing block): its children may not run
                    skip.update(id(m) for m in module.modules())
                    continue
                lora = _is_lora(module)
                if lora:
                    skip.update(id(m) for part in (module.lora_A, module.lora_B) for m in part.modules())
                if lora and _mergeable_lora(module):
                    module.forward = _onednn_forward(_merged_weight(module), module.base_layer.bias, prepack_rows)
                    skip.update(id(m) for m in module.modules())
                elif _packable_linear(module):
                    module.forward = _onednn_forward(module.weight, module.bias, prepack_rows)
                else:
                    continue
                patched.append(module)
        yield len(patched)
    finally:
        for module in patched:
            del module.forward
