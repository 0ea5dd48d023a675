"""Sampling: the recorded log-probabilities are those of the model, masks end at the first EOS, seeds work."""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from fdpg_testing import nonzero_lora_policy

from fdpg import sampling
from fdpg.log_probs import completion_token_log_probs
from fdpg.models import load_causal_lm, load_tokenizer
from fdpg.onednn_linears import onednn_packing_available
from fdpg.sampling import (
    SampleBatch,
    completion_mask_from_eos,
    draw_by_inverse_cdf,
    encode_prompts,
    sample_completions,
)

# Prompts of different lengths (left padding differs per row), including an empty one (BOS only).
PROMPTS = ["hello world, this is long", "a", "", "the cat sat"]
MODEL_DIRS = ["tiny_model_dir", "tiny_gpt2_dir"]


def _load(request: pytest.FixtureRequest, fixture: str):
    directory: Path = request.getfixturevalue(fixture)
    return load_causal_lm(str(directory)), load_tokenizer(str(directory))


def _boost_eos(model: torch.nn.Module, eos_id: int, boost: float = 3.0):
    """Add ``boost`` to the EOS logit (a hook on the LM head, so generate and forward both see it)."""

    def hook(module, inputs, output):
        output = output.clone()
        output[..., eos_id] += boost
        return output

    return model.get_output_embeddings().register_forward_hook(hook)


def _forward_log_probs(model, batch: SampleBatch) -> torch.Tensor:
    with torch.no_grad():
        return completion_token_log_probs(model, batch)


@pytest.mark.parametrize("fixture", MODEL_DIRS)
def test_recorded_log_pi_matches_forward_pass(fixture: str, request: pytest.FixtureRequest) -> None:
    model, tokenizer = _load(request, fixture)
    handle = _boost_eos(model, tokenizer.eos_token_id)  # some completions end early: masks are exercised
    try:
        batch = sample_completions(model, tokenizer, PROMPTS * 2, max_new_tokens=12, seed=7)
        recomputed = _forward_log_probs(model, batch)
    finally:
        handle.remove()
    assert batch.prompt_mask[:, 0].tolist().count(0) >= 3  # left padding really happened
    assert batch.token_log_pi.shape == batch.completion_ids.shape == recomputed.shape
    torch.testing.assert_close(batch.token_log_pi, recomputed, atol=1e-4, rtol=0)
    torch.testing.assert_close(batch.token_log_q, batch.token_log_pi)  # pure sampling: q = pi
    assert bool((batch.token_log_pi[batch.completion_mask.bool()] < 0).all())
    assert bool((batch.token_log_pi[~batch.completion_mask.bool()] == 0).all())
    lengths = batch.lengths.tolist()
    assert min(lengths) < 12, "expected some completion to stop at EOS (boosted EOS logit)"


@pytest.mark.parametrize("fixture", MODEL_DIRS)
def test_completion_mask_covers_up_to_first_eos(fixture: str, request: pytest.FixtureRequest) -> None:
    model, tokenizer = _load(request, fixture)
    eos = tokenizer.eos_token_id
    handle = _boost_eos(model, eos)
    try:
        batch = sample_completions(model, tokenizer, PROMPTS * 2, max_new_tokens=12, seed=3)
    finally:
        handle.remove()
    ended = 0
    for ids, mask, text in zip(batch.completion_ids.tolist(), batch.completion_mask.tolist(), batch.texts):
        n = sum(mask)
        assert mask == [1] * n + [0] * (len(mask) - n)  # a prefix
        if eos in ids:
            ended += 1
            assert n == ids.index(eos) + 1  # up to and including the first EOS
        else:
            assert n == len(ids)
        kept = [i for i in ids[:n] if i != eos]
        assert text == tokenizer.decode(kept, skip_special_tokens=True)  # nothing after EOS in the text
    assert ended >= 2


def test_completion_mask_from_eos_with_several_eos_ids() -> None:
    ids = torch.tensor([[5, 6, 2, 7, 2], [5, 9, 6, 7, 8], [3, 5, 2, 2, 9], [2, 0, 0, 0, 0]])
    mask = completion_mask_from_eos(ids, [2, 3])
    assert mask.tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0], [1, 0, 0, 0, 0]]


