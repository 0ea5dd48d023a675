"""Shared fixtures: a tiny character-level tokenizer and tiny random Llama / GPT-2 models, built locally.

Nothing here downloads anything; the hub is switched off for the whole test session.
"""

from __future__ import annotations

import os
import sys
from typing import TYPE_CHECKING

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
# Base-model evaluations of the tests are cached apart from the user's (~/.cache/fdpg/evals).
os.environ["FDPG_EVAL_CACHE"] = os.path.join(__import__("tempfile").mkdtemp(prefix="fdpg-test-evals-"))
# Shared test helpers at the top of tests/ (``statistics_testing``) are importable from every test directory.
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import string  # noqa: E402
from collections.abc import Iterator  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerFast

SPECIAL_TOKENS = {"pad_token": "<pad>", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}
"""Special tokens of the tiny tokenizer; they take ids 0-3 in this order."""

TINY_CHARACTERS = string.ascii_lowercase + string.digits + " \n" + string.punctuation
"""The tiny tokenizer's ordinary vocabulary: one token per character (text is lowercased first)."""

TINY_SEED = 1234


def build_tiny_tokenizer(characters: str = TINY_CHARACTERS) -> PreTrainedTokenizerFast:
    """Build a character-level ``PreTrainedTokenizerFast`` over ``characters`` (lowercasing; no bos/eos added
    on encode). The special tokens come first (ids 0-3), then one token per character."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {token: index for index, token in enumerate(SPECIAL_TOKENS.values())}
    for character in characters:
        vocab.setdefault(character, len(vocab))
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token=SPECIAL_TOKENS["unk_token"]))
    backend.normalizer = normalizers.Lowercase()
    backend.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    backend.decoder = decoders.Fuse()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, model_max_length=128, **SPECIAL_TOKENS)
    tokenizer.padding_side = "left"
    return tokenizer


def _token_ids(tokenizer: PreTrainedTokenizerFast) -> dict[str, int]:
    """The special token ids every tiny model config carries."""
    return {
        "pad_token_id": tokenizer.pad_token_id,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
    }


def _save_tiny_model(model: PreTrainedModel, tokenizer: PreTrainedTokenizerFast, directory: Path) -> Path:
    """Save ``model`` (safetensors) and ``tokenizer`` like a real checkpoint and return ``directory``."""
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


@pytest.fixture(scope="session")
def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """A character-level fast tokenizer over lowercase letters, digits, whitespace and punctuation."""
    return build_tiny_tokenizer()


SENTIMENT_WORDS = ("good", "great", "happy", "love", "bad", "awful", "sad", "hate", "the", "day", " ", ".", "!")
"""The word-level tiny tokenizer's ordinary vocabulary: words a sentiment scorer reads, a space, sentence ends."""


def build_tiny_word_tokenizer(words: tuple[str, ...] = SENTIMENT_WORDS) -> PreTrainedTokenizerFast:
    """A word-level ``PreTrainedTokenizerFast``: the special tokens (ids 0-3), then one token per entry of ``words``;
    text splits into words, single spaces and punctuation marks, anything else is ``<unk>``. A random model over it
    writes text whose sentiment, sentences and repetitions vary, unlike random characters."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {token: index for index, token in enumerate(SPECIAL_TOKENS.values())}
    for word in words:
        vocab.setdefault(word, len(vocab))
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token=SPECIAL_TOKENS["unk_token"]))
    backend.normalizer = normalizers.Lowercase()
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"\w+|\s|[^\w\s]"), behavior="isolated")
    backend.decoder = decoders.Fuse()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, model_max_length=128, **SPECIAL_TOKENS)
    tokenizer.padding_side = "left"
    return tokenizer


def _tiny_llama(tokenizer: PreTrainedTokenizerFast) -> PreTrainedModel:
    """A randomly initialised 2-layer Llama over ``tokenizer`` (seeded)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=128,
        tie_word_embeddings=False,
        **_token_ids(tokenizer),
    )
    torch.manual_seed(TINY_SEED)
    return LlamaForCausalLM(config)


@pytest.fixture(scope="session")
def tiny_word_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A directory holding a randomly initialised 2-layer Llama over the word-level tiny tokenizer: the model for
    runs whose reward must vary on random text (preference pairs, sentiment, fine-grained rewards)."""
    tokenizer = build_tiny_word_tokenizer()
    return _save_tiny_model(_tiny_llama(tokenizer), tokenizer, tmp_path_factory.mktemp("tiny_word_llama"))


@pytest.fixture(scope="session")
def tiny_model_dir(tiny_tokenizer: PreTrainedTokenizerFast, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A directory holding a randomly initialised 2-layer Llama and the tiny tokenizer."""
    return _save_tiny_model(_tiny_llama(tiny_tokenizer), tiny_tokenizer, tmp_path_factory.mktemp("tiny_llama"))


