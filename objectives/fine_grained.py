r"""Fine-grained rewards (Wu et al. 2023) on the policy's tokens, and their token-level credit for f-DPG.

The reward
----------
Reward models :math:`k = 1..K`, each with a weight :math:`w_k` and a segmenter at its own density
(sub-sentence, sentence, whole text; :mod:`objectives.segments`), score the segments
:math:`y^k_1, \dots, y^k_{m_k}` of a completion :math:`y`. Segment :math:`j` of component :math:`k`
gets the score :math:`R_{kj}`, and its weighted score is placed on the token :math:`t_{kj}` that
completes the segment's last character, which gives a dense reward per generated token

.. math::  r_t = \sum_k \sum_{j:\ t_{kj} = t} w_k R_{kj}, \qquad
           \sum_t r_t = \sum_k w_k \sum_j R_{kj} =: r(y).

A segmenter that marks itself ``completes_with_text`` (:func:`objectives.segments.whole_text`) has segments
that end where the completion ends, which only the last token decides: they go on the completion's last token
(its EOS when it has one), where a holistic reward goes, so that their placement depends on no later token.

A scorer reads either the segment's text (``reads="segment"``) or the completion up to the segment's
end (``reads="prefix"``); either way, the segment's score depends only on tokens up to :math:`t_{kj}`
(*causal*). A scorer that also looks at text after the segment (e.g. it closes over the whole
completion) is allowed but must be declared ``causal=False``: the sequence total is still right, the
token-level credit below is not.

Token alignment
---------------
The tokens are those the policy generated, so the alignment is computed **from the generated ids**
(re-tokenising the decoded text can give other tokens: ``"hel" + "lo"`` decodes to ``"hello"``,
which re-tokenises to one token). :func:`token_char_ends` decodes every prefix
:math:`\mathrm{decode}(y_{1..k})` and counts the characters of the final text that are settled after
token :math:`k`: the longest common prefix with the final decode, not counting the replacement
characters ``"\ufffd"`` that a byte-level decoder puts at the end of a prefix that stops inside a
multi-byte UTF-8 character, and taking the minimum over later prefixes so that the counts never
decrease (a decoder that cleans up spaces can revise a prefix's last characters). That is one decode
per token, of prefixes of growing length: :math:`O(n)` decode calls and :math:`O(n^2)` token work for
:math:`n` tokens, negligible for completions of ~64 tokens. :func:`segment_end_tokens` then maps a
span ending at character :math:`e` to the first token :math:`k` with ``char_ends[k] >= e`` (a segment
ending inside a token maps to that token).

Token-level credit for reverse KL
---------------------------------
With the energy :math:`P(y) = a(y)\exp(r(y)/\beta)`, the reverse-KL generator :math:`f(t) = t\log t` gives
the f-DPG pseudo-reward

.. math::  -f'(\pi/p) = -\log\frac{\pi(y)}{P(y)/Z} - 1
           = \sum_t \Big(\frac{r_t}{\beta} - \log\frac{\pi}{a}(y_t\mid y_{<t})\Big) - \log Z - 1,

a sum over tokens plus a constant (absorbed by the baseline). The gradient estimate
:math:`E_\pi[-f'\,\nabla\log\pi(y)]` with :math:`\nabla\log\pi(y) = \sum_t\nabla\log\pi(y_t\mid y_{<t})`
keeps, for token :math:`t`, only the terms at or after :math:`t`: :func:`reward_to_go` returns

.. math::  G_t = \sum_{t' \ge t} \Big(\frac{r_{t'}}{\beta} - \log\frac{\pi}{a}(y_{t'}\mid y_{<t'})\Big)
           \quad\text{(valid tokens only).}

This is the standard argument: a term :math:`c_{t'}` with :math:`t' < t` is a function of
:math:`y_{\le t'} \subseteq y_{<t}`, so :math:`E[c_{t'}\nabla\log\pi(y_t\mid y_{<t})] =
E\big[c_{t'}\,E[\nabla\log\pi(y_t\mid y_{<t}) \mid y_{<t}]\big] = 0`, because the score of a distribution
has mean zero. Dropping the past terms thus leaves the gradient unbiased and lowers its variance. It
needs every :math:`r_{t'}` to depend on :math:`y_{\le t'}` only: true of causal components, false of
those declared ``causal=False`` (use the sequence total for them). One caveat even for causal scorers:
*where* a segment ends can depend on what follows it (the sentence splitter looks at the character after
a period, the last segment ends where generation stops), so the credit of the token right after a
boundary can miss that boundary's reward; the bias is confined to those boundary decisions. The argument
is for on-policy samples; the constant :math:`-\log Z - 1` and any baseline that depends only on
:math:`y_{<t}` can be subtracted from :math:`G_t`.
"""

