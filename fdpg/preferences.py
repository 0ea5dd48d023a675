r"""Preference pairs for DPO: loaded from a file, a saved ``datasets`` directory or the hub, or made from a task.

A pair is a row with the columns ``prompt``, ``chosen`` and ``rejected``: plain text, or chat messages
(lists of ``{"role", "content"}``) rendered through the tokenizer's chat template (the prompt with the generation
prompt, each response as the text the template adds after it). Every row is checked before any training, and an
error names the row and the column.

Tokenisation: the prompt as the sampler encodes it (:func:`fdpg.sampling.encode_prompts`: special tokens added), a
text response without special tokens followed by the end-of-sequence token. Pairs made from a task keep the token
ids that were sampled (``chosen_token_ids``, ``rejected_token_ids``), so no re-tokenisation can change them. A
prompt plus response longer than ``max_length`` tokens is refused, naming the row, unless truncation is asked for;
then the response is cut to fit (never the prompt) and the number of cut responses is reported.

Pairs from a task (:func:`pairs_from_task`): for each of ``n_prompts`` prompts, ``k`` samples of the base model
:math:`a`, scored by the task's reward; the best against the worst, prompts whose best and worst tie dropped.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fdpg.sampling import SampleBatch

#: The columns every preference dataset has.
PREFERENCE_COLUMNS = ("prompt", "chosen", "rejected")
#: File suffixes and the ``datasets`` builder that reads them.
FILE_BUILDERS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}


class PreferenceDataError(ValueError):
    """A preference dataset that cannot be used: the message names the source, the row and the column."""


def load_preferences(source: str, split: str = "train"):
    """The ``datasets.Dataset`` of ``source``: a JSON/JSONL/CSV/Parquet file, a directory saved with
    ``save_to_disk`` (its ``split`` when it holds several) or a hub dataset name; rows are checked
    (:func:`check_preferences`)."""
    data = extract_implicit_prompts(load_dataset_source(source, split, flag="--preferences"))
    check_preferences(data, source)
    return data


def _is_conversation(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(m, dict) and "role" in m for m in value)


def split_shared_prefix(chosen: Any, rejected: Any) -> tuple[Any, Any, Any]:
    """``(prompt, chosen, rejected)`` from two responses that repeat their prompt: the longest common prefix of the
    two (characters of two texts, a space before the first difference left to the responses; or whole messages of
    two conversations) is the prompt, as TRL's ``extract_prompt`` does."""
    n = min(len(chosen), len(rejected))
    cut = next((i for i in range(n) if chosen[i] != rejected[i]), n)
    if isinstance(chosen, str) and 0 < cut < len(chosen) and chosen[cut - 1] == " ":
        cut -= 1
    return chosen[:cut], chosen[cut:], rejected[cut:]


def extract_implicit_prompts(data):
    """Public preference sets' shapes, read as TRL reads them: with no ``prompt`` column (Anthropic HH: full
    dialogues that share the prompt as a prefix), or with a text ``prompt`` beside ``chosen``/``rejected``
    conversations that repeat the user's turn (UltraFeedback binarized), the prompt is the shared prefix of the two
    responses (:func:`split_shared_prefix`). Other data is returned as it is."""
    columns = data.column_names
    if "chosen" not in columns or "rejected" not in columns or len(data) == 0:
        return data
    first = data[0]
    if "prompt" in columns and _is_conversation(first["prompt"]) == _is_conversation(first["chosen"]):
        return data  # explicit prompts, of the responses' kind
    if "prompt" in columns and not split_shared_prefix(first["chosen"], first["rejected"])[0]:
        return data  # a text prompt and responses that do not repeat it (assistant turns only): read as they are

    def extract(row: dict[str, Any]) -> dict[str, Any]:
        prompt, chosen, rejected = split_shared_prefix(row["chosen"], row["rejected"])
        return {"prompt": prompt, "chosen": chosen, "rejected": rejected}

    removed = [c for c in ("prompt",) if c in columns]
    return data.remove_columns(removed).map(extract, desc="prompts from the responses' shared prefix")


