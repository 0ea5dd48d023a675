r"""Demonstrations for supervised fine-tuning, and plain text for PPO-ptx's language-modelling term.

A demonstration is a row with the columns ``prompt`` and ``completion`` (plain text), or ``messages`` (a chat: a
list of ``{"role", "content"}`` whose last turn is the assistant's), rendered through the tokenizer's chat template
(the prompt: every turn but the last, with the generation prompt; the completion: what the template adds for the
last turn). Sources are those of the preference files (:func:`fdpg.preferences.load_dataset_source`:
JSON/JSONL/CSV/Parquet, a ``save_to_disk`` directory, a hub name). Every row is checked before any training, and an
error names the source, the row and the column.

Tokenisation is that of DPO's pairs: the prompt as the sampler encodes it (special tokens added; an empty prompt is
the BOS token), the completion without special tokens followed by the end-of-sequence token. A row whose prompt and
completion exceed ``max_length`` tokens is refused, naming the row.

Pretraining text (``--ptx_data``): a ``text`` column, each row cut into pieces of at most ``length`` tokens, each
scored after the BOS token.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from fdpg.preferences import load_dataset_source
from fdpg.sampling import SampleBatch

#: The columns of plain-text demonstrations; chat demonstrations have ``messages`` instead.
DEMONSTRATION_COLUMNS = ("prompt", "completion")


class DemonstrationDataError(ValueError):
    """Demonstrations that cannot be used: the message names the source, the row and the column."""


def load_demonstrations(source: str, split: str = "train", flag: str = "--data"):
    """The checked ``datasets.Dataset`` of ``source`` (:func:`check_demonstrations`)."""
    data = load_dataset_source(source, split, flag=flag, error=DemonstrationDataError)
    check_demonstrations(data, f"{flag} {source}")
    return data


def check_demonstrations(data, source: str = "the demonstrations") -> None:
    """Refuse missing columns (listing those found), no rows, empty completions and chats not ending with the
    assistant's turn."""
    columns = data.column_names
    chat = "messages" in columns
    if not chat and any(c not in columns for c in DEMONSTRATION_COLUMNS):
        missing = [c for c in DEMONSTRATION_COLUMNS if c not in columns]
        raise DemonstrationDataError(f"{source}: missing column(s) {missing}; the columns found are {columns} "
                                     "(demonstrations need prompt and completion, or messages)")
    if len(data) == 0:
        raise DemonstrationDataError(f"{source}: holds no rows")
    for i, row in enumerate(data.select_columns(["messages"] if chat else list(DEMONSTRATION_COLUMNS))):
        if chat:
            turns = row["messages"]
            if not isinstance(turns, list) or not turns or not all(isinstance(t, dict) for t in turns):
                raise DemonstrationDataError(f"{source}: row {i}, column 'messages' is not a list of "
                                             "{role, content} turns")
            if turns[-1].get("role") != "assistant":
                raise DemonstrationDataError(f"{source}: row {i}: the last turn is {turns[-1].get('role')!r}, not "
                                             "'assistant' (the completion to learn is the last turn)")
            if not str(turns[-1].get("content") or "").strip():
                raise DemonstrationDataError(f"{source}: row {i}: the assistant's last turn is empty")
            continue
        if not isinstance(row["prompt"], (str, type(None))):
            raise DemonstrationDataError(f"{source}: row {i}, column 'prompt' is a {type(row['prompt']).__name__}, "
                                         "not text")
        completion = row["completion"]
        if not isinstance(completion, str) or not completion.strip():
            raise DemonstrationDataError(f"{source}: row {i}, column 'completion' is empty")


def render_demonstration(row: dict[str, Any], tokenizer) -> tuple[str, str]:
    """The row's prompt and completion as text (a chat through the tokenizer's chat template)."""
    if "messages" not in row or row.get("messages") is None:
        return row.get("prompt") or "", row["completion"]
    if getattr(tokenizer, "chat_template", None) is None:
        raise DemonstrationDataError("chat demonstrations (messages) need a tokenizer with a chat template; this "
                                     "model's has none (give prompt and completion columns instead)")
    turns = row["messages"]
    prompt = tokenizer.apply_chat_template(turns[:-1], tokenize=False, add_generation_prompt=True)
    full = tokenizer.apply_chat_template(turns, tokenize=False)
    if not full.startswith(prompt):
        raise DemonstrationDataError("the chat template does not render the prompt as a prefix of the whole chat, so "
                                     "the completion tokens cannot be separated")
    return prompt, full[len(prompt):]


