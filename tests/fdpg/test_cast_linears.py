"""Weights cast once for no-grad passes under autocast: the same function as autocast's forward, cast on entry."""

from __future__ import annotations

from pathlib import Path

import torch
from fdpg_testing import nonzero_lora_policy

from fdpg.cast_linears import (
    bf16_prepacking_available,
    cast_frozen_linears,
    cast_once_linears,
    frozen_product_weights,
)
from fdpg.log_probs import completion_token_log_probs
from fdpg.onednn_linears import onednn_linears
from fdpg.sampling import sample_completions

BF16 = dict(device_type="cpu", dtype=torch.bfloat16)


def _setup(model_dir: Path):
    policy = nonzero_lora_policy(model_dir)
    batch = sample_completions(policy.model, policy.tokenizer, ["ab", "b c", "cab", ""], 8, seed=1)
    linears = sum(type(m) is torch.nn.Linear for m in policy.model.modules())
    return policy.model, batch, linears


def test_a_pass_in_the_block_is_autocasts_forward_with_every_linear_cast(tiny_model_dir: Path) -> None:
    model, batch, linears = _setup(tiny_model_dir)
    with torch.no_grad(), torch.autocast(**BF16):
        want = completion_token_log_probs(model, batch)
        with cast_once_linears(model) as patched:
            got = completion_token_log_probs(model, batch)
        fp32_free = completion_token_log_probs(model, batch)
    assert patched == linears > 0  # base layers, LoRA A and B (unmerged), the LM head
    torch.testing.assert_close(got, want, atol=1e-6, rtol=0)
    torch.testing.assert_close(fp32_free, want, atol=0, rtol=0)
    with torch.no_grad():
        fp32 = completion_token_log_probs(model, batch)
    assert float((fp32 - want).abs().max()) > 1e-4  # bf16 is another function: the comparison above can fail


def test_weights_prepacked_for_sampling_compute_the_same_function(tiny_model_dir: Path, monkeypatch) -> None:
    """With ``prepack_rows`` (sampling) the bf16 copies are also reordered for oneDNN where the CPU has native bf16:
    the same bf16 products, in another summation order; elsewhere the block falls back to the plain copies."""
    import fdpg.cast_linears as cast_linears

    model, batch, linears = _setup(tiny_model_dir)
    packable = bf16_prepacking_available(torch.device("cpu"), torch.bfloat16)
    with torch.no_grad(), torch.autocast(**BF16):
        want = completion_token_log_probs(model, batch)
        with cast_once_linears(model, prepack_rows=len(batch)) as patched:
            prepacked = [getattr(m.forward, "prepacked", False) for m in model.modules() if "forward" in vars(m)]
            got = completion_token_log_probs(model, batch)
        monkeypatch.setattr(cast_linears, "bf16_prepacking_available", lambda *_: False)
        with cast_once_linears(model, prepack_rows=len(batch)):
            fallback = completion_token_log_probs(model, batch)
            fallback_prepacked = [getattr(m.forward, "prepacked", False) for m in model.modules()
                                  if "forward" in vars(m)]
    assert patched == linears and prepacked == [packable] * linears and not any(fallback_prepacked)
    # Two summation orders may round a bf16 output an ulp apart (2^-8 relative); on this model they agree (0.0).
    torch.testing.assert_close(got, want, atol=1e-3, rtol=0)
    torch.testing.assert_close(fallback, want, atol=1e-6, rtol=0)


def test_the_weights_are_cast_on_entry_and_restored_on_exit(tiny_model_dir: Path) -> None:
    model, batch, _ = _setup(tiny_model_dir)
    layer = model.get_base_model().model.layers[0].mlp.down_proj.base_layer
    saved = layer.weight.detach().clone()
    with torch.no_grad(), torch.autocast(**BF16):
        before = completion_token_log_probs(model, batch)
        with cast_once_linears(model):
            layer.weight.zero_()  # the block multiplies by its copy, made on entry
            inside = completion_token_log_probs(model, batch)
            with cast_once_linears(model) as nested:  # an inner block leaves them to the outer one
                assert nested == 0
        after = completion_token_log_probs(model, batch)  # autocast's own cast of the zeroed weight
        layer.weight.copy_(saved)
    torch.testing.assert_close(inside, before, atol=1e-6, rtol=0)
    assert not torch.allclose(after, before)
    assert not any("forward" in vars(m) for m in model.modules())


def test_nothing_is_patched_with_gradients_or_without_autocast(tiny_model_dir: Path) -> None:
    model, _, _ = _setup(tiny_model_dir)
    with torch.autocast(**BF16), cast_once_linears(model) as with_grad:
        pass
    with torch.no_grad(), cast_once_linears(model) as without_autocast:
        pass
    assert with_grad == without_autocast == 0


def test_onednn_linears_under_autocast_casts_once_instead(tiny_model_dir: Path) -> None:
    model, batch, linears = _setup(tiny_model_dir)
    with torch.no_grad(), torch.autocast(**BF16), onednn_linears(model, prepack_rows=4) as patched:
        assert patched == linears


