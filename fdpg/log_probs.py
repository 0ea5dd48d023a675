r"""Per-token log-probabilities :math:`\log\pi(y_t\mid x, y_{<t})` of sampled completions, with their gradient.

One forward pass over prompt + completion gives the final hidden states :math:`h_t \in \mathbb R^D`; the LM head
(:math:`W \in \mathbb R^{V\times D}`, bias :math:`c`) turns them into logits :math:`z_t = W h_t + c` and

.. math:: \log\pi(y_t) = z_{t,y_t} - \operatorname{logsumexp}(z_t), \qquad
          \frac{\partial \log\pi(y_t)}{\partial h_t} = W^\top(\mathbb 1_{y_t} - \operatorname{softmax}(z_t)).

The logits are the largest tensor of a training step on a small model (``[B, T, V]``: 151 MB in fp32 for
16 x 48 tokens of a 49k vocabulary, twice that with its gradient). When the head is a frozen ``nn.Linear`` (the
LoRA case), :class:`LinearTokenLogProb` never holds them: it runs the head over chunks of rows, keeps
:math:`\log\pi(y_t)`, and computes the gradient with respect to :math:`h_t` above while each chunk's logits are
at hand; the backward pass only scales it by the incoming gradient. The arithmetic is that of autograd (one head
product forward, one backward); only masked (post-EOS) positions are skipped. Otherwise (a trainable head, a
head with hooks, or a model whose logits are not ``W h + c``, e.g. soft-capped) the logits path is used, with
:class:`TokenLogProb` for a lean backward.
"""

from __future__ import annotations

import weakref
from typing import NamedTuple

import torch
import torch.nn.functional as F

from fdpg.cast_linears import frozen_product_weights
from fdpg.sampling import SampleBatch

#: Rows of the LM head computed at once by :class:`LinearTokenLogProb` (256 x 49k fp32 logits: 50 MB; fewer
#: rows make the matrix product markedly slower on CPU).
CHUNK_ROWS = 256

# Per LM head module: whether ``W h + c`` of the model's last hidden state reproduced the model's own logits.
_HEAD_CHECKED: weakref.WeakKeyDictionary[torch.nn.Module, bool] = weakref.WeakKeyDictionary()


