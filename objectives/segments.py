r"""Segmenters: split a completion into the character spans that fine-grained rewards score.

A fine-grained reward (Wu et al. 2023, "Fine-grained human feedback gives better rewards for language
model training") scores a completion :math:`y` piece by piece: a segmenter cuts :math:`y` into segments
:math:`y_{s_1:e_1}, \dots, y_{s_m:e_m}` and each reward model scores each segment. This module only
produces the spans; :mod:`objectives.fine_grained` maps them onto tokens and scores them.

The span convention
-------------------
A segmenter is any callable ``text -> list[(start, end)]`` (the :class:`Segmenter` protocol) returning
half-open character offsets into ``text``, in order and non-overlapping:

.. math::  0 \le s_1 \le e_1 \le s_2 \le e_2 \le \dots \le s_m \le e_m \le |y|.

The built-in :func:`sentences` and :func:`sub_sentences` return **stripped** spans: each starts at a
non-whitespace character and ends right after one, so the whitespace before, between and after
segments belongs to no segment. This matters for the token alignment: with tokenizers whose tokens
carry a *leading* space (byte-level BPE ``"Ġword"``, SentencePiece ``"▁word"``), a segment that owned the
whitespace after it would end inside the next segment's first token, and its reward would land one
token late. A text that is empty or only whitespace has no sentences (``[]``).

:func:`whole_text` is the exception: it returns the entire text, whitespace included, as one span
``[(0, len(text))]``, even when the text is empty (``[(0, 0)]``), so that a holistic scorer scores
every completion (an empty one must be able to get a bad score, or emitting nothing becomes the
cheapest way to avoid penalties).

User-defined segmenters may return any spans that satisfy the inequalities above (empty spans
included, gaps allowed); :func:`check_spans` validates them and is applied to every segmenter's output
by :class:`~objectives.fine_grained.FineGrainedReward`.

Sentences
---------
:func:`sentences` is a small rule-based splitter (no model, no download). A sentence ends

* after a run of terminal punctuation ``.``, ``!``, ``?``, ``…`` (runs like ``?!`` or ``...``), taken
  together with any closing quotes or brackets right after it (``"``, ``'``, ``”``, ``’``, ``»``, ``)``,
  ``]``, ``}``) and any emoji or other symbols right after it (``"Great! 😀 See you."`` keeps its emoji
  with ``"Great!"``), when it is followed by whitespace and then by something that starts a sentence:
  an uppercase or caseless letter (CJK, Arabic, ...), a digit, or an opening quote or bracket;
  *except* after a single ``.`` that ends an abbreviation: a common one (``Mr.``, ``Mrs.``, ``Dr.``,
  ``St.``, ``vs.``, ``etc.``, ... see :data:`ABBREVIATIONS`), a dotted one (``e.g.``, ``i.e.``,
  ``U.S.``), or a single letter (an initial: ``J. K. Rowling``). Decimal numbers (``3.14``) never cut,
  since no whitespace follows their point;
* after CJK terminal punctuation (``。``, ``！``, ``？``) and its closers, whatever follows (these
  scripts do not put spaces between sentences);
* at a blank line (a paragraph break), always;
* at a single line break, unless the next line starts with a lowercase letter. Completions of language
  models use single line breaks for list items, headings, addresses and code far more often than for
  wrapping running prose, and a wrapped sentence that goes on usually goes on in lowercase.

A completion cut off mid-sentence (no final punctuation) keeps its last partial sentence as a segment.

Sub-sentences
-------------
:func:`sub_sentences` follows Wu et al.'s rule inside each sentence, with words = maximal runs of
non-whitespace characters: a sentence may be cut after a word ending in ``,``, ``;``, ``!`` or ``?``
(ignoring closing quotes/brackets after it) when at least ``min_words`` (5) words remain after the cut;
a piece shorter than ``min_words`` words is merged into the previous piece (the first piece, having no
previous one, runs on into the next instead).
"""

from __future__ import annotations

import operator
import re
import unicodedata
from collections.abc import Callable, Sequence
from typing import Protocol

from objectives.errors import ObjectiveError

Span = tuple[int, int]


class SegmentationError(ObjectiveError):
    """A segmenter name that is not known, or spans that break the span convention."""


