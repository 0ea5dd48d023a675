"""Segmenters: sentence and sub-sentence spans on tricky texts, the span convention, user segmenters."""

from __future__ import annotations

import pytest

from objectives.errors import ObjectiveError
from objectives.segments import (
    SegmentationError,
    check_spans,
    get_segmenter,
    segmenter_from_function,
    sentences,
    sub_sentences,
    whole_text,
)


def texts(segmenter, text: str) -> list[str]:
    return [text[start:end] for start, end in segmenter(text)]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Dr. Smith went to Washington. He left.", ["Dr. Smith went to Washington.", "He left."]),
        ("Mrs. Jones met Mr. Brown vs. Prof. X at St. Paul. They talked.",
         ["Mrs. Jones met Mr. Brown vs. Prof. X at St. Paul.", "They talked."]),
        ("Bring fruit, e.g. Apples or i.e. Pears. Then go.", ["Bring fruit, e.g. Apples or i.e. Pears.", "Then go."]),
        ("J. K. Rowling wrote it. The U.S. Army read it.", ["J. K. Rowling wrote it.", "The U.S. Army read it."]),
        ('He said "Stop!" Then he left.', ['He said "Stop!"', "Then he left."]),
        ('He said "Stop!" and left.', ['He said "Stop!" and left.']),
        ("(It rained.) We stayed in.", ["(It rained.)", "We stayed in."]),
        ('She asked: "Why?" "Because," he said.', ['She asked: "Why?"', '"Because," he said.']),
        ("Pi is 3.14 or so. It is irrational.", ["Pi is 3.14 or so.", "It is irrational."]),
        ("It cost 12.50 dollars in 2023. 42 people paid.", ["It cost 12.50 dollars in 2023.", "42 people paid."]),
        ("Wait... What?! No way.", ["Wait...", "What?!", "No way."]),
        ("Hmm... maybe later. Fine…  Bye", ["Hmm... maybe later.", "Fine…", "Bye"]),
        ("It was late. And then the", ["It was late.", "And then the"]),
        ("no punctuation at all", ["no punctuation at all"]),
        ("Café au lait. Émile est là.", ["Café au lait.", "Émile est là."]),
        ("Great job! 😀 See you soon.", ["Great job! 😀", "See you soon."]),
        ("Great job! 😀 see you", ["Great job! 😀 see you"]),
        ("我爱你。你好吗？好的", ["我爱你。", "你好吗？", "好的"]),
        ("Это мир. Да.", ["Это мир.", "Да."]),
    ],
)
def test_sentences(text: str, expected: list[str]) -> None:
    assert texts(sentences, text) == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("first part\n\nsecond part", ["first part", "second part"]),  # a blank line always ends a sentence
        ("one\n  \n\ntwo", ["one", "two"]),
        ("Dear John,\nThanks for the letter.", ["Dear John,", "Thanks for the letter."]),
        ("The quick brown fox\njumps over the dog.", ["The quick brown fox\njumps over the dog."]),  # wrapped
        ("Steps:\n- mix\n- bake\n1. eat", ["Steps:", "- mix", "- bake", "1. eat"]),
        ("Dr.\nSmith", ["Dr.", "Smith"]),  # the line break decides, not the abbreviation
        ("End.\r\nNext line", ["End.", "Next line"]),
    ],
)
def test_sentences_at_line_breaks(text: str, expected: list[str]) -> None:
    assert texts(sentences, text) == expected


SAMPLES = [
    "  Dr. Smith went to Washington.  He left!\n\n  New paragraph, with words, and more words here; yes. ",
    "Wait... What?! No way. \t",
    "",
    "   \n  ",
    "x",
    "We tried it, it worked, and then, finally, we all went home for the long weekend. Bye 😀 now",
]


@pytest.mark.parametrize("segmenter", [sentences, sub_sentences])
@pytest.mark.parametrize("text", SAMPLES)
def test_spans_are_stripped_ordered_and_cover_every_visible_character(segmenter, text: str) -> None:
    spans = segmenter(text)
    assert check_spans(spans, text) == spans
    for start, end in spans:
        assert start < end and not text[start].isspace() and not text[end - 1].isspace()
    gaps = [text[a:b] for a, b in zip([0] + [e for _, e in spans], [s for s, _ in spans] + [len(text)])]
    assert all(gap.strip() == "" for gap in gaps)  # only whitespace lies outside the segments


