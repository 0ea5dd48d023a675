"""The policy's activation checkpointing: layers recomputed in backward, the same gradient, dropout still off."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from fdpg_testing import nonzero_lora_policy

from fdpg.config import TrainConfig
from fdpg.log_probs import completion_token_log_probs
from fdpg.sampling import sample_completions


def _attention_calls(policy) -> list[int]:
    """A counter per decoder layer of its attention module's forward calls (recomputes included)."""
    counts: list[int] = []
    for layer in policy.model.get_base_model().model.layers:
        counts.append(0)
        index = len(counts) - 1

        def hook(*_, index=index):
            counts[index] += 1
        layer.self_attn.register_forward_hook(hook)
    return counts


def _gradients(policy, batch) -> dict[str, torch.Tensor]:
    policy.model.zero_grad(set_to_none=True)
    completion_token_log_probs(policy.model, batch).sum().backward()
    return {name: p.grad.clone() for name, p in policy.trainable_parameters().items()}


@pytest.mark.parametrize(("every", "recomputed"), [(1, [1, 1]), (2, [1, 0])])
def test_checkpointed_layers_are_recomputed_in_backward_with_the_same_gradient(tiny_model_dir: Path, every: int,
                                                                              recomputed: list[int]) -> None:
    plain, checkpointed = nonzero_lora_policy(tiny_model_dir), nonzero_lora_policy(tiny_model_dir)
    checkpointed.checkpoint_activations(every)
    batch = sample_completions(plain.model, plain.tokenizer, ["ab", "b c", "cab"], 8, seed=3)
    want = _gradients(plain, batch)
    calls = _attention_calls(checkpointed)
    got = _gradients(checkpointed, batch)
    assert calls == [1 + r for r in recomputed]  # one forward, plus the recompute of each checkpointed layer
    for name in want:
        torch.testing.assert_close(got[name], want[name], atol=1e-6, rtol=1e-5)
    assert max(float(g.abs().max()) for g in want.values()) > 1e-3

    # Passes without gradients run each layer once (no checkpointing), and every other module stays in eval mode.
    calls[:] = [0] * len(calls)
    with torch.no_grad():
        completion_token_log_probs(checkpointed.model, batch)
    assert calls == [1] * len(calls)
    layers = set(checkpointed.model.get_base_model().model.layers)
    assert not any(m.training for m in checkpointed.model.modules() if m not in layers)


def test_a_negative_checkpointing_interval_is_refused() -> None:
    with pytest.raises(ValueError, match=r"--activation_checkpointing must be a non-negative integer"):
        TrainConfig(activation_checkpointing=-1)