def test_bf16_samples_record_the_log_q_of_the_bf16_training_forward(tiny_model_dir: Path, tmp_path: Path) -> None:
    """--mixed_precision bf16 --bf16_sampling autocast: the log q recorded while sampling (weights cast once,
    KV-cached decode) is the training forward's log pi (autocast, gradients on) over the same tokens, to bf16's
    summation-order rounding, and much closer to it than the fp32 policy is."""
    import warnings

    from fdpg_testing import build_trainer

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # bf16 on a CPU without native bf16
        trainer = build_trainer(tiny_model_dir, tmp_path, mixed_precision="bf16", bf16_sampling="autocast", lora_r=4,
                                batch_size=16, generation_batch_size=8, max_new_tokens=12)
    batch = trainer.sample(0)
    mask = batch.completion_mask
    with trainer.accelerator.autocast():
        bf16 = completion_token_log_probs(trainer.model, batch).detach()
    fp32 = completion_token_log_probs(trainer.model, batch).detach()
    gap = ((batch.token_log_q - bf16) * mask).abs()
    fp32_gap = ((batch.token_log_q - fp32) * mask).abs()
    assert float(gap.max()) < 2e-2 and float(gap.sum(-1).max()) < 5e-2, (gap.max(), gap.sum(-1))
    assert float(fp32_gap.sum(-1).mean()) > 3 * float(gap.sum(-1).mean())


def _forward_backward(model, batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The training pass under bf16 autocast: per-token log pi, and the gradient of their sum for what trains."""
    model.zero_grad(set_to_none=True)
    with torch.autocast(**BF16):
        values = completion_token_log_probs(model, batch)
    values.sum().backward()
    return values.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def test_frozen_weights_cast_once_give_autocasts_training_pass_and_gradient(tiny_model_dir: Path) -> None:
    """The training forward inside cast_frozen_linears (frozen base layers and LM head cast once, the adapter left to
    autocast) computes autocast's log pi and the same adapter gradient; outside autocast, the fp32 pass."""
    model, batch, _ = _setup(tiny_model_dir)
    frozen = sum(type(m) is torch.nn.Linear and not m.weight.requires_grad for m in model.modules())
    want, want_grads = _forward_backward(model, batch)
    with cast_frozen_linears(model, torch.bfloat16) as patched:
        got, got_grads = _forward_backward(model, batch)
        head = model.get_output_embeddings()
        with torch.autocast(**BF16):  # the fused head multiplies by the block's copy
            assert frozen_product_weights(head)[0] is vars(head)["forward"].cast[0]
            assert frozen_product_weights(head)[0].dtype == torch.bfloat16
        assert frozen_product_weights(head)[0] is head.weight  # outside autocast: the fp32 weight
        with torch.no_grad():
            fp32_inside = completion_token_log_probs(model, batch)
    with torch.no_grad():
        fp32 = completion_token_log_probs(model, batch)
    assert patched == frozen > 0 and not any("forward" in vars(m) for m in model.modules())
    torch.testing.assert_close(got, want, atol=1e-6, rtol=0)
    assert want_grads.keys() == got_grads.keys() and len(want_grads) > 0
    for name, grad in want_grads.items():
        torch.testing.assert_close(got_grads[name], grad, atol=1e-6, rtol=1e-5, msg=name)
    torch.testing.assert_close(fp32_inside, fp32, atol=0, rtol=0)
    assert float((fp32 - want).abs().max()) > 1e-4  # bf16 is another function: the comparisons can fail


def test_frozen_weights_are_cast_on_entry_and_trainable_ones_are_left_to_autocast(tiny_model_dir: Path) -> None:
    model, batch, _ = _setup(tiny_model_dir)
    base = model.get_base_model().model.layers[0].mlp.down_proj
    saved = base.base_layer.weight.detach().clone()
    with torch.no_grad(), torch.autocast(**BF16):
        before = completion_token_log_probs(model, batch)
    with cast_frozen_linears(model, torch.bfloat16), torch.no_grad():
        base.base_layer.weight.zero_()  # frozen: the block multiplies by its copy, made on entry
        with torch.autocast(**BF16):
            inside = completion_token_log_probs(model, batch)
        base.base_layer.weight.copy_(saved)
        base.lora_B["default"].weight.mul_(0)  # trainable: autocast's cast, at each call
        with torch.autocast(**BF16):
            without_adapter = completion_token_log_probs(model, batch)
    torch.testing.assert_close(inside, before, atol=1e-6, rtol=0)
    assert not torch.allclose(without_adapter, before)
    with cast_frozen_linears(model, None) as none, cast_frozen_linears(model, torch.float32) as fp32:
        assert none == fp32 == 0


def test_a_frozen_weight_is_cast_once_for_as_long_as_it_is_unchanged() -> None:
    from fdpg.cast_linears import frozen_cast

    frozen = torch.randn(4, 3)
    with torch.inference_mode():  # made in the reference pass, reused by the training pass below
        first = frozen_cast(frozen, torch.bfloat16)
    assert frozen_cast(frozen, torch.bfloat16) is first and torch.equal(first, frozen.to(torch.bfloat16))
    x = torch.randn(2, 3, requires_grad=True)
    (x.to(torch.bfloat16) @ first.t()).sum().backward()  # a plain tensor, usable under autograd
    with torch.no_grad():
        frozen.mul_(2)  # changed in place: cast again
    again = frozen_cast(frozen, torch.bfloat16)
    assert again is not first and torch.equal(again, frozen.to(torch.bfloat16))
    trained = torch.randn(4, 3, requires_grad=True)
    assert frozen_cast(trained, torch.bfloat16) is not frozen_cast(trained, torch.bfloat16)