from __future__ import annotations

import bisect
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch

from objectives._tensors import check_no_nan, wide_dtype
from objectives.errors import ObjectiveError, ScoreError
from objectives.segments import Segmenter, Span, check_spans, get_segmenter

Decode = Callable[[list[int]], str]
"""Token ids -> text, e.g. ``lambda ids: tokenizer.decode(ids, skip_special_tokens=True)``."""
Scorer = Callable[[list[str]], "Sequence[float] | torch.Tensor"]
"""A batch scorer: one text per segment in, one finite score per segment out."""
Reads = Literal["segment", "prefix"]

REPLACEMENT = "\ufffd"


class AlignmentError(ObjectiveError):
    """Token ids, texts and masks that do not fit together (or spans beyond the decoded tokens)."""


# ----------------------------------------------------------------------------------------- token alignment
def _common_prefix_length(a: str, b: str) -> int:
    return len(os.path.commonprefix([a, b]))


def _text_offset(full: str, text: str) -> int:
    """Where ``text`` starts in ``full = decode(ids)``: 0 if ``full`` starts with it (possibly cut short),
    else after ``full``'s leading whitespace (a stripped decode); raise :class:`AlignmentError` otherwise."""
    if full.startswith(text):
        return 0
    lead = len(full) - len(full.lstrip())
    if full.startswith(text, lead):
        return lead
    raise AlignmentError(
        f"text {text!r:.60} is not the decode of its token ids ({full!r:.60}), nor that decode with leading "
        "whitespace removed or cut short; pass the text decoded from these ids with the same decode"
    )


def token_char_ends(token_ids: Sequence[int], decode: Decode, text: str | None = None) -> list[int]:
    """For each token ``k``, the number of characters of the completion that are complete after tokens
    ``0..k`` (non-decreasing; the last equals ``len(text)``).

    Args:
        token_ids: the generated tokens of one completion, without padding (stop at its length).
        decode: token ids -> text (the same decode that produced ``text``).
        text: the completion's final text, if it was decoded already; character counts are then in its
            coordinates. It may be ``decode(token_ids)`` without leading whitespace or cut short (e.g. at
            a stop string); tokens past its end get ``len(text)``. Default ``decode(token_ids)``.

    Decodes every prefix once (``len(token_ids)`` calls); see the module docstring.
    """
    ids = [int(i) for i in token_ids]
    if not ids:
        if text:
            raise AlignmentError(f"text {text!r:.60} has no token ids; pass the ids it was decoded from")
        return []
    prefixes = [decode(ids[: k + 1]) for k in range(len(ids))]
    full = prefixes[-1]
    offset = 0 if text is None else _text_offset(full, text)
    size = len(full) if text is None else len(text)
    settled = [
        _common_prefix_length(prefix if k == len(ids) - 1 else prefix.rstrip(REPLACEMENT), full)
        for k, prefix in enumerate(prefixes)
    ]
    ends = [0] * len(ids)
    running = len(full)
    for k in reversed(range(len(ids))):
        running = min(running, settled[k])
        ends[k] = min(max(running - offset, 0), size)
    return ends