class Segmenter(Protocol):
    """Anything that cuts a text into ordered, non-overlapping half-open character spans."""

    def __call__(self, text: str) -> list[Span]: ...


# ----------------------------------------------------------------------------------------- character classes
TERMINALS = ".!?…"
"""Terminal punctuation that ends a sentence when whitespace and a sentence start follow."""
CJK_TERMINALS = "。！？"
"""Terminal punctuation of scripts without spaces: ends a sentence whatever follows."""
CLOSERS = "\"'”’»)]}」』）"
"""Closing quotes and brackets that stay with the sentence they close."""
OPENERS = "\"'“‘«([{「『（¿¡"
"""Opening quotes and brackets that may start a sentence."""
SUB_SENTENCE_ENDS = ",;!?"
"""Word endings after which :func:`sub_sentences` may cut (Wu et al. 2023)."""

ABBREVIATIONS = frozenset({
    "mr", "mrs", "ms", "mx", "dr", "prof", "sr", "jr", "st", "mt", "ft", "vs", "etc", "cf", "al", "approx",
    "fig", "figs", "eq", "eqs", "ch", "sec", "vol", "pp", "ed", "eds", "inc", "ltd", "co", "corp", "dept",
    "gen", "gov", "sen", "rep", "lt", "col", "sgt", "capt", "rev", "hon", "ave", "blvd", "rd", "est",
})
"""Lowercased words (without their final period) after which a ``.`` does not end a sentence.

``no.`` is deliberately absent ("I said no. Then ..." is far more common in completions than "No. 5").
"""

_TERMINAL_RUN = re.compile(
    rf"(?:[{re.escape(TERMINALS)}]+|[{re.escape(CJK_TERMINALS)}]+)[{re.escape(CLOSERS)}]*"
)
_LINE_BREAK = re.compile(r"\r\n|\r|\n")
_BLANK_LINE = re.compile(r"(?:\r\n|\r|\n)[^\S\r\n]*(?:\r\n|\r|\n)")
_DOTTED = re.compile(r"^(?:[^\W\d_]\.)+[^\W\d_]$")  # e.g, i.e, u.s (the final period is the cut candidate)
_WORD = re.compile(r"\S+")
_VISIBLE = re.compile(r"\S")


# ----------------------------------------------------------------------------------------- validation
def check_spans(spans: Sequence[Sequence[int]], text: str, name: str = "segmenter") -> list[Span]:
    """Return ``spans`` as a list of ``(start, end)`` int tuples, or raise :class:`SegmentationError`.

    Spans must be half-open character offsets with ``0 <= start <= end <= len(text)``, each starting at
    or after the previous one's end (ordered, non-overlapping). ``name`` names the segmenter in errors.
    """
    if isinstance(spans, (str, bytes)) or not isinstance(spans, Sequence):
        raise SegmentationError(
            f"{name} must return a list of (start, end) character spans, got {type(spans).__name__} "
            f"{spans!r:.80}"
        )
    out: list[Span] = []
    previous_end = 0
    for i, span in enumerate(spans):
        try:
            start, end = (operator.index(v) for v in span)
        except (TypeError, ValueError) as exc:
            raise SegmentationError(
                f"{name} returned span {i} = {span!r:.60}, not a pair of integer character offsets "
                "(start, end); return half-open spans such as (0, 12)"
            ) from exc
        if not 0 <= start <= end <= len(text):
            raise SegmentationError(
                f"{name} returned span {i} = ({start}, {end}) for a text of {len(text)} characters; spans "
                f"need 0 <= start <= end <= len(text)"
            )
        if start < previous_end:
            raise SegmentationError(
                f"{name} returned span {i} = ({start}, {end}), which starts before the previous span's end "
                f"{previous_end}; return spans in text order, without overlaps"
            )
        out.append((start, end))
        previous_end = end
    return out


def segmenter_from_function(function: Callable[[str], Sequence[Sequence[int]]], name: str | None = None) -> Segmenter:
    """Wrap a user function ``text -> spans`` so that its output is validated by :func:`check_spans`."""
    if not callable(function):
        raise SegmentationError(f"a segmenter must be callable (text -> list of spans), got {function!r:.80}")
    label = name or getattr(function, "__name__", None) or repr(function)

    def segment(text: str) -> list[Span]:
        return check_spans(function(text), text, f"segmenter {label!r}")

    segment.__name__ = str(label)
    segment.__doc__ = getattr(function, "__doc__", None)
    return segment