def test_whole_text_keeps_everything_even_when_empty() -> None:
    assert whole_text("  hi there. ") == [(0, 12)]
    assert whole_text("") == [(0, 0)]
    assert sentences("") == [] and sentences(" \n ") == [] and sub_sentences("") == []


def test_sub_sentences_cut_after_a_comma_with_five_words_left() -> None:
    text = "After the long meeting ended, everyone went home to rest."
    assert texts(sub_sentences, text) == ["After the long meeting ended,", "everyone went home to rest."]
    assert texts(sentences, text) == [text]


def test_sub_sentences_do_not_cut_with_fewer_than_five_words_left() -> None:
    assert texts(sub_sentences, "After the long meeting ended, we went home.") == [
        "After the long meeting ended, we went home."
    ]


def test_sub_sentences_merge_short_pieces_into_the_previous_one() -> None:
    text = "The weather was very nice, we went out, and then we walked along the river."
    assert texts(sub_sentences, text) == [
        "The weather was very nice, we went out,", "and then we walked along the river."
    ]


def test_a_short_first_sub_sentence_runs_on_into_the_next() -> None:
    assert texts(sub_sentences, "Yes, I think that this is true.") == ["Yes, I think that this is true."]
    text = "Well, I guess that we should go; the train leaves in ten minutes."
    assert texts(sub_sentences, text) == ["Well, I guess that we should go;", "the train leaves in ten minutes."]


def test_sub_sentences_stay_inside_sentences_and_take_min_words() -> None:
    text = "One two three four five, six. Seven eight nine ten eleven, twelve thirteen fourteen fifteen sixteen!"
    assert texts(sub_sentences, text) == [
        "One two three four five, six.", "Seven eight nine ten eleven,", "twelve thirteen fourteen fifteen sixteen!"
    ]
    assert texts(lambda t: sub_sentences(t, min_words=1), "a, b, c.") == ["a,", "b,", "c."]
    assert texts(lambda t: sub_sentences(t, min_words=3), "a, b, c d.") == ["a, b, c d."]
    assert texts(lambda t: sub_sentences(t, min_words=1), "a, b, c d.") == ["a,", "b,", "c d."]
    assert texts(lambda t: sub_sentences(t, min_words=2), 'He said "no," and "yes," again, then left.') == [
        'He said "no,"', 'and "yes," again,', "then left."
    ]
    with pytest.raises(SegmentationError, match="min_words must be a positive integer"):
        sub_sentences(text, min_words=0)


@pytest.mark.parametrize(
    ("spans", "message"),
    [
        ([(0, 3), (2, 5)], r"span 1 = \(2, 5\), which starts before the previous span's end 3"),
        ([(0, 20)], r"span 0 = \(0, 20\) for a text of 11 characters"),
        ([(4, 2)], r"span 0 = \(4, 2\)"),
        ([(-1, 2)], r"0 <= start <= end <= len\(text\)"),
        ([(0.5, 2)], "not a pair of integer character offsets"),
        ([(0, 1, 2)], "not a pair"),
        ("oops", "must return a list of"),
    ],
)
def test_check_spans_rejects_bad_user_spans(spans, message: str) -> None:
    with pytest.raises(SegmentationError, match=message) as info:
        segmenter_from_function(lambda text: spans, name="mine")("hello world")
    assert "segmenter 'mine'" in str(info.value)
    assert isinstance(info.value, ObjectiveError) and isinstance(info.value, ValueError)


def test_user_segmenters_and_names() -> None:
    words = segmenter_from_function(lambda text: [[0, 5], (6, 11)], name="words")
    assert words("hello world") == [(0, 5), (6, 11)]
    assert check_spans([(0, 0), (0, 0), (2, 2)], "abc") == [(0, 0), (0, 0), (2, 2)]  # empty spans are allowed
    assert get_segmenter("whole") is whole_text
    assert get_segmenter("sentence") is sentences and get_segmenter("Sentences") is sentences
    assert get_segmenter("sub_sentence") is sub_sentences and get_segmenter("sub-sentence") is sub_sentences
    assert get_segmenter(lambda text: [(0, 1)])("ab") == [(0, 1)]
    with pytest.raises(SegmentationError, match=r"unknown segmenter 'paragraph'; choose one of 'whole'"):
        get_segmenter("paragraph")
    with pytest.raises(SegmentationError, match="must be callable"):
        segmenter_from_function(3)  # type: ignore[arg-type]
