"""Fine-grained rewards: token alignment from the generated ids, dense rewards, errors, reward-to-go."""

from __future__ import annotations

import ast
import math
import os

import pytest
import torch

from objectives.errors import ObjectiveError, ScoreError
from objectives.fine_grained import (
    AlignmentError,
    Component,
    FineGrainedReward,
    reward_to_go,
    segment_end_tokens,
    token_char_ends,
)
from objectives.segments import SegmentationError

EOS = "<|endoftext|>"
MERGES = [("h", "e"), ("he", "l"), ("l", "o"), ("hel", "lo"), ("Ġ", "w"), ("Ġw", "o"), ("Ġwo", "r"),
          ("Ġwor", "l"), ("Ġworl", "d"), ("Ġ", "H"), ("ĠH", "e")]
EXTRA_TOKENS = [".Ġ"]  # ". " as one token (never produced by encoding, but the policy may sample it)


@pytest.fixture(scope="module")
def bpe():
    """A GPT-2-like byte-level BPE over the 256 byte symbols, a few merges and an EOS special token."""
    tokenizers = pytest.importorskip("tokenizers")
    from tokenizers import decoders, models, pre_tokenizers

    vocab = {symbol: i for i, symbol in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    for token in [a + b for a, b in MERGES] + EXTRA_TOKENS:
        vocab.setdefault(token, len(vocab))
    tokenizer = tokenizers.Tokenizer(models.BPE(vocab=vocab, merges=MERGES))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens([EOS])
    return tokenizer


def pieces(tokenizer, *texts: str) -> list[int]:
    """Token ids of each piece tokenised on its own, concatenated (as a policy could sample them)."""
    return [i for text in texts for i in tokenizer.encode(text).ids]


def decoder(tokenizer):
    return lambda ids: tokenizer.decode(ids, skip_special_tokens=True)


def constant(value: float):
    """A batch scorer giving every segment ``value``."""
    return lambda texts: [value] * len(texts)


def by_length(texts: list[str]) -> list[float]:
    return [float(len(t)) for t in texts]


# ----------------------------------------------------------------------------------------- alignment
def test_alignment_follows_the_generated_ids_where_retokenising_disagrees(bpe) -> None:
    ids = pieces(bpe, "hel", "lo", " world", ".")
    text = bpe.decode(ids)
    assert text == "hello world."
    assert bpe.encode(text).ids != ids  # re-tokenising merges "hel"+"lo" into one token
    assert len(bpe.encode(text).ids) == len(ids) - 1
    assert token_char_ends(ids, decoder(bpe)) == [3, 5, 11, 12]

    hello = Component("hello", lambda t: [(0, 5)] if t.startswith("hello") else [], constant(1.0))
    result = FineGrainedReward([hello])([text], [ids], decoder(bpe))
    # "hello" is complete after the policy's second token ("lo"); the re-tokenised ids would say token 0.
    assert result.dense.tolist() == [[0.0, 1.0, 0.0, 0.0]]
    assert result.segments[0][0].token_index == 1


def test_multibyte_characters_count_on_the_token_that_completes_them(bpe) -> None:
    ids = pieces(bpe, "caf", "é", " €", "😀")
    decode = decoder(bpe)
    assert len(ids) == 3 + 2 + 1 + 3 + 4  # é is 2 byte tokens, " €" is a space and 3 bytes, 😀 is 4 bytes
    assert decode(ids[:4]).endswith("\ufffd")  # the first byte of é alone decodes to a replacement char
    naive = [len(decode(ids[: k + 1])) for k in range(len(ids))]
    ends = token_char_ends(ids, decode)
    assert ends == [1, 2, 3, 3, 4, 5, 5, 5, 6, 6, 6, 6, 7]
    assert naive[3] == 4 and naive != ends  # counting the replacement char would complete é one token early
    text = decode(ids)
    assert text == "café €😀"
    # a segment ending with é maps to é's second byte; one ending with the emoji to its last byte
    assert segment_end_tokens([(0, 4), (5, 6), (6, 7)], ends) == [4, 8, 12]


def test_a_completion_cut_inside_a_character_ends_on_its_last_token(bpe) -> None:
    ids = pieces(bpe, "ok ", "😀")[:-2]  # generation stopped after 2 of the emoji's 4 bytes
    decode = decoder(bpe)
    text = decode(ids)
    assert text.endswith("\ufffd")
    ends = token_char_ends(ids, decode)
    assert ends[-1] == len(text)
    assert ends[-2] == len(text) - 1  # the dangling byte is not counted before the last token
    result = FineGrainedReward([Component("whole", "whole", constant(1.0))])([text], [ids], decode)
    assert result.segments[0][0].token_index == len(ids) - 1


def test_a_segment_ending_inside_a_token_maps_to_that_token(bpe) -> None:
    ids = pieces(bpe, "hello") + [bpe.token_to_id(".Ġ")] + pieces(bpe, "Hi", ".")
    decode = decoder(bpe)
    text = decode(ids)
    assert text == "hello. Hi."
    assert token_char_ends(ids, decode) == [5, 7, 8, 9, 10]
    result = FineGrainedReward([Component("sentence", "sentence", by_length)])([text], [ids], decode)
    assert [(s.span, s.token_index) for s in result.segments[0]] == [((0, 6), 1), ((7, 10), 4)]
    assert result.dense.tolist() == [[0.0, 6.0, 0.0, 0.0, 3.0]]


def test_char_ends_stay_monotone_when_the_decoder_revises_a_prefix() -> None:
    words = ["hello", " ", ".", " ok"]

    def decode(ids: list[int]) -> str:  # like clean_up_tokenization_spaces: " ." -> "."
        return "".join(words[i] for i in ids).replace(" .", ".")

    assert [len(decode(list(range(k + 1)))) for k in range(4)] == [5, 6, 6, 9]
    assert token_char_ends([0, 1, 2, 3], decode) == [5, 5, 6, 9]  # the space of token 1 was taken back


def test_decodes_each_prefix_once(bpe) -> None:
    calls = []
    decode = decoder(bpe)
    ids = pieces(bpe, "hello world.")
    token_char_ends(ids, lambda x: calls.append(len(x)) or decode(x))
    assert calls == list(range(1, len(ids) + 1))


def test_a_given_text_fixes_the_coordinates(bpe) -> None:
    ids = pieces(bpe, "  hel", "lo world")
    decode = decoder(bpe)
    assert decode(ids) == "  hello world"
    assert token_char_ends(ids, decode, text="hello world") == [0, 0, 3, 5, 11]  # stripped: shifted by 2
    assert token_char_ends(ids, decode, text="  hello") == [1, 2, 5, 7, 7]  # cut short: clamped
    with pytest.raises(AlignmentError, match="not the decode of its token ids"):
        token_char_ends(ids, decode, text="goodbye")
    with pytest.raises(AlignmentError, match="no token ids"):
        token_char_ends([], decode, text="x")
    assert token_char_ends([], decode) == []


def test_segment_end_tokens_rejects_spans_past_the_tokens() -> None:
    assert segment_end_tokens([(0, 0), (0, 3), (3, 4)], [2, 4, 4, 6]) == [0, 1, 1]
    with pytest.raises(AlignmentError, match=r"ends after the last token's characters \(6\)"):
        segment_end_tokens([(0, 7)], [2, 4, 6])
    with pytest.raises(AlignmentError, match="without tokens"):
        segment_end_tokens([(0, 0)], [])


# ----------------------------------------------------------------------------------------- dense rewards
TWO_SENTENCES = "Dr. Smith went to Washington. He left"


def test_dense_rewards_weights_totals_and_padding(bpe) -> None:
    decode = decoder(bpe)
    pad = bpe.token_to_id("z")  # padding that would decode to visible text if it were not masked
    rows = [pieces(bpe, TWO_SENTENCES) + [bpe.token_to_id(EOS)], pieces(bpe, "hello", " world", ".")]
    width = max(map(len, rows)) + 2
    ids = torch.tensor([row + [pad] * (width - len(row)) for row in rows])
    mask = (torch.arange(width) < torch.tensor([len(r) for r in rows]).unsqueeze(1)).long()
    texts = [decode(row) for row in rows]
    assert texts[0] == TWO_SENTENCES

    reward = FineGrainedReward([
        Component("sentence_length", "sentence", by_length, weight=2.0),
        Component("whole", "whole", constant(1.5), weight=-0.5),
    ])
    result = reward(texts, ids, decode, mask=mask)
    assert result.dense.shape == (2, width) and result.total.shape == (2,)
    torch.testing.assert_close(result.total, result.dense.sum(-1))
    torch.testing.assert_close(result.total, torch.tensor([2 * (29 + 7) - 0.75, 2 * 12 - 0.75], dtype=torch.float64))
    torch.testing.assert_close(result.component_totals["whole"], torch.tensor([-0.75, -0.75], dtype=torch.float64))
    assert bool((result.dense[mask == 0] == 0).all())
    # the EOS decodes to nothing: only the whole-text segment, which ends with the completion, sits on it
    assert float(result.dense[0, len(rows[0]) - 1]) == pytest.approx(-0.75)

    first = result.segments[0]
    assert [(s.component, s.text, s.score, s.weighted) for s in first] == [
        ("sentence_length", "Dr. Smith went to Washington.", 29.0, 58.0),
        ("sentence_length", "He left", 7.0, 14.0),
        ("whole", TWO_SENTENCES, 1.5, -0.75),
    ]
    ends = result.char_ends[0]
    for s in first[:2]:  # each sentence on the first token whose characters reach the segment's end
        assert ends[s.token_index] >= s.span[1] and (s.token_index == 0 or ends[s.token_index - 1] < s.span[1])
        assert result.dense[0, s.token_index] != 0
    # the last partial sentence ends on the last token before the EOS; the whole text on the last token, the EOS
    assert first[1].token_index == len(rows[0]) - 2 and first[2].token_index == len(rows[0]) - 1
    assert float(result.dense[0, first[1].token_index]) == pytest.approx(14.0)
    assert result.segments[1][-1].token_index == len(rows[1]) - 1  # no EOS: the last generated token
    assert result.causal


def test_increments_split_a_holistic_prefix_score_and_totals_need_no_tokens(bpe) -> None:
    """``increments``: segment j gets S(prefix_j) - S(prefix_{j-1}); the segments sum to S of the last prefix."""
    decode = decoder(bpe)
    rows = [pieces(bpe, TWO_SENTENCES), pieces(bpe, "hello", " world", ".")]
    width = max(map(len, rows))
    ids = torch.tensor([row + [0] * (width - len(row)) for row in rows])
    mask = (torch.arange(width) < torch.tensor([len(r) for r in rows]).unsqueeze(1)).long()
    texts = [decode(row) for row in rows]
    squares = lambda prefixes: [float(len(t)) ** 2 for t in prefixes]  # noqa: E731  (not additive over segments)
    reward = FineGrainedReward([Component("grow", "sentence", squares, weight=-1.0, reads="prefix", increments=True)])
    result = reward(texts, ids, decode, mask=mask)
    assert [s.score for s in result.segments[0]] == [29.0 ** 2, len(TWO_SENTENCES) ** 2 - 29.0 ** 2]
    torch.testing.assert_close(result.total, -torch.tensor([len(t) ** 2 for t in texts], dtype=torch.float64))
    torch.testing.assert_close(reward.totals(texts), result.total)
    total, parts = reward.totals_by_component(texts)  # the weighted total and each component's unweighted one
    torch.testing.assert_close(total, result.total)
    torch.testing.assert_close(parts["grow"], -result.total)
    plain = FineGrainedReward([Component("grow", "sentence", squares, weight=-1.0, reads="prefix")])
    assert float(plain.totals(texts)[0]) == -(29.0 ** 2 + len(TWO_SENTENCES) ** 2)
    with pytest.raises(ObjectiveError, match="needs reads='prefix'"):
        Component("bad", "sentence", squares, increments=True)


def test_lengths_or_no_mask_at_all(bpe) -> None:
    decode = decoder(bpe)
    ids = pieces(bpe, "He left. He came back")  # no EOS: generation hit max_new_tokens mid-sentence
    reward = FineGrainedReward([Component("s", "sentence", constant(1.0))])
    no_mask = reward(None, [ids], decode)
    assert [s.text for s in no_mask.segments[0]] == ["He left.", "He came back"]
    # the first sentence's reward is on its "." (token 7), not on the next token " He", which holds its space
    assert no_mask.segments[0][0].token_index == 7 and bpe.id_to_token(ids[8]) == "ĠHe"
    assert no_mask.segments[0][-1].token_index == len(ids) - 1
    assert float(no_mask.dense[0, -1]) == 1.0
    assert decode(ids[:7]) == "He left"
    short = reward(None, torch.tensor([ids]), decode, lengths=[7])
    assert [s.text for s in short.segments[0]] == ["He left"]
    assert short.dense[0].tolist() == [0] * 6 + [1] + [0] * (len(ids) - 7)
    with pytest.raises(AlignmentError, match="right-padded"):
        reward(None, torch.tensor([ids[:3]]), decode, mask=torch.tensor([[1, 0, 1]]))
    with pytest.raises(AlignmentError, match="disagree"):
        reward(None, torch.tensor([ids[:3]]), decode, mask=torch.tensor([[1, 1, 0]]), lengths=[3])


def test_each_scorer_is_called_once_per_batch_with_every_segment(bpe) -> None:
    decode = decoder(bpe)
    texts = ["He left. He came back.", "hello world", "One. Two. Three."]
    calls: list[list[str]] = []

    def recording(inputs: list[str]) -> list[float]:
        calls.append(list(inputs))
        return [1.0] * len(inputs)

    prefix = Component("prefix", "sentence", recording, reads="prefix")
    result = FineGrainedReward([prefix])(texts, [pieces(bpe, t) for t in texts], decode)
    assert calls == [["He left.", "He left. He came back.", "hello world", "One.", "One. Two.", "One. Two. Three."]]
    assert result.total.tolist() == [2.0, 1.0, 3.0]

    # the same segments again (the task's totals, then the per-token placement): no second call, the same scores
    reward = FineGrainedReward([prefix])
    calls.clear()
    totals = reward.totals(texts)
    placed = reward(texts, [pieces(bpe, t) for t in texts], decode)
    assert len(calls) == 1 and placed.total.tolist() == totals.tolist() == [2.0, 1.0, 3.0]
    reward.totals(texts[:2])  # other segments: scored
    assert len(calls) == 2 and calls[-1] == ["He left.", "He left. He came back.", "hello world"]


def test_scorer_errors_name_the_component(bpe) -> None:
    decode = decoder(bpe)
    texts = ["He left. He came back."]
    ids = [pieces(bpe, texts[0])]

    def run(scorer) -> None:
        FineGrainedReward([Component("fluency", "sentence", scorer)])(texts, ids, decode)

    with pytest.raises(ScoreError, match=r"'fluency'.*returned 1 scores of shape \(1,\) for 2 segments"):
        run(lambda t: [0.0])
    with pytest.raises(ScoreError, match=r"'fluency'.*shape \(2, 1\)"):
        run(lambda t: torch.zeros(len(t), 1))
    with pytest.raises(ScoreError, match=r"'fluency': score nan for segment 'He came back.' \(completion 0\)"):
        run(lambda t: [0.0, math.nan])
    with pytest.raises(ScoreError, match="'fluency'.*not finite"):
        run(lambda t: torch.tensor([math.inf, 0.0]))
    with pytest.raises(ScoreError, match="one number per segment"):
        run(lambda t: ["good", "bad"])
    with pytest.raises(SegmentationError, match="segmenter of component 'bad'"):
        FineGrainedReward([Component("bad", lambda t: [(0, 99)], constant(0.0))])(texts, ids, decode)


def test_component_and_reward_validation() -> None:
    with pytest.raises(ObjectiveError, match="weight must be a finite number"):
        Component("x", "whole", constant(0.0), weight=math.nan)
    with pytest.raises(ObjectiveError, match="reads must be 'segment' or 'prefix'"):
        Component("x", "whole", constant(0.0), reads="completion")  # type: ignore[arg-type]
    with pytest.raises(SegmentationError, match="unknown segmenter 'paragraph'"):
        Component("x", "paragraph", constant(0.0))
    with pytest.raises(ObjectiveError, match="unique"):
        FineGrainedReward([Component("x", "whole", constant(0.0))] * 2)
    reward = FineGrainedReward([Component("a", "whole", constant(0.0)),
                                Component("b", "sentence", constant(0.0), causal=False)])
    assert not reward.causal
    assert not reward(["hi"], [[1]], lambda ids: "hi" * len(ids)).causal


def test_an_empty_completion_gets_its_holistic_reward_on_the_eos(bpe) -> None:
    decode = decoder(bpe)
    ids = [bpe.token_to_id(EOS)]
    reward = FineGrainedReward([Component("whole", "whole", constant(-3.0)), Component("s", "sentence", by_length)])
    result = reward([""], [ids], decode)
    assert [(s.component, s.span, s.token_index) for s in result.segments[0]] == [("whole", (0, 0), 0)]
    assert result.dense.tolist() == [[-3.0]]
    nothing = reward([""], [[]], decode)  # no token at all: scored, reported, placed nowhere
    assert nothing.segments[0][0].token_index is None and nothing.dense.shape == (1, 0)
    assert nothing.total.tolist() == [0.0]


# ----------------------------------------------------------------------------------------- reward-to-go
def test_reward_to_go_by_hand() -> None:
    dense = torch.tensor([[0.0, 1.0, 0.0, 2.0], [0.5, 0.0, 0.0, 0.0]], dtype=torch.float64)
    log_ratio = torch.tensor([[0.1, -0.2, 0.3, math.nan], [0.0, 0.25, -math.inf, 7.0]], dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    got = reward_to_go(dense, log_ratio, mask, beta=0.5)
    # row 0: per token r/beta - log ratio = [-0.1, 2.2, -0.3, (masked)]; row 1: [1.0, -0.25, -, -]
    want = torch.tensor([[1.8, 1.9, -0.3, 0.0], [0.75, -0.25, 0.0, 0.0]], dtype=torch.float64)
    torch.testing.assert_close(got, want)
    assert got.dtype == torch.float64 and not got.requires_grad
    with pytest.raises(ObjectiveError, match="beta must be a positive"):
        reward_to_go(dense, log_ratio, mask, beta=0.0)
    with pytest.raises(ScoreError, match="one shape"):
        reward_to_go(dense, log_ratio[:, :3], mask, beta=1.0)
    with pytest.raises(ScoreError, match="log_ratio contains NaN"):
        reward_to_go(dense, torch.full_like(dense, math.nan), mask, beta=1.0)


def _exact_gradients(causal: bool, sequence_level: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """On all 3x3 two-token sequences: grad KL(pi || p) and minus the expected reward-to-go estimator
    (with ``sequence_level``: every token weighted by the whole sequence's pseudo-reward, G_0)."""
    generator = torch.Generator().manual_seed(0)
    theta1 = torch.randn(3, generator=generator, dtype=torch.float64, requires_grad=True)
    theta2 = torch.randn(3, 3, generator=generator, dtype=torch.float64, requires_grad=True)
    log_a1 = torch.log_softmax(torch.randn(3, generator=generator, dtype=torch.float64), -1)
    log_a2 = torch.log_softmax(torch.randn(3, 3, generator=generator, dtype=torch.float64), -1)
    r1, r2 = torch.randn(2, 3, 3, generator=generator, dtype=torch.float64)  # r1[y1, y2] ignores y2 when causal
    beta = 0.7
    y1, y2 = torch.meshgrid(torch.arange(3), torch.arange(3), indexing="ij")
    y1, y2 = y1.reshape(-1), y2.reshape(-1)
    log_pi_tokens = torch.stack([torch.log_softmax(theta1, -1)[y1], torch.log_softmax(theta2, -1)[y1, y2]], 1)
    log_a_tokens = torch.stack([log_a1[y1], log_a2[y1, y2]], 1)
    dense = torch.stack([r1[y1, 0] if causal else r1[y1, y2], r2[y1, y2]], 1)
    log_pi = log_pi_tokens.sum(1)
    log_p = log_a_tokens.sum(1) + dense.sum(1) / beta
    log_p = log_p - torch.logsumexp(log_p, 0)
    kl = (log_pi.exp() * (log_pi - log_p)).sum()
    exact = torch.autograd.grad(kl, (theta1, theta2), retain_graph=True)
    weights = reward_to_go(dense, log_pi_tokens - log_a_tokens, torch.ones(9, 2), beta)
    if sequence_level:
        weights = weights[:, :1].expand(-1, 2)
    surrogate = -(log_pi.exp().detach() * (weights * log_pi_tokens).sum(1)).sum()
    estimate = torch.autograd.grad(surrogate, (theta1, theta2))
    return torch.cat([g.reshape(-1) for g in exact]), torch.cat([g.reshape(-1) for g in estimate])


def test_reward_to_go_is_unbiased_for_causal_rewards_only() -> None:
    exact, estimate = _exact_gradients(causal=True)
    torch.testing.assert_close(estimate, exact)
    exact, estimate = _exact_gradients(causal=False)  # the first token's reward reads the second token
    assert float((estimate - exact).abs().max()) > 1e-3
    exact, estimate = _exact_gradients(causal=False, sequence_level=True)  # the sequence total stays exact
    torch.testing.assert_close(estimate, exact)


def test_the_modules_import_nothing_of_hugging_face() -> None:
    root = os.path.join(os.path.dirname(__file__), "..", "..", "objectives")
    for module in ("fine_grained.py", "segments.py"):
        with open(os.path.join(root, module)) as f:
            tree = ast.parse(f.read())
        imported = {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
        imported |= {node.module or "" for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
        assert {name.split(".")[0] for name in imported} <= {"__future__", "bisect", "math", "os", "operator", "re",
                                                             "unicodedata", "collections", "dataclasses", "typing",
                                                             "torch", "objectives"}, module