# ----------------------------------------------------------------------------------------- helpers
def _stripped(text: str, start: int, end: int) -> Span | None:
    """The span ``[start, end)`` without its leading and trailing whitespace; ``None`` if nothing is left."""
    while start < end and text[start].isspace():
        start += 1
    while end > start and text[end - 1].isspace():
        end -= 1
    return (start, end) if start < end else None


def _pieces(text: str, cuts: set[int]) -> list[Span]:
    """Stripped, non-empty spans between consecutive cut positions (and the text's ends)."""
    bounds = [0, *sorted(c for c in cuts if 0 < c < len(text)), len(text)]
    spans = (_stripped(text, a, b) for a, b in zip(bounds, bounds[1:]))
    return [span for span in spans if span is not None]


def _next_visible(text: str, position: int) -> str | None:
    """The first non-whitespace character at or after ``position`` (``None`` if there is none)."""
    match = _VISIBLE.search(text, position)
    return match.group() if match else None


def _starts_sentence(character: str) -> bool:
    """An uppercase or caseless letter, a digit or an opening quote/bracket."""
    return (character.isalpha() and not character.islower()) or character.isdigit() or character in OPENERS


def _word_before(text: str, position: int) -> str:
    """The run of non-whitespace characters ending at ``position``, without opening quotes/brackets."""
    start = position
    while start > 0 and not text[start - 1].isspace():
        start -= 1
    return text[start:position].lstrip(OPENERS)


def _is_abbreviation(word: str) -> bool:
    lowered = word.lower()
    return lowered in ABBREVIATIONS or bool(_DOTTED.match(lowered)) or (len(word) == 1 and word.isalpha())


def _terminal_cuts(text: str) -> set[int]:
    """Cut positions after terminal punctuation (see the module docstring)."""
    cuts = set()
    for match in _TERMINAL_RUN.finditer(text):
        end = match.end()
        if end >= len(text):
            continue
        run = match.group().rstrip(CLOSERS)
        if any(c in CJK_TERMINALS for c in run):
            cuts.add(end)
            continue
        end = _after_trailing_symbols(text, end)
        if end >= len(text) or not text[end].isspace():
            continue
        following = _next_visible(text, end)
        if following is None or not _starts_sentence(following):
            continue
        if run == "." and _is_abbreviation(_word_before(text, match.start())):
            continue
        cuts.add(end)
    return cuts


def _is_symbol(character: str) -> bool:
    """Emoji and other symbols, with the joiners and variation selectors that build emoji sequences."""
    return unicodedata.category(character)[0] == "S" or character in "\u200d\ufe0e\ufe0f\u20e3"


def _after_trailing_symbols(text: str, position: int) -> int:
    """``position`` moved past whitespace-separated runs of symbols (emoji) that follow a sentence's end,
    so that "Great! 😀 See you." keeps its emoji with "Great!"; unchanged if no symbol follows."""
    while True:
        start = position
        while start < len(text) and text[start].isspace() and text[start] not in "\r\n":
            start += 1
        if start == len(text) or not _is_symbol(text[start]):
            return position
        while start < len(text) and _is_symbol(text[start]):
            start += 1
        position = start


def _line_cuts(text: str) -> set[int]:
    """Cut positions at blank lines (always) and at single line breaks not followed by lowercase."""
    cuts = {m.start() for m in _BLANK_LINE.finditer(text)}
    for match in _LINE_BREAK.finditer(text):
        following = _next_visible(text, match.end())
        if following is not None and not following.islower():
            cuts.add(match.start())
    return cuts


# ----------------------------------------------------------------------------------------- segmenters
def whole_text(text: str) -> list[Span]:
    """The whole text as one segment, whitespace included: ``[(0, len(text))]`` (``[(0, 0)]`` if empty).

    Its end is the completion's end, known only when generation stops: a fine-grained reward places it on the
    completion's last token (its EOS when it has one), as holistic rewards are (:attr:`completes_with_text`)."""
    return [(0, len(text))]


