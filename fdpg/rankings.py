r"""Ranked responses for reward-model training: pairs and rankings, loaded, checked and tokenised.

A data set is a table (a JSON/JSONL/CSV/Parquet file, a ``save_to_disk`` directory or a hub data set, read by
:func:`fdpg.preferences.load_dataset_source`) in one of two formats:

- **pairs**: the columns ``prompt``, ``chosen``, ``rejected`` (the DPO format);
- **rankings**: the columns ``prompt`` and ``responses``, a list of texts ordered best to worst; the number of
  responses :math:`K \ge 2` may differ from row to row.

A table with a ``responses`` column is read as rankings, else as pairs. Either becomes a :class:`Rankings`, a pair
being a ranking of two. A ranking of :math:`K` responses gives its :math:`K(K-1)/2` ordered pairs
(:func:`ranking_pairs`: :math:`(i, j)` for :math:`i < j`, :math:`y_i \succ y_j`), all scored from one forward pass
per response (InstructGPT's scheme).

Optional columns (named by the trainer's flags):

- a margin column (``--margin_column``): a number per row, the margin of every pair of that row; or, for rankings,
  a list of :math:`K` scores, not increasing along the ranking, the margin of pair :math:`(i, j)` being
  :math:`s_i - s_j` (as Llama 2's margin from rating differences);
- a utility column (``--utility_column``): a value per row (e.g. ``open`` / ``closed``) that picks the pair's
  utility of a prompt-aware utility (:class:`objectives.utilities.PromptAwareUtility`).

Every row is checked before any training, and an error names the source, the row and the column: missing columns
(listing those found), a ranking with fewer than two responses, the same response twice in one ranking (also after
tokenisation), empty responses, margins that are not numbers or are of the wrong length.

Tokenisation (:func:`encode_rankings`): the prompt and the response as a text pair,
``tokenizer(prompt, response, truncation=True, max_length=...)``, so a BERT-like encoder sees
``[CLS] prompt [SEP] response [SEP]`` with segment ids 0 and 1 (a causal LM's tokenizer joins the two texts). A
pair longer than ``max_length`` tokens is cut, the longer of the two texts first (``longest_first``), and counted.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from fdpg.preferences import PreferenceDataError, load_dataset_source, split_pairs

#: The columns of the two formats.
PAIR_COLUMNS = ("prompt", "chosen", "rejected")
RANKING_COLUMNS = ("prompt", "responses")


class RankingDataError(PreferenceDataError):
    """A reward-model data set that cannot be used: the message names the source, the row and the column."""


@dataclass
class Rankings:
    """Rankings of responses, best first (a pair is a ranking of two).

    Attributes:
        prompts: one prompt per ranking.
        responses: the ranking's texts, best to worst.
        contexts: the utility column's value per ranking (``None``: no utility column).
        margins: per ranking ``None``, a number (every pair's margin) or one score per response (pair
            :math:`(i, j)` gets :math:`s_i - s_j`); ``None``: no margin column.
        rows: the source row of each ranking (for messages).
        kind: ``"pairs"`` or ``"rankings"``, the format of the source.
        source: where the data came from.
    """

    prompts: list[str]
    responses: list[list[str]]
    contexts: list[Any] | None = None
    margins: list[Any] | None = None
    rows: list[int] = field(default_factory=list)
    kind: str = "rankings"
    source: str = "the rankings"

    def __post_init__(self) -> None:
        if not self.rows:
            self.rows = list(range(len(self.prompts)))

    def __len__(self) -> int:
        return len(self.prompts)

    @property
    def n_pairs(self) -> int:
        return sum(len(r) * (len(r) - 1) // 2 for r in self.responses)

    def subset(self, index: Sequence[int]) -> Rankings:
        index = [int(i) for i in index]

        def pick(xs):
            return None if xs is None else [xs[i] for i in index]

        return Rankings(pick(self.prompts), pick(self.responses), pick(self.contexts), pick(self.margins),
                        pick(self.rows), self.kind, self.source)

    def pair_margins(self, g: int) -> torch.Tensor | None:
        """``[K(K-1)/2]`` float64 margins of ranking ``g``'s pairs in :func:`ranking_pairs` order (``None``: none)."""
        if self.margins is None:
            return None
        k = len(self.responses[g])
        value = self.margins[g]
        if isinstance(value, (list, tuple)):
            s = torch.tensor([float(v) for v in value], dtype=torch.float64)
            i, j = ranking_pairs(k)
            return s[i] - s[j]
        return torch.full((k * (k - 1) // 2,), float(value), dtype=torch.float64)

    def fingerprint(self) -> str:
        """A short hash of the texts, contexts and margins (to tell, on resume, whether the data changed)."""
        blob = json.dumps([self.prompts, self.responses, self.contexts, self.margins], default=str)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    def unique_prompts(self) -> list[str]:
        return list(dict.fromkeys(self.prompts))


def ranking_pairs(k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The :math:`K(K-1)/2` ordered pairs of a ranking of ``k``: winner positions ``i`` and loser positions
    ``j > i``, row-major ((0, 1), (0, 2), ..., (1, 2), ...)."""
    index = torch.triu_indices(k, k, offset=1)
    return index[0], index[1]


# ---------------------------------------------------------------------------------------------- loading
def load_rankings(source: str, split: str = "train", margin_column: str | None = None,
                  context_column: str | None = None) -> Rankings:
    """The checked :class:`Rankings` of ``source`` (see the module docstring)."""
    data = load_dataset_source(source, split, flag="--data", error=RankingDataError)
    return rankings_from_table(data, f"--data {source}", margin_column, context_column)


def rankings_from_rows(rows: Sequence[dict[str, Any]], source: str = "the rankings",
                       margin_column: str | None = None, context_column: str | None = None) -> Rankings:
    """The checked :class:`Rankings` of a list of row dicts (as they would be read from a JSONL file)."""
    columns = list(dict.fromkeys(k for r in rows for k in r))
    table = {c: [r.get(c) for r in rows] for c in columns}
    return _check(table, columns, len(rows), source, margin_column, context_column)


def rankings_from_table(data, source: str, margin_column: str | None = None,
                        context_column: str | None = None) -> Rankings:
    """The checked :class:`Rankings` of a ``datasets.Dataset``."""
    columns = list(data.column_names)
    needed = [c for c in (*RANKING_COLUMNS, *PAIR_COLUMNS, margin_column, context_column) if c and c in columns]
    table = {c: list(data[c]) for c in dict.fromkeys(needed)}
    return _check(table, columns, len(data), source, margin_column, context_column)


def _preview(value: Any, width: int = 60) -> str:
    text = value if isinstance(value, str) else str(value)
    return repr(text if len(text) <= width else text[:width] + "...")


def _check(table: dict[str, list], columns: list[str], n: int, source: str, margin_column: str | None,
           context_column: str | None) -> Rankings:
    kind = "rankings" if "responses" in columns else "pairs"
    wanted = RANKING_COLUMNS if kind == "rankings" else PAIR_COLUMNS
    missing = [c for c in wanted if c not in columns]
    missing += [c for c in (margin_column, context_column) if c and c not in columns]
    if missing:
        raise RankingDataError(
            f"{source}: missing column(s) {missing}; the columns found are {columns} (a reward-model data set needs "
            "prompt and either responses (a ranking, best first) or chosen and rejected"
            + (", plus the columns named by --margin_column / --utility_column" if margin_column or context_column
               else "") + ")")
    if n == 0:
        raise RankingDataError(f"{source}: holds no rows")
    prompts, responses = [], []
    for i in range(n):
        prompt = table["prompt"][i]
        if prompt is None:
            prompt = ""
        if not isinstance(prompt, str):
            raise RankingDataError(f"{source}: row {i}, column 'prompt' is a {type(prompt).__name__}, not text")
        if kind == "rankings":
            ranked = table["responses"][i]
            if isinstance(ranked, str) or not isinstance(ranked, Sequence):
                raise RankingDataError(f"{source}: row {i}, column 'responses' must be a list of texts (best first), "
                                       f"got a {type(ranked).__name__}")
            ranked, names = list(ranked), [f"responses[{j}]" for j in range(len(ranked))]
            if len(ranked) < 2:
                raise RankingDataError(f"{source}: row {i}, column 'responses' holds {len(ranked)} response(s); a "
                                       "ranking needs at least two (drop the row)")
        else:
            ranked, names = [table["chosen"][i], table["rejected"][i]], ["chosen", "rejected"]
        for name, text in zip(names, ranked):
            if not isinstance(text, str):
                raise RankingDataError(f"{source}: row {i}, column {name!r} is a {type(text).__name__}, not text "
                                       "(reward models take plain-text responses)")
            if not text.strip():
                raise RankingDataError(f"{source}: row {i}, column {name!r} is empty")
        seen: dict[str, int] = {}
        for j, text in enumerate(ranked):
            if text in seen:
                raise RankingDataError(f"{source}: row {i}: {names[seen[text]]} and {names[j]} are the same response "
                                       f"({_preview(text)}); a ranking orders distinct responses: drop one")
            seen[text] = j
        prompts.append(prompt)
        responses.append(ranked)
    margins = None
    if margin_column:
        margins = [_margin(table[margin_column][i], len(responses[i]), kind, source, i, margin_column)
                   for i in range(n)]
    contexts = None
    if context_column:
        contexts = table[context_column]
        for i, value in enumerate(contexts):
            if value is None or (isinstance(value, str) and not value.strip()):
                raise RankingDataError(f"{source}: row {i}, column {context_column!r} (--utility_column) is empty")
            if isinstance(value, (list, dict)):
                raise RankingDataError(f"{source}: row {i}, column {context_column!r} (--utility_column) must be one "
                                       f"value per row (e.g. open / closed), got a {type(value).__name__}")
    return Rankings(prompts, responses, contexts, margins, list(range(n)), kind, source)


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def _margin(value: Any, k: int, kind: str, source: str, i: int, column: str) -> float | list[float]:
    where = f"{source}: row {i}, column {column!r} (--margin_column)"
    if isinstance(value, (list, tuple)):
        if kind != "rankings":
            raise RankingDataError(f"{where}: a pair's margin is one number, got a list")
        scores = [_number(v) for v in value]
        if len(scores) != k or any(s is None for s in scores):
            raise RankingDataError(f"{where}: a list of margin scores needs one finite number per response ({k}), got "
                                   f"{_preview(value)}")
        if any(a < b for a, b in zip(scores, scores[1:])):
            raise RankingDataError(f"{where}: the scores {scores} increase along the ranking; they must not (best "
                                   "first), since pair (i, j) gets the margin s_i - s_j")
        return scores
    number = _number(value)
    if number is None:
        raise RankingDataError(f"{where} must be a finite number"
                               + (" or a list of one score per response" if kind == "rankings" else "")
                               + f", got {_preview(value)}")
    return number


# ---------------------------------------------------------------------------------------------- splitting
def split_by_prompt(rankings: Rankings, heldout_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Training and held-out rankings, split by prompt (every ranking of a prompt on the same side), seeded
    (:func:`fdpg.preferences.split_pairs` over the distinct prompts in order of appearance)."""
    prompts = rankings.unique_prompts()
    train_prompts, held_prompts = split_pairs(len(prompts), heldout_fraction, seed)
    held = {prompts[i] for i in held_prompts}
    train = [g for g, p in enumerate(rankings.prompts) if p not in held]
    heldout = [g for g, p in enumerate(rankings.prompts) if p in held]
    return train, heldout


# ---------------------------------------------------------------------------------------------- tokenising
@dataclass
class EncodedRankings:
    """The tokenised (prompt, response) text pairs of every ranking: ``features[g][j]`` is a dict of token id
    lists (``input_ids``, and ``token_type_ids`` when the tokenizer makes them) of response ``j`` of ranking
    ``g``."""

    features: list[list[dict[str, list[int]]]]
    truncated: int = 0
    max_length: int | None = None

    def rows(self, groups: Sequence[int]) -> list[dict[str, list[int]]]:
        """The encodings of every response of ``groups``, ranking after ranking."""
        return [f for g in groups for f in self.features[g]]

    def tokens(self, groups: Sequence[int]) -> int:
        return sum(len(f["input_ids"]) for f in self.rows(groups))


def encode_rankings(rankings: Rankings, tokenizer, max_length: int | None, chunk: int = 1024) -> EncodedRankings:
    """Tokenise every (prompt, response) text pair (see the module docstring); refuses a ranking in which two
    responses become the same tokens once cut to ``max_length``."""
    flat = [(g, p, r) for g, (p, ranked) in enumerate(zip(rankings.prompts, rankings.responses)) for r in ranked]
    keep = [k for k in ("input_ids", "token_type_ids") if k in tokenizer.model_input_names]
    out: list[list[dict[str, list[int]]]] = [[] for _ in range(len(rankings))]
    truncated = 0
    for lo in range(0, len(flat), chunk):
        part = flat[lo:lo + chunk]
        prompts, responses = [p for _, p, _ in part], [r for _, _, r in part]
        full = tokenizer(prompts, responses, truncation=False, verbose=False)
        cut = tokenizer(prompts, responses, truncation=max_length is not None, max_length=max_length) \
            if max_length is not None else full
        for n, (g, _, _) in enumerate(part):
            truncated += len(cut["input_ids"][n]) < len(full["input_ids"][n])
            out[g].append({k: list(cut[k][n]) for k in keep if k in cut})
    for g, features in enumerate(out):
        seen: dict[tuple[int, ...], int] = {}
        for j, f in enumerate(features):
            key = tuple(f["input_ids"])
            if key in seen:
                raise RankingDataError(
                    f"{rankings.source}: row {rankings.rows[g]}: responses {seen[key]} and {j} are the same tokens "
                    f"once cut to --max_length {max_length} (they differ only after it); raise --max_length or "
                    "shorten the prompt")
            seen[key] = j
    return EncodedRankings(out, truncated, max_length)
