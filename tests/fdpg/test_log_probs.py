"""Log-probabilities of completions: the fused head (no [N, V] logits) equals the plain logits path, values and
gradients, and falls back to the logits path whenever the head is not a frozen plain ``W h + c``."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from fdpg_testing import nonzero_lora_policy

from fdpg import log_probs as lp
from fdpg.models import load_causal_lm, load_tokenizer
from fdpg.policy import Policy
from fdpg.sampling import SampleBatch, sample_completions

PROMPTS = ["hello world, this is long", "a", "", "the cat sat"]
MODEL_DIRS = ["tiny_model_dir", "tiny_gpt2_dir"]


def _logits_path(model: torch.nn.Module, batch: SampleBatch) -> torch.Tensor:
    """The reference computation: the model's own full logits, log-softmax, gather, mask."""
    input_ids = torch.cat([batch.prompt_ids, batch.completion_ids], 1)
    attention = torch.cat([batch.prompt_mask, batch.completion_mask], 1)
    logits = model(input_ids=input_ids, attention_mask=attention,
                   position_ids=(attention.cumsum(-1) - 1).clamp(min=0), use_cache=False).logits
    t = batch.completion_ids.shape[1]
    log_probs = torch.log_softmax(logits[:, -t - 1:-1].float(), -1)
    return log_probs.gather(-1, batch.completion_ids.unsqueeze(-1)).squeeze(-1) * batch.completion_mask


def _batch(policy: Policy) -> SampleBatch:
    return sample_completions(policy.model, policy.tokenizer, PROMPTS * 2, max_new_tokens=10, seed=3)


@pytest.mark.parametrize("fixture", MODEL_DIRS)
def test_fused_head_matches_logits_path_values_and_lora_gradients(fixture: str,
                                                                   request: pytest.FixtureRequest) -> None:
    policy = nonzero_lora_policy(request.getfixturevalue(fixture))
    model = policy.model
    batch = _batch(policy)
    assert lp._fusable_head(model) is not None
    weights = torch.randn(len(batch))

    def grads(fn) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        model.zero_grad(set_to_none=True)
        values = fn(model, batch)
        (values.sum(-1) * weights).sum().backward()
        return values.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    fused, fused_grads = grads(lp.completion_token_log_probs)
    plain, plain_grads = grads(_logits_path)
    assert lp._HEAD_CHECKED[model.get_output_embeddings()] is True  # the fused path really ran
    torch.testing.assert_close(fused, plain, atol=1e-5, rtol=1e-5)
    assert bool((fused[~batch.completion_mask.bool()] == 0).all())
    assert set(fused_grads) == set(plain_grads) and fused_grads
    for name in plain_grads:
        torch.testing.assert_close(fused_grads[name], plain_grads[name], atol=1e-5, rtol=1e-4, msg=name)
    # With the adapter disabled the same function gives the reference's log-probabilities.
    with torch.inference_mode(), policy.reference(model) as reference:
        ref = lp.completion_token_log_probs(reference, batch)
        torch.testing.assert_close(ref, _logits_path(reference, batch), atol=1e-5, rtol=1e-5)
    assert float((ref - fused).abs().max()) > 1e-3


def test_linear_token_log_prob_gradcheck_across_chunks(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(lp, "CHUNK_ROWS", 3)  # 7 rows: chunks of 3, 3 and 1
    hidden = torch.randn(7, 5, dtype=torch.float64, requires_grad=True)
    weight, bias = torch.randn(11, 5, dtype=torch.float64), torch.randn(11, dtype=torch.float64)
    tokens = torch.randint(0, 11, (7,))
    expected = torch.log_softmax(F.linear(hidden, weight, bias), -1).gather(-1, tokens[:, None]).squeeze(-1)
    got = lp.LinearTokenLogProb.apply(hidden, weight, bias, tokens)
    torch.testing.assert_close(got, expected)
    assert torch.autograd.gradcheck(lambda h: lp.LinearTokenLogProb.apply(h, weight, bias, tokens), (hidden,))


def test_token_log_prob_gradient_matches_autograd() -> None:
    logits = torch.randn(2, 3, 7, dtype=torch.float64, requires_grad=True)
    tokens = torch.randint(0, 7, (2, 3))
    assert torch.autograd.gradcheck(lambda x: lp.TokenLogProb.apply(x, tokens), (logits,))
    reference = torch.log_softmax(logits, -1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    torch.testing.assert_close(lp.TokenLogProb.apply(logits, tokens), reference)


def test_hooked_or_trainable_head_uses_the_logits_path(tiny_model_dir: Path) -> None:
    model, tokenizer = load_causal_lm(str(tiny_model_dir)), load_tokenizer(str(tiny_model_dir))
    batch = sample_completions(model, tokenizer, PROMPTS, max_new_tokens=6, seed=1)
    assert lp._fusable_head(model) is None  # full fine-tuning: the head is trainable
    head = model.get_output_embeddings()
    head.weight.requires_grad_(False)
    assert lp._fusable_head(model) is head
    handle = head.register_forward_hook(lambda module, inputs, output: output + 1.0 * (output > 0))
    try:
        assert lp._fusable_head(model) is None
        with torch.no_grad():
            torch.testing.assert_close(lp.completion_token_log_probs(model, batch), _logits_path(model, batch))
    finally:
        handle.remove()


def test_model_whose_logits_are_not_the_head_of_the_last_hidden_state_falls_back(tiny_model_dir: Path) -> None:
    """A model that transforms its logits inside ``forward`` (soft-capping here) is detected on the first call."""
    model = load_causal_lm(str(tiny_model_dir))
    tokenizer = load_tokenizer(str(tiny_model_dir))
    model.get_output_embeddings().weight.requires_grad_(False)
    forward = model.forward

    def capped_forward(*args, **kwargs):
        out = forward(*args, **kwargs)
        out.logits = 2.0 * torch.tanh(out.logits / 2.0)
        return out

    model.forward = capped_forward
    batch = sample_completions(model, tokenizer, PROMPTS, max_new_tokens=6, seed=2)
    with torch.no_grad():
        got = lp.completion_token_log_probs(model, batch)
        torch.testing.assert_close(got, _logits_path(model, batch))
    assert lp._HEAD_CHECKED[model.get_output_embeddings()] is False
    assert lp._fusable_head(model) is None