def segment_end_tokens(spans: Sequence[Span], char_ends: Sequence[int]) -> list[int]:
    """For each span, the index of the token that completes its last character: the first ``k`` with
    ``char_ends[k] >= end`` (an empty span at 0 maps to token 0)."""
    if not char_ends:
        raise AlignmentError("char_ends is empty: a completion without tokens has no token to put a reward on")
    out = []
    for start, end in spans:
        k = bisect.bisect_left(char_ends, end)
        if k == len(char_ends):
            raise AlignmentError(
                f"segment ({start}, {end}) ends after the last token's characters ({char_ends[-1]}); the "
                "spans must come from the text decoded from these tokens"
            )
        out.append(k)
    return out


# ----------------------------------------------------------------------------------------- components
@dataclass(frozen=True)
class Component:
    r"""One reward model of a fine-grained reward: segments at its density, scores them, weight :math:`w_k`.

    Attributes:
        name: names the component in results and errors (unique within a reward).
        segmenter: a :class:`~objectives.segments.Segmenter` or a name for
            :func:`~objectives.segments.get_segmenter` (``"whole"``, ``"sentence"``, ``"sub_sentence"``).
        scorer: ``texts -> scores``, called once per batch with every segment of every completion.
        weight: :math:`w_k`, any finite number (negative for a penalty).
        reads: ``"segment"``: the scorer gets each segment's text; ``"prefix"``: the completion up to the
            segment's end (the context of a left-to-right reward model).
        causal: ``False`` declares that the scorer's score for a segment also depends on text after it.
        increments: with ``reads="prefix"``, the segment's score is the *increase* of the scorer's score,
            :math:`R_{kj} = S(y_{\le e_j}) - S(y_{\le e_{j-1}})` with :math:`S(y_{\le e_0}) := 0`, so that the
            segment scores of a completion sum to :math:`S` of its last prefix (a holistic score split over
            segments, Wu et al.'s sentence-level toxicity); still causal.
    """

    name: str
    segmenter: Segmenter | str
    scorer: Scorer
    weight: float = 1.0
    reads: Reads = "segment"
    causal: bool = True
    increments: bool = False

    def __post_init__(self) -> None:
        if not (isinstance(self.name, str) and self.name):
            raise ObjectiveError(f"Component name must be a non-empty string, got {self.name!r}")
        if not callable(self.scorer):
            raise ObjectiveError(
                f"Component {self.name!r}: scorer must be callable (list of texts -> one score each), "
                f"got {self.scorer!r:.80}"
            )
        if isinstance(self.weight, bool) or not isinstance(self.weight, (int, float)) or not math.isfinite(
            self.weight
        ):
            raise ObjectiveError(f"Component {self.name!r}: weight must be a finite number, got {self.weight!r}")
        if self.reads not in ("segment", "prefix"):
            raise ObjectiveError(
                f"Component {self.name!r}: reads must be 'segment' or 'prefix', got {self.reads!r}"
            )
        if not isinstance(self.causal, bool):
            raise ObjectiveError(f"Component {self.name!r}: causal must be True or False, got {self.causal!r}")
        if self.increments and self.reads != "prefix":
            raise ObjectiveError(f"Component {self.name!r}: increments=True differences the scores of growing "
                                 "prefixes, so it needs reads='prefix'")
        if isinstance(self.segmenter, str):
            object.__setattr__(self, "segmenter", get_segmenter(self.segmenter))
        elif not callable(self.segmenter):
            raise ObjectiveError(
                f"Component {self.name!r}: segmenter must be a name ('whole', 'sentence', 'sub_sentence') or a "
                f"callable text -> list of (start, end) spans, got {self.segmenter!r:.80}"
            )


@dataclass(frozen=True)
class SegmentScore:
    """One scored segment: ``score`` is :math:`R_{kj}`, ``weighted`` is :math:`w_k R_{kj}` (on ``token_index``,
    ``None`` only for a completion without tokens)."""

    component: str
    span: Span
    text: str
    token_index: int | None
    score: float
    weighted: float