def load_dataset_source(source: str, split: str = "train", flag: str = "--data",
                        error: type[ValueError] = PreferenceDataError):
    """The ``datasets.Dataset`` of ``source``, unchecked: a JSON/JSONL/CSV/Parquet file, a directory saved with
    ``save_to_disk`` (its ``split`` when it holds several) or a hub dataset name (its ``split``). Errors name
    ``flag`` and ``source``: an unknown file type, a file that does not parse (``error``), a name that is neither a
    local path nor a dataset the hub or its cache has (``FileNotFoundError``), a missing split."""
    import datasets

    path = Path(source)
    try:
        if path.is_file():
            builder = FILE_BUILDERS.get(path.suffix.lower())
            if builder is None:
                raise error(f"{flag} {source}: unknown file type {path.suffix!r}; use one of "
                            f"{', '.join(FILE_BUILDERS)} or a saved datasets directory")
            data = datasets.load_dataset(builder, data_files=str(path), split="train")
        elif path.is_dir():
            data = datasets.load_from_disk(str(path))
        elif path.exists():
            raise error(f"{flag} {source}: exists but is neither a file nor a directory")
        else:
            data = datasets.load_dataset(source, split=split)
    except error:
        raise
    except FileNotFoundError as exc:
        raise FileNotFoundError(f"{flag} {source}: not a local file or directory, and not a dataset the hub "
                                f"(or its cache) has: {exc}") from exc
    except Exception as exc:  # a parse error of the file's own format
        raise error(f"{flag} {source}: could not be read ({type(exc).__name__}: {exc})") from exc
    if isinstance(data, datasets.DatasetDict):
        if split not in data:
            raise error(f"{flag} {source}: has splits {sorted(data)}, not {split!r}")
        data = data[split]
    return data


def check_preferences(data, source: str = "the preferences") -> None:
    """Refuse missing columns (listing those found), empty responses, and rows whose two responses are the same."""
    missing = [c for c in PREFERENCE_COLUMNS if c not in data.column_names]
    if missing:
        raise PreferenceDataError(f"{source}: missing column(s) {missing}; the columns found are {data.column_names} "
                                  f"(a preference dataset needs {', '.join(PREFERENCE_COLUMNS)})")
    if len(data) == 0:
        raise PreferenceDataError(f"{source}: holds no rows")
    for i, row in enumerate(data.select_columns(list(PREFERENCE_COLUMNS))):
        for column in PREFERENCE_COLUMNS:
            value = row[column]
            if value is None or (column != "prompt" and _is_empty(value)):
                raise PreferenceDataError(f"{source}: row {i}, column {column!r} is empty")
            if not isinstance(value, (str, list)):
                raise PreferenceDataError(f"{source}: row {i}, column {column!r} is a {type(value).__name__}, "
                                          "not text or a list of chat messages")
        if row["chosen"] == row["rejected"]:
            raise PreferenceDataError(f"{source}: row {i}: 'chosen' and 'rejected' are the same response "
                                      f"({_preview(row['chosen'])}); drop the row or fix the data")


def _is_empty(value: Any) -> bool:
    if isinstance(value, str):
        return not value.strip()
    return not value or all(not str(m.get("content", "")).strip() for m in value if isinstance(m, dict))


def _preview(value: Any, width: int = 60) -> str:
    text = value if isinstance(value, str) else str(value)
    return repr(text if len(text) <= width else text[:width] + "...")