def completion_token_log_probs(model: torch.nn.Module, batch: SampleBatch, return_hidden: bool = False
                               ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    r"""``[B, T]`` log-probabilities of the completion tokens under ``model`` (0 where masked).

    With ``return_hidden`` also the ``[B, T, D]`` final hidden states that predict them, :math:`h_t` of the state
    :math:`s_t = (c, y_{<t})` (what a value head on the policy's backbone reads), from the same forward pass.

    One forward pass over prompt + completion with explicit position ids (so left padding does not shift
    positions). The LM head runs only on the ``T`` positions that predict completion tokens: fused with the
    log-softmax (:class:`LinearTokenLogProb`) when the head allows it, else through the model's own head with
    ``logits_to_keep`` as an index tensor (the kept hidden states are then one contiguous matrix; an integer
    ``logits_to_keep`` slices a strided view that ``F.linear`` runs ~3x slower on CPU). Keeps the autograd
    graph unless called under ``torch.no_grad``/``inference_mode``.
    """
    input_ids = torch.cat([batch.prompt_ids, batch.completion_ids], dim=1)
    attention_mask = torch.cat([batch.prompt_mask, batch.completion_mask], dim=1)
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    length, t = input_ids.shape[1], batch.completion_ids.shape[1]
    keep = torch.arange(length - t - 1, length - 1, device=input_ids.device)
    inputs = dict(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False)
    head = _fusable_head(model)
    if head is None:
        out = model(**inputs, logits_to_keep=keep, output_hidden_states=return_hidden)
        token_log_probs = TokenLogProb.apply(out.logits.float(), batch.completion_ids) * batch.completion_mask
        return (token_log_probs, out.hidden_states[-1][:, keep]) if return_hidden else token_log_probs

    # The model computes its own logits for one position only (used once per head to check the fusion).
    out = model(**inputs, logits_to_keep=keep[-1:], output_hidden_states=True)
    hidden = out.hidden_states[-1][:, keep]
    if head not in _HEAD_CHECKED:
        _HEAD_CHECKED[head] = _head_reproduces_logits(head, hidden[:, -1], out.logits[:, -1])
        if not _HEAD_CHECKED[head]:
            return completion_token_log_probs(model, batch, return_hidden)  # now through the logits path
    mask = batch.completion_mask.bool()
    weight, bias = frozen_product_weights(head)  # under autocast: cast once (for the step, or now), not per chunk
    log_probs = LinearTokenLogProb.apply(hidden[mask], weight, bias, batch.completion_ids[mask])
    token_log_probs = torch.zeros(mask.shape, dtype=log_probs.dtype, device=log_probs.device).masked_scatter(
        mask, log_probs)
    return (token_log_probs, hidden) if return_hidden else token_log_probs


def _fusable_head(model: torch.nn.Module) -> torch.nn.Linear | None:
    """The model's LM head if :class:`LinearTokenLogProb` may replace it, else ``None``."""
    get = getattr(model, "get_output_embeddings", None) or getattr(getattr(model, "module", None),
                                                                    "get_output_embeddings", None)
    head = get() if get is not None else None
    if type(head) is not torch.nn.Linear or _HEAD_CHECKED.get(head) is False:
        return None
    if head.weight.requires_grad or (head.bias is not None and head.bias.requires_grad):
        return None  # a trainable head needs the logits again for its own gradient: use the logits path
    if head._forward_hooks or head._forward_pre_hooks:
        return None  # a hook may change the logits
    return head


@torch.no_grad()
def _head_reproduces_logits(head: torch.nn.Linear, hidden: torch.Tensor, logits: torch.Tensor) -> bool:
    """Whether ``head(hidden)`` is the model's ``logits`` (not so for soft-capped or scaled logits)."""
    mine, theirs = head(hidden).float(), logits.float()
    return bool(torch.allclose(mine, theirs, rtol=1e-3, atol=1e-3 * (1.0 + float(theirs.abs().max()))))


class LinearTokenLogProb(torch.autograd.Function):
    r"""``log_softmax(hidden @ W.T + c)[tokens]`` for ``[N, D]`` rows, never holding ``[N, V]`` logits.

    Forward, per chunk of :data:`CHUNK_ROWS` rows: logits, their logsumexp, the token's log-probability and,
    when ``hidden`` needs a gradient, :math:`W^\top(\mathbb 1_{y} - \operatorname{softmax}(z))` (``[N, D]``,
    saved). Backward: that times the incoming gradient. ``W`` and ``c`` must be frozen (no gradient for them).
    """

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                tokens: torch.Tensor) -> torch.Tensor:
        need_grad = ctx.needs_input_grad[0]
        n = hidden.shape[0]
        dtype = torch.promote_types(hidden.dtype, torch.float32)  # bf16/fp16 logits are reduced in float32
        log_probs = torch.empty(n, dtype=dtype, device=hidden.device)
        grad_hidden = torch.empty_like(hidden) if need_grad else None
        for lo in range(0, n, CHUNK_ROWS):
            hi = min(lo + CHUNK_ROWS, n)
            chosen = tokens[lo:hi].unsqueeze(-1)
            logits = F.linear(hidden[lo:hi], weight, bias).to(dtype)
            lse = torch.logsumexp(logits, -1, keepdim=True)
            log_probs[lo:hi] = (logits.gather(-1, chosen) - lse).squeeze(-1)
            if need_grad:
                d_logits = logits.sub_(lse).exp_().neg_()  # -softmax, in place of the logits
                d_logits.scatter_add_(-1, chosen, torch.ones_like(chosen, dtype=d_logits.dtype))
                grad_hidden[lo:hi] = (d_logits.to(weight.dtype) @ weight).to(hidden.dtype)
        ctx.save_for_backward(grad_hidden if need_grad else None)
        return log_probs

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (grad_hidden,) = ctx.saved_tensors
        return grad_hidden * grad.unsqueeze(-1).to(grad_hidden.dtype), None, None, None


