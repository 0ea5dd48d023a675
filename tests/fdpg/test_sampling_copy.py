r"""The bf16 sampling copy (``--bf16_sampling copy``): its weights are the policy's, LoRA merged, rounded once to
bf16; only what changed is copied again; its samples record the copy's own log-probabilities."""

from __future__ import annotations

import warnings

import pytest
import torch

from fdpg.cast_linears import bf16_prepacking_available
from fdpg.log_probs import completion_token_log_probs
from fdpg.sampling_copy import lora_layers

needs_packing = pytest.mark.skipif(not bf16_prepacking_available(torch.device("cpu"), torch.bfloat16),
                                   reason="the copy is used where oneDNN prepacks bf16 (a CPU with native bf16)")


def bf16_trainer(make_trainer, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # bf16 on a CPU where it is slow
        return make_trainer(mixed_precision="bf16", lora_r=4, max_new_tokens=8, **kwargs)


@needs_packing
def test_the_copy_holds_the_merged_lora_weights_and_refreshes_only_what_changed(make_trainer) -> None:
    trainer = bf16_trainer(make_trainer)
    trainer.train_step(0)  # B != 0 from here on
    copy = trainer.sampling_copy
    assert copy is not None
    model = trainer._unwrapped()
    adapted = lora_layers(model)
    assert adapted
    with torch.no_grad():
        layer = next(iter(adapted.values()))
        assert float((layer.lora_B[layer.active_adapters[0]].weight).abs().max()) > 0
    sampler = copy.refreshed(model)
    assert copy.last_refreshed == len(adapted)  # the step's update changed the adapters only, after it sampled
    assert copy.refreshed(model) is sampler and copy.last_refreshed == 0  # nothing changed since
    targets = dict(sampler.named_modules())
    for name, layer in adapted.items():
        a = layer.active_adapters[0]  # W' = bf16(W + s B A), written out here
        update = layer.scaling[a] * layer.lora_B[a].weight @ layer.lora_A[a].weight
        expected = (layer.get_base_layer().weight + update).detach().to(torch.bfloat16)
        packed = targets[name].forward
        assert packed.prepacked and torch.equal(packed.weights[0], expected), name
        x = torch.randn(3, expected.shape[1])
        out = packed(x.to(torch.bfloat16)).float()
        assert torch.allclose(out, (x.to(torch.bfloat16) @ expected.t()).float(), atol=1e-2, rtol=1e-2), name
    frozen = [(n, p) for n, p in model.get_base_model().named_parameters() if not p.requires_grad
              and "lora_" not in n and "base_layer" not in n]
    copied = dict(sampler.named_parameters())
    for name, p in frozen:
        owner = targets[name.rsplit(".", 1)[0]]
        held = owner.forward.weights[0] if isinstance(owner, torch.nn.Linear) else copied[name]
        assert torch.equal(held, p.detach().to(torch.bfloat16)), name
    assert all(p.dtype == torch.bfloat16 for p in sampler.parameters())
    assert all(m.weight.numel() == 0 for m in sampler.modules() if isinstance(m, torch.nn.Linear))  # no 2nd copy


@needs_packing
def test_samples_from_the_copy_record_the_copys_own_log_probs(make_trainer) -> None:
    trainer = bf16_trainer(make_trainer)
    batch = trainer.sample(0)
    sampler = trainer.sampling_copy.model
    mask = batch.completion_mask.bool()
    with torch.inference_mode():
        own = completion_token_log_probs(sampler, batch)
        fp32 = completion_token_log_probs(trainer._unwrapped(), batch)
    off_own = float((batch.token_log_pi - own)[mask].abs().mean())
    off_fp32 = float((batch.token_log_pi - fp32)[mask].abs().mean())
    assert off_own < 0.5 * off_fp32, (off_own, off_fp32)


@needs_packing
def test_autocast_sampling_makes_no_copy(make_trainer) -> None:
    trainer = bf16_trainer(make_trainer, bf16_sampling="autocast")
    assert len(trainer.sample(0)) and trainer.sampling_copy is None


def test_fp32_makes_no_copy(make_trainer) -> None:
    trainer = make_trainer(lora_r=4, max_new_tokens=8)
    assert len(trainer.sample(0)) and trainer.sampling_copy is None


def test_a_bad_bf16_sampling_is_refused(make_trainer) -> None:
    with pytest.raises(ValueError, match="--bf16_sampling must be copy or autocast, got 'pure'"):
        make_trainer(bf16_sampling="pure")