def render_row(row: dict[str, Any], tokenizer) -> tuple[str, str, str]:
    """The row's prompt and responses as text: chat messages through the tokenizer's chat template."""
    prompt, chosen, rejected = (row[c] for c in PREFERENCE_COLUMNS)
    if isinstance(prompt, str) and isinstance(chosen, str) and isinstance(rejected, str):
        return prompt, chosen, rejected
    if getattr(tokenizer, "chat_template", None) is None:
        raise PreferenceDataError("chat-formatted preferences need a tokenizer with a chat template; this model's "
                                  "has none (give plain-text columns instead)")
    messages = prompt if isinstance(prompt, list) else [{"role": "user", "content": prompt}]
    prompt_text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    def response(value) -> str:
        turns = value if isinstance(value, list) else [{"role": "assistant", "content": value}]
        full = tokenizer.apply_chat_template(messages + turns, tokenize=False)
        if not full.startswith(prompt_text):
            raise PreferenceDataError("the chat template does not render the prompt as a prefix of prompt + "
                                      "response, so the response tokens cannot be separated")
        return full[len(prompt_text):]

    return prompt_text, response(chosen), response(rejected)


@dataclass
class TokenizedPairs:
    """Token ids of every pair: ``prompt_ids[i]``, ``chosen_ids[i]``, ``rejected_ids[i]`` (responses end with EOS
    when they ended so), and the prompts' and responses' texts."""

    prompts: list[str]
    chosen: list[str]
    rejected: list[str]
    prompt_ids: list[list[int]]
    chosen_ids: list[list[int]]
    rejected_ids: list[list[int]]
    truncated: int = 0

    def __len__(self) -> int:
        return len(self.prompts)

    def subset(self, index: Sequence[int]) -> TokenizedPairs:
        pick = lambda xs: [xs[int(i)] for i in index]  # noqa: E731
        return TokenizedPairs(pick(self.prompts), pick(self.chosen), pick(self.rejected), pick(self.prompt_ids),
                              pick(self.chosen_ids), pick(self.rejected_ids))

    def responses(self, index: Sequence[int], pad_token_id: int, column: str) -> SampleBatch:
        """The ``column`` (``chosen`` or ``rejected``) responses of the pairs ``index`` as one :class:`SampleBatch`."""
        index = [int(i) for i in index]
        ids, texts = getattr(self, f"{column}_ids"), getattr(self, column)
        return SampleBatch.from_token_rows([self.prompts[i] for i in index], [self.prompt_ids[i] for i in index],
                                           [ids[i] for i in index], [texts[i] for i in index], pad_token_id)

    def as_batch(self, index: Sequence[int], pad_token_id: int) -> SampleBatch:
        """The pairs ``index`` as one :class:`SampleBatch` of ``2 n`` rows: the chosen responses, then the rejected
        ones (prompts left-padded, responses right-padded; log-prob columns 0)."""
        index = [int(i) for i in index]
        prompts = [self.prompts[i] for i in index] * 2
        prompt_rows = [self.prompt_ids[i] for i in index] * 2
        responses = [self.chosen_ids[i] for i in index] + [self.rejected_ids[i] for i in index]
        texts = [self.chosen[i] for i in index] + [self.rejected[i] for i in index]
        return SampleBatch.from_token_rows(prompts, prompt_rows, responses, texts, pad_token_id)


def tokenize_pairs(data, tokenizer, max_length: int | None, truncate: bool = False,
                   source: str = "the preferences") -> TokenizedPairs:
    """Token ids of every row (see the module docstring); refuses, or with ``truncate`` cuts, responses that do not
    fit in ``max_length`` tokens together with their prompt."""
    start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    eos = tokenizer.eos_token_id
    has_ids = "chosen_token_ids" in data.column_names and "rejected_token_ids" in data.column_names
    out = TokenizedPairs([], [], [], [], [], [])
    for i, row in enumerate(data):
        prompt, chosen, rejected = render_row(row, tokenizer)
        prompt_ids = (tokenizer(prompt, add_special_tokens=True)["input_ids"] if prompt else []) or [start]
        responses = []
        for column, text in (("chosen", chosen), ("rejected", rejected)):
            if has_ids:
                ids = [int(t) for t in row[f"{column}_token_ids"]]
            else:
                ids = tokenizer(text, add_special_tokens=False)["input_ids"] + ([eos] if eos is not None else [])
            if not ids:
                raise PreferenceDataError(f"{source}: row {i}, column {column!r} has no tokens")
            if max_length is not None and len(prompt_ids) + len(ids) > max_length:
                room = max_length - len(prompt_ids)
                if not truncate or room < 1:
                    why = "the prompt alone fills it" if room < 1 else "pass --truncate_pairs to cut responses to fit"
                    raise PreferenceDataError(
                        f"{source}: row {i}, column {column!r}: prompt ({len(prompt_ids)} tokens) + response "
                        f"({len(ids)} tokens) exceed the {max_length}-token limit; {why}")
                ids = ids[:room]
                out.truncated += 1
            responses.append(ids)
        out.prompts.append(prompt)
        out.chosen.append(chosen)
        out.rejected.append(rejected)
        out.prompt_ids.append(prompt_ids)
        out.chosen_ids.append(responses[0])
        out.rejected_ids.append(responses[1])
    return out