class TokenLogProb(torch.autograd.Function):
    r"""``log_softmax(logits)[..., tokens]`` whose backward allocates one ``[B, T, V]`` tensor, not four.

    Autograd of ``gather - logsumexp`` would make ``exp(x - lse)``, its product with the gradient, a zero
    tensor scattered for ``gather`` and their sum, each the size of the logits (151 MB for 16 x 48 tokens of a
    49k vocabulary); here the gradient :math:`g\,(\mathbb 1_{\text{token}} - \text{softmax})` is built in place.
    """

    @staticmethod
    def forward(ctx, logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        lse = torch.logsumexp(logits, -1)
        ctx.save_for_backward(logits, lse, tokens)
        return logits.gather(-1, tokens.unsqueeze(-1)).squeeze(-1) - lse

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        logits, lse, tokens = ctx.saved_tensors
        g = (logits - lse.unsqueeze(-1)).exp_().mul_(-grad.unsqueeze(-1))
        g.scatter_add_(-1, tokens.unsqueeze(-1), grad.unsqueeze(-1))
        return g, None


def token_entropy(head: torch.nn.Module, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    r"""``[B, T]`` entropy :math:`H(\pi(\cdot\mid s_t)) = \operatorname{lse}(z_t) - \sum_v \operatorname{softmax}(z_t)_v
    z_{t,v}` of the next-token distributions from the hidden states (``logits = head(hidden)``; 0 where masked).

    Holds the ``[N, V]`` logits of the real positions with their graph (an entropy bonus needs them)."""
    keep = mask.bool()
    logits = head(hidden[keep]).float()
    log_probs = _log_softmax(logits)
    entropy = -(log_probs.exp() * log_probs).sum(-1)
    return torch.zeros(mask.shape, dtype=entropy.dtype, device=entropy.device).masked_scatter(keep, entropy)


def _completion_hidden(model: torch.nn.Module, batch: SampleBatch) -> torch.Tensor:
    """``[B, T, D]`` final hidden states of the positions that predict the completion tokens (no logits kept)."""
    input_ids = torch.cat([batch.prompt_ids, batch.completion_ids], dim=1)
    attention_mask = torch.cat([batch.prompt_mask, batch.completion_mask], dim=1)
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    length, t = input_ids.shape[1], batch.completion_ids.shape[1]
    out = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False,
                output_hidden_states=True, logits_to_keep=1)
    return out.hidden_states[-1][:, length - t - 1:length - 1]


def _log_softmax(logits: torch.Tensor) -> torch.Tensor:
    """``logits - logsumexp(logits)`` over the last axis: on the CPU in fp32, ``torch.log_softmax`` over a 49k
    vocabulary is biased by +1.6e-5 a token against float64 (SmolLM2's head), ``logsumexp`` by 5e-8, the
    same as the log-probs of :func:`completion_token_log_probs` (the reference pass)."""
    return logits - torch.logsumexp(logits, -1, keepdim=True)


def _head(model: torch.nn.Module) -> torch.nn.Module:
    get = getattr(model, "get_output_embeddings", None) or model.module.get_output_embeddings
    return get()


class ExactTokenStats(NamedTuple):
    r"""Per completion (``[B]`` float64 each): the exact next-token KL and entropy summed over its prefix, and its
    log-probability under the policy and under the reference (from the same logits); and ``token_log_a``, the
    ``[B, T]`` per-token :math:`\log a(y_t\mid s_t)` (0 where masked), what the reference pass would give."""

    kl: torch.Tensor
    entropy: torch.Tensor
    log_pi: torch.Tensor
    log_a: torch.Tensor
    token_log_a: torch.Tensor


@torch.inference_mode()
def exact_token_kl(model: torch.nn.Module, reference, batch: SampleBatch,
                   chunk_rows: int = CHUNK_ROWS) -> ExactTokenStats:
    r"""Per completion, :math:`\sum_t KL(\pi(\cdot\mid s_t)\,\|\,a(\cdot\mid s_t))` and :math:`\sum_t H(\pi(\cdot\mid
    s_t))` over its real positions: the exact next-token KL and entropy summed over the sampled prefix; and, from
    the same logits, :math:`\log\pi(x)` and :math:`\log a(x)` (so that an evaluation needs no other pass).

    By the chain rule :math:`KL(\pi\|a) = E_{x\sim\pi}[\sum_t KL(\pi(\cdot\mid s_t)\|a(\cdot\mid s_t))]`, so the
    mean of the first over samples of :math:`\pi` estimates the sequence KL like :math:`\log\pi(x) - \log a(x)`
    does, but each term is non-negative and its variance is far lower (only the prefixes are random). Likewise
    for the entropy. ``reference`` is a context manager yielding the reference model (the policy's
    :meth:`fdpg.policy.Policy.reference`), or ``None`` for ``model``
    against itself (KL 0, one pass). Two forward passes (policy and reference, oneDNN linears on the CPU)
    that keep only hidden states; the logits of both models exist together for ``chunk_rows`` positions at a time.
    """
    from fdpg.onednn_linears import onednn_linears

    mask = batch.completion_mask.bool()
    tokens = batch.completion_ids[mask].unsqueeze(-1)
    with onednn_linears(model, prepack_rows=None):
        hidden_pi = _completion_hidden(model, batch)[mask]
    if reference is not None:
        with reference() as ref, onednn_linears(ref, prepack_rows=None):
            hidden_a = _completion_hidden(ref, batch)[mask]
    stats = torch.empty(4, hidden_pi.shape[0], dtype=torch.float64, device=hidden_pi.device)
    for lo in range(0, hidden_pi.shape[0], chunk_rows):
        hi = lo + chunk_rows
        log_pi = _log_softmax(_head(model)(hidden_pi[lo:hi]).float())
        if reference is None:
            log_a = log_pi
        else:
            with reference() as ref:  # (the adapter disabled: a LoRA on the head is the policy's only)
                log_a = _log_softmax(_head(ref)(hidden_a[lo:hi]).float())
        pi = log_pi.exp()
        # fp32 terms, float64 sums; a KL is never negative (rounding can make a ~1e-8 one so)
        stats[0, lo:hi] = (pi * (log_pi - log_a)).sum(-1, dtype=torch.float64).clamp(min=0)
        stats[1, lo:hi] = -(pi * log_pi).sum(-1, dtype=torch.float64)
        stats[2, lo:hi] = log_pi.gather(-1, tokens[lo:hi]).squeeze(-1).double()
        stats[3, lo:hi] = log_a.gather(-1, tokens[lo:hi]).squeeze(-1).double()
    per_token = torch.zeros((4, *mask.shape), dtype=torch.float64, device=stats.device)
    per_token[:, mask] = stats
    return ExactTokenStats(*per_token.sum(-1), per_token[3])
