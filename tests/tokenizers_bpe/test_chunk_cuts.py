"""tokenizers_bpe.patterns.chunk_cut_regex: the places gpt-prepare may cut text into chunks. Cut there,
text encodes to exactly the ids of the whole text (for the gpt2 and gpt4 patterns, small trained
tokenizers and the real GPT-2 / cl100k ranks), with or without line breaks."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import tokenizers_bpe
from tokenizers_bpe.patterns import GPT2_PATTERN, GPT4_PATTERN, chunk_cut_regex, compile_pattern

# One character of each class the patterns tell apart: ASCII and non-ASCII letters (upper, lower, CJK),
# contraction letters, digits (ASCII, Arabic-Indic, superscript), the apostrophe, punctuation, a combining
# mark, and whitespace (space, tab, LF, CR, no-break space, line separator).
ALPHABET = ["a", "Z", "é", "中", "1", "٣", "²", "!", "'", "s", "l", " ", "\t", "\n", "\r", "\u00a0", "\u0301", "\u2028"]

FRAGMENTS = [
    "Hello", " world", "don't", "'s", "'LL", "I've", "12345", " 678", "3.14", "٣٤٥", "x²", "!!!", "...", ", ", "--",
    " ", "  ", " " * 9, "\t", "\u00a0", "\u3000", "e\u0301", "中文字符", "日本語", "한국어", "مرحبا", "🎉", "👍🏽",
    "<|endoftext|>", "{\"k\":[1,2]}", "a_b", "\x00", "\u200b",
]
LINE_BREAKS = ["\n", "\n\n", "\r\n", "\r", " \n", "\n ", "\u2028"]


@st.composite
def texts(draw, newlines: bool | None = None):
    """Text built from the fragments (and random characters), with line breaks or without."""
    if newlines is None:
        newlines = draw(st.booleans())
    pool = FRAGMENTS + (LINE_BREAKS if newlines else [])
    alphabet = st.characters(blacklist_categories=("Cs",), blacklist_characters="" if newlines else "\n\r\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029")
    parts = draw(st.lists(st.one_of(st.sampled_from(pool), st.text(alphabet, max_size=6)), max_size=40))
    return "".join(parts)


def cut_positions(text: str, pattern: str | None) -> list[int]:
    return [m.start() for m in chunk_cut_regex(pattern).finditer(text)]


def pieces_in_chunks(findall, text: str, cuts: list[int]) -> list[str]:
    bounds = [0, *cuts, len(text)]
    return [p for a, b in zip(bounds, bounds[1:]) for p in findall(text[a:b])]


# ------------------------------------------------------------------------------ the rule itself
@pytest.mark.parametrize("pattern", [GPT2_PATTERN, GPT4_PATTERN], ids=["gpt2", "gpt4"])
def test_every_cut_of_every_short_text_keeps_the_pieces(pattern):
    """Exhaustive over the alphabet up to 4 characters (about 110,000 texts): each cut alone changes no piece."""
    findall = compile_pattern(pattern).findall
    checked = 0
    for n in range(2, 5):
        for chars in itertools.product(ALPHABET, repeat=n):
            text = "".join(chars)
            positions = cut_positions(text, pattern)
            if positions:
                whole = findall(text)
                for p in positions:
                    assert findall(text[:p]) + findall(text[p:]) == whole, (text, p)
                    checked += 1
    assert checked > 50000  # the rule finds cuts in most of these texts: the test is not vacuous


def test_where_the_named_patterns_cut():
    text = "Hello world, it's 2024!! ok\n\nnext"
    #       after o, d, t, s (before the space or "'"), 4, k; between "\n" and "\n" never
    expected = [5, 11, 15, 17, 22, 27]
    assert cut_positions(text, GPT2_PATTERN) == expected
    assert cut_positions(text, GPT4_PATTERN) == expected
    # a line start after a non-space line end: GPT-2 between "\r" and "\n", GPT-4 after "\r\n"
    assert cut_positions("?\r\n!", GPT2_PATTERN) == [2] and cut_positions("?\r\n!", GPT4_PATTERN) == [3]
    # text with neither a letter/digit edge nor a line start has no cut
    assert cut_positions("!!! ... ???", GPT2_PATTERN) == [] and cut_positions("abcdef", GPT4_PATTERN) == []


def test_no_cut_beside_a_character_the_unicode_versions_disagree_on():
    """U+3D000 is a letter to `regex` 2026.12 (Unicode 17), unassigned to tiktoken 0.14 (whose classes
    the native encoder has) and to Python 3.11: the cut after it, a letter edge to `regex`, split a
    piece of the encoders ('\U0003d000:' of the whole text; hypothesis found cl100k encoding the chunks
    of '\U0003d000:a_b' otherwise). Only the edge between two assigned characters is taken."""
    for pattern in (GPT2_PATTERN, GPT4_PATTERN):
        assert cut_positions("\U0003d000:a_b", pattern) == [3]
        assert cut_positions("a\U0003d000 b1\U0003d001", pattern) == [4]  # (b|1 only)


def test_char_level_cuts_anywhere_and_a_custom_pattern_only_at_line_starts():
    assert cut_positions("ab c\nd", None) == [1, 2, 3, 4, 5]
    custom = r"\S+|\s+"
    assert cut_positions("ab cd\nef\n gh\n\nij", custom) == [6]  # not before a space, nor after a blank line


@settings(max_examples=300, deadline=None)
@given(text=texts())
def test_cutting_everywhere_at_once_keeps_the_pieces(text):
    for pattern in (GPT2_PATTERN, GPT4_PATTERN):
        findall = compile_pattern(pattern).findall
        assert pieces_in_chunks(findall, text, cut_positions(text, pattern)) == findall(text)


# ------------------------------------------------------------------------------ ids
@pytest.fixture(scope="module")
def trained_gpt4(play_text):
    return tokenizers_bpe.train_from_iterator([play_text], 1024, pattern="gpt4", workers=1)


@pytest.fixture(scope="module")
def tokenizers(trained, trained_gpt4, gpt2, cl100k):
    """Small tokenizers trained here (gpt2 and gpt4 patterns) and the real GPT-2 and cl100k ranks."""
    assert trained.pattern == GPT2_PATTERN and trained_gpt4.pattern == GPT4_PATTERN
    return {"trained-gpt2": trained, "trained-gpt4": trained_gpt4, "gpt2": gpt2, "cl100k_base": cl100k}


def _check_ids(tokenizers, text, keep):
    for name, tok in tokenizers.items():
        positions = cut_positions(text, tok.pattern)
        chosen = [p for i, p in enumerate(positions) if keep(i)]
        bounds = [0, *chosen, len(text)]
        chunked = [i for a, b in zip(bounds, bounds[1:]) for i in tok.encode_ordinary(text[a:b])]
        assert chunked == tok.encode_ordinary(text), (name, text, chosen)


@pytest.mark.parametrize("newlines", [False, True], ids=["without-line-breaks", "with-line-breaks"])
@settings(max_examples=150, deadline=None)
@given(data=st.data())
def test_text_chunked_at_the_cuts_encodes_to_the_whole_texts_ids(tokenizers, newlines, data):
    text = data.draw(texts(newlines=newlines), "text")
    every_other = data.draw(st.integers(1, 3), "every_other")
    _check_ids(tokenizers, text, lambda i: True)
    _check_ids(tokenizers, text, lambda i: i % every_other == 0)


def test_a_long_line_of_prose_has_cuts_all_along_it(tokenizers, play_text):
    line = play_text.replace("\n", " ")[:20000]
    for name, tok in tokenizers.items():
        positions = cut_positions(line, tok.pattern)
        assert len(positions) > 2000 and max(b - a for a, b in zip(positions, positions[1:])) < 100, name
        _check_ids({name: tok}, line, lambda i: i % 7 == 0)