def test_encode_prompts_left_pads_and_uses_bos_for_empty(tiny_tokenizer) -> None:
    ids, mask = encode_prompts(tiny_tokenizer, ["abc", ""])
    assert ids.tolist() == [tiny_tokenizer("abc")["input_ids"],
                            [tiny_tokenizer.pad_token_id] * 2 + [tiny_tokenizer.bos_token_id]]
    assert mask.tolist() == [[1, 1, 1], [0, 0, 1]]


def test_same_seed_same_samples_other_seed_differs(tiny_model_dir: Path) -> None:
    model, tokenizer = load_causal_lm(str(tiny_model_dir)), load_tokenizer(str(tiny_model_dir))
    a = sample_completions(model, tokenizer, PROMPTS, max_new_tokens=10, seed=11)
    torch.manual_seed(999)  # the global RNG state must not matter
    b = sample_completions(model, tokenizer, PROMPTS, max_new_tokens=10, seed=11)
    c = sample_completions(model, tokenizer, PROMPTS, max_new_tokens=10, seed=12)
    assert torch.equal(a.completion_ids, b.completion_ids) and a.texts == b.texts
    torch.testing.assert_close(a.token_log_pi, b.token_log_pi, atol=0, rtol=0)
    assert a.texts != c.texts


def test_sampling_does_not_touch_the_global_rng(tiny_model_dir: Path) -> None:
    model, tokenizer = load_causal_lm(str(tiny_model_dir)), load_tokenizer(str(tiny_model_dir))
    torch.manual_seed(5)
    expected = torch.rand(3)
    torch.manual_seed(5)
    sample_completions(model, tokenizer, PROMPTS, max_new_tokens=4, seed=1)
    assert torch.equal(torch.rand(3), expected)


def test_concat_and_slice_preserve_log_probs(tiny_model_dir: Path) -> None:
    model, tokenizer = load_causal_lm(str(tiny_model_dir)), load_tokenizer(str(tiny_model_dir))
    handle = _boost_eos(model, tokenizer.eos_token_id)
    try:
        first = sample_completions(model, tokenizer, ["a", "bb"], max_new_tokens=6, seed=1)
        second = sample_completions(model, tokenizer, ["a much longer prompt", ""], max_new_tokens=12, seed=2)
        both = SampleBatch.concat([first, second], tokenizer.pad_token_id)
        assert len(both) == 4 and both.texts == first.texts + second.texts
        assert both.prompts == ["a", "bb", "a much longer prompt", ""]
        torch.testing.assert_close(both.log_pi, torch.cat([first.log_pi, second.log_pi]), atol=0, rtol=0)
        torch.testing.assert_close(both.log_q, torch.cat([first.log_q, second.log_q]), atol=0, rtol=0)
        # The re-padded batch still describes the same sequences: the forward pass agrees.
        torch.testing.assert_close(_forward_log_probs(model, both), both.token_log_pi, atol=1e-4, rtol=0)

        for start, stop in [(0, 2), (1, 3), (2, 4), (3, 4)]:
            part = both.slice(start, stop)
            assert part.texts == both.texts[start:stop] and part.prompts == both.prompts[start:stop]
            torch.testing.assert_close(part.log_pi, both.log_pi[start:stop], atol=0, rtol=0)
            assert part.completion_ids.shape[1] == max(int(part.lengths.max()), 1)  # trimmed
            assert bool(part.prompt_mask[:, 0].any())  # no all-padding prompt column left
            torch.testing.assert_close(_forward_log_probs(model, part), part.token_log_pi, atol=1e-4, rtol=0)
    finally:
        handle.remove()