#: Segmenters whose segments end where the completion ends (placed on its last token, EOS included).
whole_text.completes_with_text = True  # type: ignore[attr-defined]


def sentences(text: str) -> list[Span]:
    """Stripped sentence spans by the rules of the module docstring (``[]`` for a blank text)."""
    return _pieces(text, _terminal_cuts(text) | _line_cuts(text))


def _ends_sub_sentence(word: str) -> bool:
    stripped = word.rstrip(CLOSERS)
    return bool(stripped) and stripped[-1] in SUB_SENTENCE_ENDS


def _split_sentence(text: str, start: int, end: int, min_words: int) -> list[Span]:
    """Wu et al.'s sub-sentence cuts inside one sentence ``text[start:end]``."""
    words = [(m.start(), m.end()) for m in _WORD.finditer(text, start, end)]
    piece_starts = [0]  # word indices where a piece begins
    for j in range(1, len(words)):
        previous = text[words[j - 1][0]:words[j - 1][1]]
        if not _ends_sub_sentence(previous) or len(words) - j < min_words:
            continue
        if j - piece_starts[-1] >= min_words:
            piece_starts.append(j)
        elif len(piece_starts) > 1:  # the current piece is short: merge it into the previous one
            piece_starts[-1] = j
        # else: a short first piece runs on into the next one
    bounds = [*piece_starts, len(words)]
    return [(words[a][0], words[b - 1][1]) for a, b in zip(bounds, bounds[1:])]


def sub_sentences(text: str, min_words: int = 5) -> list[Span]:
    """Stripped sub-sentence spans: each of :func:`sentences` cut by Wu et al.'s rule (module docstring)."""
    if not (isinstance(min_words, int) and min_words >= 1):
        raise SegmentationError(f"min_words must be a positive integer (words per sub-sentence), got {min_words!r}")
    spans: list[Span] = []
    for start, end in sentences(text):
        spans.extend(_split_sentence(text, start, end, min_words))
    return spans


SEGMENTERS: dict[str, Segmenter] = {"whole": whole_text, "sentence": sentences, "sub_sentence": sub_sentences}
"""The built-in segmenters by name (densities of Wu et al.: whole text, sentence, sub-sentence)."""

_ALIASES = {
    "whole_text": "whole", "sequence": "whole", "sentences": "sentence", "sub_sentences": "sub_sentence",
    "subsentence": "sub_sentence", "sub-sentence": "sub_sentence",
}


def register_segmenter(name: str, function: Callable[[str], Sequence[Sequence[int]]],
                       overwrite: bool = False) -> Segmenter:
    """Make ``name`` a segmenter of :func:`get_segmenter` (so of a reward's ``segmenter=NAME``): ``function`` maps a
    text to its spans ``[(start, end), ...]``, validated on every call by :func:`check_spans`. A built-in name is
    refused unless ``overwrite``. Put the call in a plugin (:mod:`fdpg.plugins`) to have it in every process."""
    key = str(name).strip().lower()
    if not key or key in _ALIASES:
        raise SegmentationError(f"register_segmenter: {name!r} is empty or an alias of a built-in segmenter")
    if key in SEGMENTERS and not overwrite:
        raise SegmentationError(f"register_segmenter: {key!r} is already a segmenter; pick another name or "
                                "overwrite=True")
    SEGMENTERS[key] = segmenter_from_function(function, key)
    return SEGMENTERS[key]


def get_segmenter(name: str | Segmenter) -> Segmenter:
    """A built-in segmenter by name (``"whole"``, ``"sentence"``, ``"sub_sentence"``), or a user callable
    wrapped by :func:`segmenter_from_function`."""
    if callable(name):
        return segmenter_from_function(name)
    if not isinstance(name, str):
        raise SegmentationError(f"segmenter must be a name or a callable, got {name!r:.80}")
    key = _ALIASES.get(name.strip().lower(), name.strip().lower())
    if key not in SEGMENTERS:
        raise SegmentationError(
            f"unknown segmenter {name!r}; choose one of {', '.join(map(repr, SEGMENTERS))} or pass a callable "
            "text -> list of (start, end) spans"
        )
    return SEGMENTERS[key]