def split_pairs(n: int, heldout_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """A seeded split of ``n`` pairs into training and held-out rows (at least one of each when ``n > 1`` and the
    fraction is positive)."""
    order = np.random.default_rng(seed).permutation(n).tolist()
    n_held = 0 if heldout_fraction <= 0 or n < 2 else min(n - 1, max(1, round(heldout_fraction * n)))
    return sorted(order[n_held:]), sorted(order[:n_held])


def pairs_from_task(policy, spec, reward_feature: str, n_prompts: int, k: int, max_new_tokens: int, seed: int,
                    progress: bool = True):
    r"""Preference pairs from the task itself: ``k`` samples of the base model per prompt (``n_prompts`` prompts of
    the task's pool, drawn without replacement when it has that many), scored by ``reward_feature``; the best
    against the worst, ties dropped. A ``datasets.Dataset`` with the columns ``prompt``, ``chosen``, ``rejected``,
    their scores and token ids."""
    import datasets

    from fdpg.evaluation import sample_for_prompts
    from fdpg.scores import checked_features

    if k < 2:
        raise ValueError(f"--pair_samples must be at least 2 (best against worst of k samples), got {k}")
    pool = list(spec.prompts) if spec.prompts else [""]
    rng = np.random.default_rng(seed)
    chosen_prompts = [pool[i] for i in rng.choice(len(pool), size=n_prompts, replace=len(pool) < n_prompts)]
    prompts = [p for p in chosen_prompts for _ in range(k)]
    batch = sample_for_prompts(policy, prompts, max_new_tokens, seed, reference=True, progress=progress)
    features = checked_features(spec.target, spec.scorer(list(batch.texts), list(batch.prompts)), len(batch))
    if reward_feature not in features:
        raise ValueError(f"the task's scorer gives no feature {reward_feature!r} (it gives {sorted(features)})")
    scores = features[reward_feature].double().view(n_prompts, k)
    rows: dict[str, list] = {c: [] for c in (*PREFERENCE_COLUMNS, "chosen_score", "rejected_score",
                                              "chosen_token_ids", "rejected_token_ids")}
    for j in range(n_prompts):
        best, worst = int(scores[j].argmax()), int(scores[j].argmin())
        if not scores[j, best] > scores[j, worst] or not math.isfinite(float(scores[j, best] - scores[j, worst])):
            continue  # a tie: no preference
        b, w = j * k + best, j * k + worst
        if batch.texts[b] == batch.texts[w]:
            continue
        rows["prompt"].append(chosen_prompts[j])
        for column, i in (("chosen", b), ("rejected", w)):
            rows[column].append(batch.texts[i])
            rows[f"{column}_score"].append(float(scores.view(-1)[i]))
            rows[f"{column}_token_ids"].append(batch.completion_ids[i, :int(batch.lengths[i])].tolist())
    if not rows["prompt"]:
        raise ValueError(f"every one of the {n_prompts} prompts tied between its best and worst of {k} samples: "
                         "raise --pair_samples or use a task whose reward varies")
    return datasets.Dataset.from_dict(rows)