@pytest.fixture(scope="session")
def tiny_gpt2_dir(tiny_tokenizer: PreTrainedTokenizerFast, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A directory holding a randomly initialised 2-layer GPT-2 and the tiny tokenizer."""
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(
        vocab_size=len(tiny_tokenizer),
        n_embd=32,
        n_layer=2,
        n_head=2,
        n_positions=128,
        **_token_ids(tiny_tokenizer),
    )
    torch.manual_seed(TINY_SEED)
    model = GPT2LMHeadModel(config)
    return _save_tiny_model(model, tiny_tokenizer, tmp_path_factory.mktemp("tiny_gpt2"))


ENUMERABLE_CHARACTERS = "ab"
"""The ordinary vocabulary of the enumerable model: with the 4 special tokens, 6 tokens in all."""


def build_tiny_bert(tokenizer: PreTrainedTokenizerFast, directory: Path, seed: int = 0) -> Path:
    """A 2-layer BERT encoder (no head; the reward-model tests add one) with a copy of ``tokenizer``, its text
    pairs as ``<s> A </s> B </s>`` with segment ids 0 and 1, padded on the right."""
    from tokenizers import processors
    from transformers import AutoTokenizer, BertConfig, BertModel

    tokenizer.save_pretrained(directory)
    tokenizer = AutoTokenizer.from_pretrained(directory)
    tokenizer.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>", pair="<s> $A </s> $B:1 </s>:1",
        special_tokens=[("<s>", tokenizer.bos_token_id), ("</s>", tokenizer.eos_token_id)])
    tokenizer.padding_side = "right"
    config = BertConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=128, type_vocab_size=2,
                        pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(seed)
    BertModel(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


@pytest.fixture(scope="session")
def tiny_bert_dir(tiny_tokenizer: PreTrainedTokenizerFast, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """:func:`build_tiny_bert` once per session."""
    return build_tiny_bert(tiny_tokenizer, tmp_path_factory.mktemp("tiny_bert"))


@pytest.fixture(scope="session")
def enumerable_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 1-layer Llama over 6 tokens (the specials, ``a``, ``b``) whose completions of 2-3 tokens can all be
    listed: the exact ground truth of the trainer tests (``tests/fdpg/enumerable_lm.py``). Its weights are
    drawn with a large ``initializer_range`` so that its next-token distributions are far from uniform."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = build_tiny_tokenizer(ENUMERABLE_CHARACTERS)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=32,
        tie_word_embeddings=False,
        initializer_range=0.5,
        **_token_ids(tokenizer),
    )
    torch.manual_seed(TINY_SEED)
    model = LlamaForCausalLM(config)
    return _save_tiny_model(model, tokenizer, tmp_path_factory.mktemp("enumerable_llama"))


@pytest.fixture(scope="session")
def enumerable_vllm_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The enumerable model's shape with 32-wide attention heads (hidden size 64, 2 heads): the narrowest that vLLM's
    CPU attention kernels take (``fdpg.vllm_generation.CPU_HEAD_SIZES``), so that vLLM can sample it."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = build_tiny_tokenizer(ENUMERABLE_CHARACTERS)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=32,
                         tie_word_embeddings=False, initializer_range=0.2, **_token_ids(tokenizer))
    torch.manual_seed(TINY_SEED)
    return _save_tiny_model(LlamaForCausalLM(config), tokenizer, tmp_path_factory.mktemp("enumerable_vllm_llama"))


@pytest.fixture(scope="session", autouse=True)
def _one_torch_thread() -> Iterator[None]:
    """One intra-op thread: the tiny models gain nothing from more, and on a busy 2-core machine OpenMP
    spin-waiting makes them up to 100x slower (5 s instead of 50 ms for one generate call)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(autouse=True)
def _fresh_accelerator_state() -> Iterator[None]:
    """accelerate keeps one process-wide AcceleratorState and refuses a second Accelerator with other settings
    (e.g. ``mixed_precision="bf16"`` after ``"no"``): each test starts from none, as a fresh process would."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state()
    yield
    AcceleratorState._reset_state()
