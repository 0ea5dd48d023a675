r"""K-wise rankings for the list losses (RRHF, PRO, LiPO): the rankings ``fdpg label-rankings`` writes and ``fdpg
reward-model train`` reads (:mod:`fdpg.rankings`: ``prompt``, ``responses`` best first, optional ``scores``),
tokenised for the policy as DPO's pairs are (:func:`fdpg.preferences.tokenize_pairs`: the prompt with special
tokens, each response without them and followed by EOS). Pairs-only data are refused: a list loss on rankings of two
is a pair loss, and ``--algo dpo`` has those.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from fdpg.preferences import PreferenceDataError, load_dataset_source
from fdpg.rankings import RANKING_COLUMNS, rankings_from_table
from fdpg.sampling import SampleBatch
from objectives.list_losses import ranking_labels


@dataclass
class TokenizedLists:
    """Token ids of every ranking: ``prompt_ids[g]`` and ``response_ids[g]`` (best first), the texts, LiPO's labels
    ``labels[g]`` (``[K_g]``), and ``offsets[g]``, the position of ranking g's first response in the flat order."""

    prompts: list[str]
    responses: list[list[str]]
    prompt_ids: list[list[int]]
    response_ids: list[list[list[int]]]
    labels: list[torch.Tensor]
    truncated: int = 0

    def __post_init__(self) -> None:
        sizes = [len(r) for r in self.response_ids]
        self.offsets = [sum(sizes[:g]) for g in range(len(sizes))]
        self.n_responses = sum(sizes)

    def __len__(self) -> int:
        return len(self.prompts)

    def flat(self, groups: Sequence[int]) -> list[int]:
        """The flat positions of the responses of the rankings ``groups``, in order."""
        return [self.offsets[g] + i for g in groups for i in range(len(self.response_ids[g]))]

    def as_batch(self, groups: Sequence[int], pad_token_id: int) -> SampleBatch:
        """Every response of the rankings ``groups``, in order, as one :class:`SampleBatch`."""
        groups = [int(g) for g in groups]
        prompts = [self.prompts[g] for g in groups for _ in self.response_ids[g]]
        prompt_rows = [self.prompt_ids[g] for g in groups for _ in self.response_ids[g]]
        rows = [ids for g in groups for ids in self.response_ids[g]]
        texts = [t for g in groups for t in self.responses[g]]
        return SampleBatch.from_token_rows(prompts, prompt_rows, rows, texts, pad_token_id)


def load_ranked_lists(source: str, tokenizer, max_length: int | None, truncate: bool = False) -> TokenizedLists:
    """The rankings of ``source`` (a file, a saved directory or a hub name), checked (a ranking of one response, the
    same response twice, empty texts, bad scores: refused naming the row) and tokenised; a response that does not fit
    ``max_length`` with its prompt is refused, or with ``truncate`` cut."""
    data = load_dataset_source(source, flag="--preferences")
    where = f"--preferences {source}"
    if "responses" not in data.column_names:
        raise PreferenceDataError(
            f"{where}: a list loss learns from rankings (columns {', '.join(RANKING_COLUMNS)}: the responses best "
            f"first, e.g. from `fdpg label-rankings`); the columns found are {data.column_names}. Pairs (prompt, "
            "chosen, rejected) are rankings of two: use --algo dpo for them")
    scores = "scores" if "scores" in data.column_names else None
    rankings = rankings_from_table(data, where, margin_column=scores)
    start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    eos = tokenizer.eos_token_id
    out = TokenizedLists([], [], [], [], [])
    for g, (prompt, responses) in enumerate(zip(rankings.prompts, rankings.responses)):
        prompt_ids = (tokenizer(prompt, add_special_tokens=True)["input_ids"] if prompt else []) or [start]
        rows = []
        for i, text in enumerate(responses):
            ids = tokenizer(text, add_special_tokens=False)["input_ids"] + ([eos] if eos is not None else [])
            if max_length is not None and len(prompt_ids) + len(ids) > max_length:
                room = max_length - len(prompt_ids)
                if not truncate or room < 1:
                    raise PreferenceDataError(
                        f"{where}: ranking {g}, response {i}: prompt ({len(prompt_ids)} tokens) + response "
                        f"({len(ids)} tokens) exceed the {max_length}-token limit; pass --truncate_pairs to cut it")
                ids = ids[:room]
                out.truncated += 1
            rows.append(ids)
        out.prompts.append(prompt)
        out.responses.append(list(responses))
        out.prompt_ids.append(prompt_ids)
        out.response_ids.append(rows)
        given = rankings.margins[g] if rankings.margins is not None else None
        out.labels.append(ranking_labels(len(rows), list(given) if isinstance(given, (list, tuple)) else None))
    out.__post_init__()
    return out