@pytest.mark.parametrize("fixture", MODEL_DIRS)
def test_temperature_records_the_proposal_log_q(fixture: str, request: pytest.FixtureRequest) -> None:
    model, tokenizer = _load(request, fixture)
    batch = sample_completions(model, tokenizer, PROMPTS, max_new_tokens=10, seed=4, temperature=0.7)
    mask = batch.completion_mask.bool()
    assert float((batch.token_log_q - batch.token_log_pi)[mask].abs().max()) > 1e-2

    input_ids = torch.cat([batch.prompt_ids, batch.completion_ids], 1)
    attention = torch.cat([batch.prompt_mask, batch.completion_mask], 1)
    with torch.no_grad():
        logits = model(input_ids=input_ids, attention_mask=attention,
                       position_ids=(attention.cumsum(-1) - 1).clamp(min=0)).logits
    t = batch.completion_ids.shape[1]
    step_logits = logits[:, -t - 1:-1].float()
    tokens = batch.completion_ids.unsqueeze(-1)
    log_q = torch.log_softmax(step_logits / 0.7, -1).gather(-1, tokens).squeeze(-1) * mask
    log_pi = torch.log_softmax(step_logits, -1).gather(-1, tokens).squeeze(-1) * mask
    torch.testing.assert_close(batch.token_log_q, log_q, atol=1e-4, rtol=0)
    torch.testing.assert_close(batch.token_log_pi, log_pi, atol=1e-4, rtol=0)


@pytest.mark.parametrize("fixture", MODEL_DIRS)
def test_log_pi_recorded_through_packed_lora_layers_matches_the_forward_pass(
    fixture: str, request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Sampling runs on oneDNN packed (LoRA-merged) layers; the training pass (MKL, peft) sees the same log pi."""
    policy = nonzero_lora_policy(request.getfixturevalue(fixture))
    packed_counts, pack = [], sampling.onednn_linears

    @contextmanager
    def counting(model, prepack_rows):
        with pack(model, prepack_rows) as n:
            packed_counts.append(n)
            yield n

    monkeypatch.setattr(sampling, "onednn_linears", counting)
    batch = sample_completions(policy.model, policy.tokenizer, PROMPTS * 2, max_new_tokens=12, seed=3)
    assert len(packed_counts) == 1 and (packed_counts[0] > 0 or not onednn_packing_available())
    torch.testing.assert_close(batch.token_log_pi, _forward_log_probs(policy.model, batch), atol=1e-4, rtol=0)


def _flat_inverse_cdf(probs: torch.Tensor) -> torch.Tensor:
    """The one-level definition: one float64 cumulative sum over the whole row."""
    cdf = torch.cumsum(probs, -1, dtype=torch.float64)
    u = torch.rand(cdf.shape[0], 1, dtype=torch.float64) * cdf[:, -1:]
    return torch.searchsorted(cdf, u, right=True).clamp_(max=cdf.shape[-1] - 1).squeeze(-1)


@pytest.mark.parametrize("vocab", [1000, 1024, 49152])
def test_two_level_draw_finds_the_flat_inverse_cdf_index(vocab: int) -> None:
    """Same uniforms, same index as one cumulative sum; zero-probability indices (a top-p cut) never drawn."""
    gen = torch.Generator().manual_seed(vocab)
    probs = torch.softmax(torch.randn(64, vocab, generator=gen) * 4, -1)
    probs[:32] *= torch.rand(32, vocab, generator=gen) > 0.7  # many zeros, rows not normalised
    torch.manual_seed(1)
    flat = _flat_inverse_cdf(probs)
    torch.manual_seed(1)
    two_level = draw_by_inverse_cdf(probs, block=256)
    assert torch.equal(two_level, flat)
    assert bool((probs.gather(-1, two_level[:, None]) > 0).all())


def test_two_level_draw_has_the_exact_distribution() -> None:
    """Frequencies of 200k draws from an enumerable 5-token distribution (blocks of 2) within 5 sigma."""
    p = torch.tensor([0.1, 0.0, 0.45, 0.05, 0.4], dtype=torch.float64)
    torch.manual_seed(0)
    draws = draw_by_inverse_cdf(p.float().expand(200_000, 5), block=2)
    freq = torch.bincount(draws, minlength=5).double() / draws.numel()
    sigma = (p * (1 - p) / draws.numel()).sqrt()
    assert freq[1] == 0
    assert bool(((freq - p).abs() <= 5 * sigma + 1e-12).all()), freq
