r"""Linear layers whose weights are cast once, for the no-grad passes under autocast (``--mixed_precision bf16``).

Under ``torch.autocast`` every linear layer :math:`y = x W^\top + c` casts :math:`x`, :math:`W` and :math:`c` to
the low-precision dtype (bf16) and multiplies in it. autocast caches the cast only of leaf tensors that require
a gradient, so the frozen weights (all of them but the adapter's with LoRA, every one in the reference pass) are
cast again at every call: a decode step of ``generate`` re-reads all the fp32 weights and writes their bf16
copies, 48 times for a 48-token completion, which costs more than the bf16 product saves.

Inside :func:`cast_once_linears` each plain ``nn.Linear`` (a LoRA layer's base layer and its ``A`` and ``B``
included, unmerged) multiplies by a bf16 copy of its weight made once on entry. The arithmetic is autocast's
own, :math:`\mathrm{bf16}(x)\,\mathrm{bf16}(W)^\top + \mathrm{bf16}(c)` through the same ``F.linear``, and
everything else (norms, softmax, the residual stream) still runs as autocast runs it, so a no-grad pass inside the
block computes the same function as the training forward under autocast, to the summation order of the kernels:
the samples' recorded :math:`\log q` is :math:`\log\pi_\theta` of the bf16 policy that is trained. (Merging LoRA
into :math:`W` in bf16, as the fp32 path does, would round :math:`W + BA` once and make :math:`q` another function
than the trained :math:`\pi`; it is not done.)

For sampling (``prepack_rows``: the rows of a decode step) on a CPU with oneDNN, each bf16 copy is also reordered
once into oneDNN's blocked layout for that row count (``torch.ops.mkldnn._reorder_linear_weight``, what TorchInductor's
CPU weight prepacking does for bf16) and multiplied by ``torch.ops.mkldnn._linear_pointwise``: the same bf16
product with fp32 accumulation, rounded to bf16, as ``F.linear``'s oneDNN matmul, in another summation order. On
SmolLM2-135M's 211 products of a 16-row decode step (2-core Xeon with avx512_bf16, no AMX; weights from memory):
``F.linear`` on the bf16 copies 63.8 ms, the prepacked copies 50.9 ms, fp32 prepacked 57.2 ms (``bench/linears.py``).

A frozen weight (``requires_grad`` off: LoRA's base layers, a frozen LM head, a reference copy) is cast once for
its lifetime (:func:`frozen_cast`: the copy is kept while the weight's storage and version counter are unchanged),
so every block and every step multiply by one bf16 copy: half the fp32 weights' memory, kept for the run. A
weight that trains is cast on entry to each block, and its copy lives only inside it (the weights must not change
inside the block); the fp32 master weights and the optimizer are untouched.

The training forward keeps autocast, but its frozen weights (a LoRA model's base layers, a frozen LM head) need
no gradient, so autocast casts them again at every micro-batch's forward for nothing: inside
:func:`cast_frozen_linears` (the engine's micro-batch loop, :meth:`fdpg.engine.TrainingLoop.accumulation`) they
are cast once for the loop of micro-batches of each optimizer update. The product is autocast's, and so is its
backward (the gradient reaches the input through the bf16 weight, as autocast's saved cast does); the weights
that train (the adapter, or every weight of a full fine-tune) keep autocast's own casts, whose backward reaches
the fp32 masters. A micro-batch forward+backward of workload W (8 x 48 tokens, SmolLM2-135M, LoRA) spent 19% of
its time in ``copy_`` (the casts) before (torch profiler).
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F


def autocast_dtype_on(device_type: str) -> torch.dtype | None:
    """The dtype autocast computes in on ``device_type`` right now (``None`` when autocast is off there)."""
    return torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else None


def autocast_dtype(model: torch.nn.Module) -> torch.dtype | None:
    """The dtype autocast computes in for ``model``'s device right now (``None`` when autocast is off there)."""
    try:
        device_type = next(model.parameters()).device.type
    except StopIteration:
        return None
    return autocast_dtype_on(device_type)