@dataclass(frozen=True)
class FineGrainedResult:
    r"""The fine-grained reward of a batch.

    Attributes:
        segments: per completion, its scored segments (component by component, in text order).
        dense: ``[B, T]`` per-token rewards :math:`r_t` on the generated tokens, zero after each length.
        total: ``[B]`` :math:`r(y) = \sum_k w_k \sum_j R_{kj}` (summed from the scores, equal to
            ``dense.sum(-1)``).
        component_totals: per component, ``[B]`` :math:`w_k \sum_j R_{kj}`.
        char_ends: per completion, :func:`token_char_ends` of its valid tokens.
        causal: whether every component is causal (:func:`reward_to_go` is then unbiased).
    """

    segments: list[list[SegmentScore]]
    dense: torch.Tensor
    total: torch.Tensor
    component_totals: dict[str, torch.Tensor]
    char_ends: list[list[int]]
    causal: bool


@dataclass
class _Pending:
    """The segments of one component across the batch, waiting for one scorer call."""

    rows: list[int] = field(default_factory=list)
    spans: list[Span] = field(default_factory=list)
    tokens: list[int | None] = field(default_factory=list)
    inputs: list[str] = field(default_factory=list)


# ----------------------------------------------------------------------------------------- batch inputs
def _rows_and_lengths(
    token_ids: torch.Tensor | Sequence[Sequence[int]],
    mask: torch.Tensor | None,
    lengths: torch.Tensor | Sequence[int] | None,
) -> tuple[list[list[int]], list[int], int]:
    """Token id lists per completion, valid lengths, and the width ``T`` of the dense tensor."""
    if isinstance(token_ids, torch.Tensor):
        if token_ids.dim() != 2:
            raise AlignmentError(f"token_ids must be [batch, tokens], got shape {tuple(token_ids.shape)}")
        rows = [list(map(int, row)) for row in token_ids.tolist()]
        width = token_ids.shape[1]
    else:
        rows = [[int(i) for i in row] for row in token_ids]
        width = max((len(row) for row in rows), default=0)
    from_mask = None if mask is None else _lengths_from_mask(mask, len(rows), width)
    if lengths is None:
        valid = from_mask if from_mask is not None else [len(row) for row in rows]
    else:
        valid = [int(n) for n in (lengths.tolist() if isinstance(lengths, torch.Tensor) else lengths)]
        if len(valid) != len(rows):
            raise AlignmentError(f"lengths has {len(valid)} entries for {len(rows)} completions; pass one each")
        if from_mask is not None and valid != from_mask:
            raise AlignmentError(f"lengths {valid} disagree with the mask's row sums {from_mask}; pass one of them")
    for b, (n, row) in enumerate(zip(valid, rows)):
        if not 0 <= n <= len(row):
            raise AlignmentError(f"completion {b} has length {n} but {len(row)} token ids; lengths must be in [0, T]")
    return [row[:n] for row, n in zip(rows, valid)], valid, width


def _lengths_from_mask(mask: torch.Tensor, batch: int, width: int) -> list[int]:
    """Row sums of a right-padded 0/1 mask, checking that each row is ones then zeros."""
    if tuple(mask.shape) != (batch, width):
        raise AlignmentError(f"mask has shape {tuple(mask.shape)}, token_ids ({batch}, {width}); pass one per token")
    ones = mask != 0
    lengths = ones.sum(-1)
    prefix = torch.arange(width, device=mask.device).unsqueeze(0) < lengths.unsqueeze(1)
    if not bool((ones == prefix).all()):
        bad = int(torch.nonzero((ones != prefix).any(-1))[0])
        raise AlignmentError(
            f"mask row {bad} is not ones followed by zeros ({mask[bad].tolist()!r:.80}); the generated tokens "
            "must be right-padded"
        )
    return [int(n) for n in lengths.tolist()]


