"""oneDNN linears for no-grad passes: the same function (plain and LoRA-merged layers), restored on exit."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from fdpg_testing import nonzero_lora_policy

from fdpg.models import load_causal_lm, load_tokenizer
from fdpg.onednn_linears import onednn_linears, onednn_packing_available
from fdpg.sampling import encode_prompts

pytestmark = pytest.mark.skipif(not onednn_packing_available(), reason="this torch build has no oneDNN linear ops")

PROMPTS = ["hello world, this is long", "a", "", "the cat sat"]
MODEL_DIRS = ["tiny_model_dir", "tiny_gpt2_dir"]
PREPACK = [4, None]  # sampling's prepacked weights (4 rows), the reference pass's weights as they are


def _logits(model: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return model(input_ids=ids, attention_mask=mask).logits


def _patched(model: torch.nn.Module) -> list[str]:
    return [name for name, m in model.named_modules() if "forward" in vars(m)]


@pytest.mark.parametrize("prepack_rows", PREPACK)
@pytest.mark.parametrize("fixture", MODEL_DIRS)
def test_onednn_model_gives_the_same_logits_and_is_restored(fixture: str, prepack_rows: int | None,
                                                            request: pytest.FixtureRequest) -> None:
    directory = request.getfixturevalue(fixture)
    model, tokenizer = load_causal_lm(str(directory)), load_tokenizer(str(directory))
    ids, mask = encode_prompts(tokenizer, PROMPTS)
    plain = _logits(model, ids, mask)
    with torch.inference_mode(), onednn_linears(model, prepack_rows) as packed:
        linears = [m for m in model.modules() if type(m) is torch.nn.Linear]
        assert packed == len(linears) > 0  # Llama: every projection and the head; GPT-2 (Conv1D): the head
        fast = _logits(model, ids, mask)
    assert _patched(model) == []
    torch.testing.assert_close(fast, plain, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(_logits(model, ids, mask), plain, atol=0, rtol=0)


@pytest.mark.parametrize("prepack_rows", PREPACK)
@pytest.mark.parametrize("fixture", MODEL_DIRS)
def test_lora_layers_are_merged_and_the_adapter_is_untouched(fixture: str, prepack_rows: int | None,
                                                             request: pytest.FixtureRequest) -> None:
    policy = nonzero_lora_policy(request.getfixturevalue(fixture))
    model = policy.model
    ids, mask = encode_prompts(policy.tokenizer, PROMPTS)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    with_adapter = _logits(model, ids, mask)
    with policy.reference() as reference:
        base = _logits(reference, ids, mask)
    assert (with_adapter - base).abs().max() > 1e-3  # the adapter matters

    with torch.inference_mode(), onednn_linears(model, prepack_rows) as packed:
        assert packed > 0
        lora_layers = [name for name, m in model.named_modules() if hasattr(m, "lora_A")]
        patched = _patched(model)
        if fixture == "tiny_model_dir":  # nn.Linear bases: each LoRA layer is one merged product
            assert set(lora_layers) <= set(patched)
            assert not any("lora_" in name or name.endswith("base_layer") for name in patched)
        else:  # GPT-2's Conv1D bases are not nn.Linear: its LoRA layers stay peft's
            assert not set(lora_layers) & set(patched)
        merged = _logits(model, ids, mask)
    torch.testing.assert_close(merged, with_adapter, atol=1e-5, rtol=1e-5)

    with policy.reference() as reference, torch.inference_mode(), onednn_linears(reference, prepack_rows):
        assert not any(name in _patched(reference) for name in lora_layers)  # disabled adapters: not merged
        torch.testing.assert_close(_logits(reference, ids, mask), base, atol=1e-5, rtol=1e-5)

    assert _patched(model) == []
    for name, p in model.named_parameters():
        assert torch.equal(p, before[name]), name


def test_lora_with_live_dropout_patches_only_the_base_layers(tiny_model_dir: Path) -> None:
    policy = nonzero_lora_policy(tiny_model_dir, dropout=0.5)
    model = policy.model.train()
    with torch.inference_mode(), onednn_linears(model, prepack_rows=4):
        patched = _patched(model)
        lora_layers = [name for name, m in model.named_modules() if hasattr(m, "lora_A")]
        assert lora_layers and not set(lora_layers) & set(patched)
        assert {f"{name}.base_layer" for name in lora_layers} <= set(patched)
        assert not any("lora_" in name for name in patched)
    model.eval()  # dropout off: the LoRA layers can be merged again
    with torch.inference_mode(), onednn_linears(model, prepack_rows=4):
        assert set(lora_layers) <= set(_patched(model))


def test_hooked_layers_and_grad_mode_are_left_alone_autocast_casts_instead(tiny_model_dir: Path) -> None:
    model = load_causal_lm(str(tiny_model_dir))
    head = model.get_output_embeddings()
    handle = head.register_forward_hook(lambda module, inputs, output: output)
    try:
        with torch.inference_mode(), onednn_linears(model, prepack_rows=4) as packed:
            assert packed > 0 and "forward" not in vars(head)
    finally:
        handle.remove()
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16), onednn_linears(model, 4) as cast:
        # bf16 autocast: no oneDNN packing; every linear casts its weight once instead (test_cast_linears.py)
        assert cast == sum(type(m) is torch.nn.Linear for m in model.modules())
    with onednn_linears(model, prepack_rows=4) as packed:
        assert packed == 0 and _patched(model) == []  # gradients enabled: the oneDNN op has no backward


def test_nested_blocks_reuse_the_enclosing_packing(tiny_model_dir: Path) -> None:
    """An inner block (sample_completions inside the trainer's chunk loop) patches nothing more, undoes nothing."""
    policy = nonzero_lora_policy(tiny_model_dir)
    model = policy.model
    ids, mask = encode_prompts(policy.tokenizer, PROMPTS)
    want = _logits(model, ids, mask)
    with torch.inference_mode(), onednn_linears(model, prepack_rows=4) as outer:
        patched = _patched(model)
        assert outer == len(patched) > 0
        with onednn_linears(model, prepack_rows=4) as inner:
            assert inner == 0 and _patched(model) == patched  # no merged layer's base_layer packed again
            torch.testing.assert_close(_logits(model, ids, mask), want, atol=1e-5, rtol=1e-5)
        assert _patched(model) == patched
    assert _patched(model) == []
