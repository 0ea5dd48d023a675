r"""Unpaired binary feedback for KTO: rows of (``prompt``, ``completion``, ``label``), as TRL's KTOTrainer reads them.

Sources (``--preferences`` with ``--algo kto``): a labelled dataset (``label`` true for a desirable completion, false
for an undesirable one; a bool, or 0/1), or preference pairs (``prompt``, ``chosen``, ``rejected``, including the HH
and UltraFeedback shapes of :mod:`fdpg.preferences`), unpaired as TRL's ``unpair_preference_dataset`` does (every
chosen response desirable, every rejected one undesirable), or ``task``: the pairs made from the task, unpaired.

For KTO's reference point each example also carries a *mismatched* completion: that of the example before it in a
seeded permutation of the data (:func:`with_mismatched_completions`; TRL takes the one before it in the dataset's
order), fixed for the run, so that the reference's log-probabilities of both are computed once. They are laid out as
:class:`fdpg.preferences.TokenizedPairs` (``chosen``: the example's completion, ``rejected``: the mismatched one)
and tokenised, checked and truncated as DPO's pairs are.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from fdpg.preferences import (
    PREFERENCE_COLUMNS,
    PreferenceDataError,
    _is_empty,
    check_preferences,
    extract_implicit_prompts,
)

#: The columns of a labelled dataset.
LABELLED_COLUMNS = ("prompt", "completion", "label")


def _label(value: Any, source: str, row: int) -> bool:
    if isinstance(value, bool) or (isinstance(value, (int, float)) and value in (0, 1)):
        return bool(value)
    raise PreferenceDataError(f"{source}: row {row}, column 'label' is {value!r}: a label is true (desirable) or "
                              "false (undesirable), or 1/0")


def labelled_completions(data, source: str):
    """``data`` as a ``datasets.Dataset`` of (``prompt``, ``completion``, ``label``) rows (see the module docstring;
    ``completion_token_ids`` kept when the pairs had token ids); refused with the reason when it is neither shape,
    a label is not binary, a completion is empty, or no example is labelled at all."""
    import datasets

    columns = data.column_names
    if "completion" in columns or "label" in columns:
        missing = [c for c in LABELLED_COLUMNS if c not in columns]
        if missing:
            raise PreferenceDataError(
                f"{source}: missing column(s) {missing}; the columns found are {columns} (KTO's unpaired feedback "
                "needs prompt, completion and label: true for a desirable completion, false for an undesirable one; "
                "or preference pairs with prompt, chosen and rejected)")
        if len(data) == 0:
            raise PreferenceDataError(f"{source}: holds no rows")
        labels = []
        for i, row in enumerate(data.select_columns(list(LABELLED_COLUMNS))):
            if row["completion"] is None or _is_empty(row["completion"]):
                raise PreferenceDataError(f"{source}: row {i}, column 'completion' is empty")
            if row["prompt"] is None:
                raise PreferenceDataError(f"{source}: row {i}, column 'prompt' is empty")
            labels.append(_label(row["label"], source, i))
        return data.remove_columns(["label"]).add_column("label", labels)
    data = extract_implicit_prompts(data)
    if not set(PREFERENCE_COLUMNS) <= set(columns) and not set(PREFERENCE_COLUMNS) <= set(data.column_names):
        raise PreferenceDataError(
            f"{source}: missing column(s) ['completion', 'label']; the columns found are {columns} (KTO needs "
            "prompt, completion and label, or preference pairs prompt, chosen and rejected)")
    check_preferences(data, source)
    n = len(data)
    rows: dict[str, list] = {"prompt": list(data["prompt"]) * 2,
                             "completion": list(data["chosen"]) + list(data["rejected"]),
                             "label": [True] * n + [False] * n}
    if "chosen_token_ids" in data.column_names and "rejected_token_ids" in data.column_names:
        rows["completion_token_ids"] = list(data["chosen_token_ids"]) + list(data["rejected_token_ids"])
    return datasets.Dataset.from_dict(rows)


def with_mismatched_completions(data, seed: int):
    """Pair rows for :func:`fdpg.preferences.tokenize_pairs`: ``chosen`` the example's completion, ``rejected`` the
    completion of the example before it in a seeded permutation (a cycle: every completion is used once as a
    mismatch), ``label`` kept; the token ids likewise when present."""
    import datasets

    n = len(data)
    if n < 2:
        raise PreferenceDataError(f"KTO needs at least 2 labelled examples (its reference point reads another "
                                  f"example's completion), got {n}")
    order = np.random.default_rng(seed).permutation(n)
    previous = np.empty(n, dtype=np.int64)
    previous[order] = np.roll(order, 1)
    completions = list(data["completion"])
    rows: dict[str, list] = {"prompt": list(data["prompt"]), "chosen": completions,
                             "rejected": [completions[j] for j in previous], "label": list(data["label"])}
    if "completion_token_ids" in data.column_names:
        ids = list(data["completion_token_ids"])
        rows["chosen_token_ids"], rows["rejected_token_ids"] = ids, [ids[j] for j in previous]
    return datasets.Dataset.from_dict(rows)