def _scores(component: Component, raw: object, pending: _Pending) -> list[float]:
    """The scorer's output as floats, checked for count and finiteness (:class:`ScoreError` otherwise)."""
    expected = len(pending.inputs)
    try:
        values = torch.as_tensor(raw.detach().cpu() if isinstance(raw, torch.Tensor) else raw, dtype=torch.float64)
    except (TypeError, ValueError, RuntimeError) as exc:
        raise ScoreError(
            f"component {component.name!r}: the scorer must return one number per segment, got {raw!r:.80}"
        ) from exc
    if values.dim() != 1 or values.numel() != expected:
        raise ScoreError(
            f"component {component.name!r}: the scorer returned {values.numel()} scores of shape "
            f"{tuple(values.shape)} for {expected} segments; return one score per input text, in order"
        )
    finite = torch.isfinite(values)
    if not bool(finite.all()):
        i = int(torch.nonzero(~finite)[0])
        raise ScoreError(
            f"component {component.name!r}: score {values[i].item()!r} for segment {pending.inputs[i]!r:.60} "
            f"(completion {pending.rows[i]}) is not finite; scores must be finite numbers"
        )
    return values.tolist()


def _scored(component: Component, pending: _Pending) -> list[float]:
    """The component's segment scores: one scorer call for the batch; with ``increments``, each prefix's score
    minus the previous prefix's of the same completion (0 before the first)."""
    if not pending.inputs:
        return []
    values = _scores(component, component.scorer(pending.inputs), pending)
    if not component.increments:
        return values
    out, previous, row = [], 0.0, None
    for b, value in zip(pending.rows, values):
        if b != row:
            previous, row = 0.0, b
        out.append(value - previous)
        previous = value
    return out