@dataclass
class TokenizedDemonstrations:
    """Token ids of every demonstration: ``prompt_ids[i]`` and ``completion_ids[i]`` (ending with EOS), and the
    texts."""

    prompts: list[str]
    completions: list[str]
    prompt_ids: list[list[int]]
    completion_ids: list[list[int]]

    def __len__(self) -> int:
        return len(self.prompts)

    def as_batch(self, index: Sequence[int], pad_token_id: int) -> SampleBatch:
        """The rows ``index`` as one :class:`SampleBatch` (the completion tokens are the ones that carry the loss)."""
        index = [int(i) for i in index]
        return SampleBatch.from_token_rows([self.prompts[i] for i in index], [self.prompt_ids[i] for i in index],
                                           [self.completion_ids[i] for i in index],
                                           [self.completions[i] for i in index], pad_token_id)

    @property
    def n_tokens(self) -> int:
        return sum(map(len, self.completion_ids))


def _start_id(tokenizer) -> int:
    return tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id


def tokenize_demonstrations(data, tokenizer, max_length: int | None,
                            source: str = "the demonstrations") -> TokenizedDemonstrations:
    """Token ids of every row (module docstring); refuses a row that does not fit in ``max_length`` tokens."""
    eos = tokenizer.eos_token_id
    out = TokenizedDemonstrations([], [], [], [])
    for i, row in enumerate(data):
        prompt, completion = render_demonstration(row, tokenizer)
        encoded = tokenizer(prompt, add_special_tokens=True)["input_ids"] if prompt else []
        prompt_ids = encoded or [_start_id(tokenizer)]
        ids = tokenizer(completion, add_special_tokens=False)["input_ids"] + ([eos] if eos is not None else [])
        if len(ids) <= (1 if eos is not None else 0):
            raise DemonstrationDataError(f"{source}: row {i}: the completion has no tokens")
        if max_length is not None and len(prompt_ids) + len(ids) > max_length:
            raise DemonstrationDataError(
                f"{source}: row {i}: prompt ({len(prompt_ids)} tokens) + completion ({len(ids)} tokens) exceed the "
                f"{max_length}-token limit (the model's context, or --max_length); shorten or drop the row")
        out.prompts.append(prompt)
        out.completions.append(completion)
        out.prompt_ids.append(prompt_ids)
        out.completion_ids.append(ids)
    return out


def load_text_pieces(source: str, tokenizer, length: int, flag: str = "--ptx_data") -> TokenizedDemonstrations:
    """Pretraining text: the ``text`` column of ``source``, each row cut into pieces of at most ``length`` tokens, each
    a completion after the BOS token (its language-modelling loss is :func:`objectives.likelihood.completion_nll`)."""
    data = load_dataset_source(source, "train", flag=flag, error=DemonstrationDataError)
    if "text" not in data.column_names:
        raise DemonstrationDataError(f"{flag} {source}: no 'text' column; the columns found are {data.column_names}")
    if length < 1:
        raise ValueError(f"--ptx_length must be a positive integer, got {length!r}")
    start = [_start_id(tokenizer)]
    out = TokenizedDemonstrations([], [], [], [])
    for text in data["text"]:
        ids = tokenizer(text or "", add_special_tokens=False)["input_ids"]
        for lo in range(0, len(ids), length):
            piece = ids[lo:lo + length]
            out.prompts.append("")
            out.completions.append(tokenizer.decode(piece))
            out.prompt_ids.append(start)
            out.completion_ids.append(piece)
    if not out.prompts:
        raise DemonstrationDataError(f"{flag} {source}: holds no text (every row is empty)")
    return out