#: The low-precision copies of frozen weights, by ``id`` of the weight: (a weak reference to it, the key it had
#: when cast, the copy). See :func:`frozen_cast`.
_FROZEN_CASTS: dict[int, tuple[weakref.ref, tuple, torch.Tensor]] = {}


def frozen_cast(weight: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``weight`` cast to ``dtype``; for a weight that does not train (``requires_grad`` off: LoRA's base layers, a
    frozen LM head, a full fine-tune's reference copy) the copy is made once and kept for as long as the weight
    lives and is unchanged (its storage and its version counter), so the reference pass and the training pass of
    every step multiply by one copy instead of casting all the frozen weights twice a step (0.17 s for
    SmolLM2-135M's 134M on one core). A weight that trains is cast now, every time."""
    if weight.requires_grad or weight.dtype == dtype:
        return weight.detach().to(dtype).contiguous()
    key = (weight.data_ptr(), weight._version, weight.device, dtype)
    entry = _FROZEN_CASTS.get(id(weight))
    if entry is not None and entry[0]() is weight and entry[1] == key:
        return entry[2]
    with torch.inference_mode(False), torch.no_grad():  # a plain tensor: the training pass reuses the copy
        cast = weight.detach().to(dtype).contiguous()
    ident = id(weight)
    _FROZEN_CASTS[ident] = (weakref.ref(weight, lambda _: _FROZEN_CASTS.pop(ident, None)), key, cast)
    return cast


def _cast_forward(weight: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype,
                  prepack_rows: int | None = None) -> Callable[[torch.Tensor], torch.Tensor]:
    """``x -> F.linear(x, W, c)`` in ``dtype``, with ``W`` and ``c`` cast now, once (a frozen ``W``: once for its
    lifetime, :func:`frozen_cast`), and, with ``prepack_rows``, ``W`` reordered for oneDNN products of that many
    rows."""
    weight = frozen_cast(weight, dtype)
    bias = bias.detach().to(dtype) if bias is not None else None
    if prepack_rows is None:
        def forward(x: torch.Tensor) -> torch.Tensor:
            return F.linear(x.to(dtype), weight, bias)

        forward.cast = (weight, bias)  # type: ignore[attr-defined]  (see frozen_product_weights)
        return forward

    packed, out_features = torch.ops.mkldnn._reorder_linear_weight(weight, prepack_rows), weight.shape[0]

    def packed_forward(x: torch.Tensor) -> torch.Tensor:
        y = torch.ops.mkldnn._linear_pointwise(x.to(dtype).reshape(-1, x.shape[-1]), packed, bias, "none", [], "")
        return y.view(*x.shape[:-1], out_features)

    packed_forward.prepacked = True  # type: ignore[attr-defined]  (for tests and benches to see the path taken)
    packed_forward.weights = (weight, bias)  # type: ignore[attr-defined]  (what it packed, for tests)
    return packed_forward


def onednn_packing_available() -> bool:
    """Whether this torch build has oneDNN and the private linear ops used here."""
    return (
        torch.backends.mkldnn.is_available()
        and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")
        and hasattr(torch.ops.mkldnn, "_linear_pointwise")
    )


def bf16_prepacking_available(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether oneDNN can prepack ``dtype`` weights on ``device``: bf16 on a CPU whose oneDNN has native bf16."""
    return (device.type == "cpu" and dtype == torch.bfloat16 and onednn_packing_available()
            and bool(torch.ops.mkldnn._is_mkldnn_bf16_supported()))


def _castable(module: torch.nn.Module, device: torch.device) -> bool:
    """A plain fp32 ``nn.Linear`` on ``device``: no hooks, no forward already replaced (an enclosing block)."""
    return (type(module) is torch.nn.Linear and module.weight.dtype == torch.float32
            and module.weight.device == device
            and not (module._forward_hooks or module._forward_pre_hooks or "forward" in vars(module)))


@contextmanager
def cast_once_linears(model: torch.nn.Module, prepack_rows: int | None = None) -> Iterator[int]:
    """Within the block (entered without grad, under autocast), ``model``'s linear layers use weights cast once.

    ``prepack_rows``: for sampling, the rows of a decode step; where oneDNN allows
    (:func:`bf16_prepacking_available`) the cast weights are also prepacked for that many rows (other row counts,
    such as the prompt's prefill, work too). ``None``: the cast weights as they are (passes with many rows).

    Yields the number of layers patched: 0 (nothing changed) where gradients are enabled (the training forward
    keeps autocast's per-call casts, whose backward reaches the fp32 weights), where autocast is off, or for the
    layers an enclosing block patched already (blocks nest, so a caller that samples in chunks casts once around
    its loop). On exit every forward is restored and the copies are freed.
    """
    dtype = autocast_dtype(model)
    if torch.is_grad_enabled() or dtype is None or dtype == torch.float32:
        yield 0
        return
    device = next(model.parameters()).device
    if prepack_rows is not None and not bf16_prepacking_available(device, dtype):
        prepack_rows = None
    patched: list[torch.nn.Module] = []
    try:
        with torch.no_grad():
            for module in model.modules():
                if _castable(module, device):
                    module.forward = _cast_forward(module.weight, module.bias, dtype, prepack_rows)
                    patched.append(module)
        yield len(patched)
    finally:
        for module in patched:
            del module.forward


def _frozen_cast_forward(module: torch.nn.Module, dtype: torch.dtype,
                         device_type: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """The module's product with its weight cast to ``dtype`` once, where autocast computes in ``dtype`` at call
    time; its own forward (autocast's per-call cast, or fp32) elsewhere."""
    cast = _cast_forward(module.weight, module.bias, dtype)
    own = type(module).forward

    def forward(x: torch.Tensor) -> torch.Tensor:
        return cast(x) if autocast_dtype_on(device_type) == dtype else own(module, x)

    forward.cast = cast.cast  # type: ignore[attr-defined]
    return forward


def frozen_product_weights(module: torch.nn.Linear) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The weight and bias a frozen linear layer multiplies by right now, for code that multiplies by them without
    calling the layer (the LM head fused with the log-softmax, :class:`fdpg.log_probs.LinearTokenLogProb`): under
    autocast the copy a block of this module made (cast once, not prepacked), else a copy cast now, once for the
    whole call (autocast would cast them again at each product); without autocast the layer's own."""
    forward = vars(module).get("forward")  # a block's replacement of the layer's forward, if any
    packed = getattr(forward, "weights", None)
    if packed is not None:  # a layer multiplying by a prepacked low-precision copy (fdpg.sampling_copy): its weights
        return packed
    low = autocast_dtype_on(module.weight.device.type)
    if low is None or low == torch.float32:
        return module.weight, module.bias
    cast = getattr(forward, "cast", None)
    if cast is not None and cast[0].dtype == low:
        return cast
    return frozen_cast(module.weight, low), None if module.bias is None else module.bias.to(low)


@contextmanager
def cast_frozen_linears(model: torch.nn.Module, dtype: torch.dtype | None) -> Iterator[int]:
    """Within the block, ``model``'s plain linear layers whose weight is frozen (``requires_grad`` off) multiply
    under autocast to ``dtype`` by a copy cast on entry, with gradients on or off (the training forward).

    ``dtype``: the mixed-precision dtype (bf16 or fp16); ``None`` or float32 patches nothing. Yields the number of
    layers patched (0 for those an enclosing block patched already). The frozen weights must not change inside
    the block; on exit every forward is restored and the copies are freed.
    """
    try:
        device = next(model.parameters()).device
    except StopIteration:
        device = None
    if dtype is None or dtype == torch.float32 or device is None:
        yield 0
        return
    patched: list[torch.nn.Module] = []
    try:
        with torch.no_grad():
            for module in model.modules():
                if _castable(module, device) and not module.weight.requires_grad and not (
                        module.bias is not None and module.bias.requires_grad):
                    module.forward = _frozen_cast_forward(module, dtype, device.type)
                    patched.append(module)
        yield len(patched)
    finally:
        for module in patched:
            del module.forward