# ----------------------------------------------------------------------------------------- the reward
class FineGrainedReward:
    r"""A weighted sum of segment-level rewards placed on the policy's tokens (module docstring).

    ``reward(texts, token_ids, decode, mask=...)`` returns a :class:`FineGrainedResult`. Each scorer is
    called once per batch (not at all if the batch has no segment for it) with the texts of all
    segments of all completions, flattened in completion order. The last batch's scores of each component are
    kept, so scoring the same segments again (a task's :meth:`totals`, then the trainer's per-token placement of
    the same completions) calls no scorer: a scorer must be a deterministic function of its texts (the trainer
    checks anyway that the per-token rewards sum to the task's total).
    """

    def __init__(self, components: Sequence[Component]) -> None:
        components = list(components)
        if not components:
            raise ObjectiveError("FineGrainedReward needs at least one Component")
        for c in components:
            if not isinstance(c, Component):
                raise ObjectiveError(f"components must be Component instances, got {c!r:.80}")
        names = [c.name for c in components]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ObjectiveError(f"component names must be unique, got {', '.join(map(repr, duplicates))} twice")
        self.components = components
        #: Per component, the last scored (segment texts, completion rows) and their scores.
        self._last_scores: dict[str, tuple[tuple, list[float]]] = {}

    def _scored(self, component: Component, pending: _Pending) -> list[float]:
        """:func:`_scored`, reusing the last call's scores when ``pending`` holds the same segments."""
        key = (tuple(pending.inputs), tuple(pending.rows))
        last = self._last_scores.get(component.name)
        if last is not None and last[0] == key:
            return list(last[1])
        values = _scored(component, pending)
        self._last_scores[component.name] = (key, values)
        return list(values)

    @property
    def causal(self) -> bool:
        return all(c.causal for c in self.components)

    def __repr__(self) -> str:
        parts = ", ".join(f"{c.weight:g}*{c.name}" for c in self.components)
        return f"FineGrainedReward({parts})"

    def __call__(
        self,
        texts: Sequence[str] | None,
        token_ids: torch.Tensor | Sequence[Sequence[int]],
        decode: Decode,
        *,
        mask: torch.Tensor | None = None,
        lengths: torch.Tensor | Sequence[int] | None = None,
        dtype: torch.dtype = torch.float64,
        device: torch.device | str | None = None,
    ) -> FineGrainedResult:
        """Score a batch of completions.

        Args:
            texts: the completions' texts, decoded from ``token_ids`` up to their lengths with ``decode``
                (``None``: decode them here).
            token_ids: ``[B, T]`` right-padded generated tokens, or a list of id lists.
            decode: token ids -> text, e.g. ``lambda ids: tok.decode(ids, skip_special_tokens=True)``.
            mask: ``[B, T]`` 1 on each completion's tokens (an EOS included), 0 on padding.
            lengths: valid tokens per completion, instead of ``mask``. Neither: every token is valid.
            dtype, device: of ``dense``, ``total`` and ``component_totals``.
        """
        rows, valid, width = _rows_and_lengths(token_ids, mask, lengths)
        if texts is not None and len(texts) != len(rows):
            raise AlignmentError(f"got {len(texts)} texts for {len(rows)} completions; pass one text each")
        char_ends = [token_char_ends(ids, decode, None if texts is None else texts[b]) for b, ids in enumerate(rows)]
        final = [decode(ids) if texts is None else texts[b] for b, ids in enumerate(rows)]
        pending = [self._collect(c, final, char_ends) for c in self.components]
        scores = [self._scored(c, p) for c, p in zip(self.components, pending)]
        return self._assemble(final, char_ends, width, pending, scores, dtype, device)

    score = __call__

    def totals(self, texts: Sequence[str], dtype: torch.dtype = torch.float64) -> torch.Tensor:
        r"""``[B]`` :math:`r(y) = \sum_k w_k \sum_j R_{kj}` from the texts alone (no tokens: the placement does not
        change the total); equal to :attr:`FineGrainedResult.total` of the same completions."""
        return self.totals_by_component(texts, dtype)[0]

    def totals_by_component(self, texts: Sequence[str], dtype: torch.dtype = torch.float64
                            ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        r"""From one scoring of the texts: :meth:`totals`, and per component its *unweighted* total
        :math:`\sum_j R_{kj}` (``[B]`` each; the task metrics of the components)."""
        texts = list(texts)
        no_tokens: list[list[int]] = [[] for _ in texts]
        per_row: list[list[float]] = [[] for _ in texts]
        components: dict[str, list[list[float]]] = {}
        for component in self.components:
            pending = self._collect(component, texts, no_tokens)
            raw = components[component.name] = [[] for _ in texts]
            for b, value in zip(pending.rows, self._scored(component, pending)):
                per_row[b].append(component.weight * value)
                raw[b].append(value)
        totals = torch.tensor([math.fsum(values) for values in per_row], dtype=dtype)
        return totals, {name: torch.tensor([math.fsum(v) for v in rows], dtype=dtype)
                        for name, rows in components.items()}

    @staticmethod
    def _collect(component: Component, texts: list[str], char_ends: list[list[int]]) -> _Pending:
        pending = _Pending()
        for b, (text, ends) in enumerate(zip(texts, char_ends)):
            spans = check_spans(component.segmenter(text), text, f"segmenter of component {component.name!r}")
            if not ends:
                tokens: list[int | None] = [None] * len(spans)
            elif getattr(component.segmenter, "completes_with_text", False):
                tokens = [len(ends) - 1] * len(spans)  # ends with the completion: on its last token (EOS)
            else:
                tokens = segment_end_tokens(spans, ends)
            for span, token in zip(spans, tokens):
                pending.rows.append(b)
                pending.spans.append(span)
                pending.tokens.append(token)
                pending.inputs.append(text[span[0]:span[1]] if component.reads == "segment" else text[: span[1]])
        return pending

    def _assemble(
        self,
        texts: list[str],
        char_ends: list[list[int]],
        width: int,
        pending: list[_Pending],
        scores: list[list[float]],
        dtype: torch.dtype,
        device: torch.device | str | None,
    ) -> FineGrainedResult:
        batch = len(texts)
        dense = [[0.0] * width for _ in range(batch)]
        totals = [[0.0] * batch for _ in self.components]
        segments: list[list[SegmentScore]] = [[] for _ in range(batch)]
        for k, (component, p, values) in enumerate(zip(self.components, pending, scores)):
            for b, span, token, value in zip(p.rows, p.spans, p.tokens, values):
                weighted = component.weight * value
                text = texts[b][span[0]:span[1]]
                segments[b].append(SegmentScore(component.name, span, text, token, value, weighted))
                if token is not None:
                    dense[b][token] += weighted
                    totals[k][b] += weighted
        def as_tensor(values: list) -> torch.Tensor:
            return torch.tensor(values, dtype=dtype, device=device)

        component_totals = {c.name: as_tensor(t) for c, t in zip(self.components, totals)}
        total = [math.fsum(t[b] for t in totals) for b in range(batch)]
        return FineGrainedResult(
            segments=segments,
            dense=as_tensor(dense).reshape(batch, width),
            total=as_tensor(total),
            component_totals=component_totals,
            char_ends=char_ends,
            causal=self.causal,
        )


# ----------------------------------------------------------------------------------------- token-level credit
def reward_to_go(
    dense_rewards: torch.Tensor, log_ratio: torch.Tensor, mask: torch.Tensor, beta: float
) -> torch.Tensor:
    r""":math:`G_t = \sum_{t'\ge t} m_{t'}\,(r_{t'}/\beta - \log\frac{\pi}{a}(y_{t'}\mid y_{<t'}))`, zero where
    ``mask`` is 0: the reverse-KL f-DPG pseudo-reward of the tokens at or after ``t`` (module docstring).

    Args:
        dense_rewards: ``[B, T]`` per-token rewards :math:`r_t` (:attr:`FineGrainedResult.dense`).
        log_ratio: ``[B, T]`` :math:`\log\pi_\theta(y_t\mid y_{<t}) - \log a(y_t\mid y_{<t})`.
        mask: ``[B, T]`` 1 on valid tokens.
        beta: :math:`\beta > 0` of :math:`P = a\exp(r/\beta)`.

    Returns a detached ``[B, T]`` weight in the inputs' promoted floating dtype; ``G[:, 0]`` is the
    sequence-level pseudo-reward without its constant :math:`-\log Z - 1`.
    """
    if isinstance(beta, bool) or not isinstance(beta, (int, float)) or not (math.isfinite(beta) and beta > 0):
        raise ObjectiveError(f"beta must be a positive finite number (the KL coefficient), got {beta!r}")
    shapes = {name: tuple(t.shape) for name, t in (("dense_rewards", dense_rewards), ("log_ratio", log_ratio),
                                                  ("mask", mask))}
    if len(set(shapes.values())) != 1 or dense_rewards.dim() != 2:
        raise ScoreError(f"reward_to_go needs three [batch, tokens] tensors of one shape, got {shapes}")
    valid = mask != 0
    wide = wide_dtype(dense_rewards)
    zero = torch.zeros((), dtype=wide, device=dense_rewards.device)
    # Padding may hold anything (NaN, -inf log-probabilities): select, never multiply by the mask.
    rewards = torch.where(valid, dense_rewards.detach().to(wide), zero)
    ratios = torch.where(valid, log_ratio.detach().to(wide), zero)
    check_no_nan(rewards, "dense_rewards")
    check_no_nan(ratios, "log_ratio")
    out_dtype = torch.promote_types(dense_rewards.dtype, log_ratio.dtype)
    if not out_dtype.is_floating_point:
        out_dtype = torch.get_default_dtype()
    per_token = rewards / beta - ratios
    to_go = torch.where(valid, per_token.flip(-1).cumsum(-1).flip(-1), zero)
    return to_go.to(out_dtype)
