"""The native encoder (tokenizers_bpe/_native_bpe.c) against tiktoken, token for token: its character
classes are tiktoken's, its hand-written scanners split as the GPT-2 and GPT-4 pattern regexes do
(every code point, every alternative, their edges), and its merges are tiktoken's."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tokenizers_bpe import BPETokenizer
from tools import unicode_classes

# Built at install with the C compiler (optional: without one, encoding goes through tiktoken and
# test_backends.py covers that path); like the CPU decoding kernels, skipped where it could not be built.
Encoder = pytest.importorskip("tokenizers_bpe._native_bpe", reason="the native encoder is not built here (no C compiler at "
                                                                   "install)").Encoder


def test_the_character_classes_are_tiktokens():
    committed = unicode_classes.HEADER.read_text(encoding="utf-8")
    # (the first line names the tiktoken that wrote it; the classes must be the installed one's)
    assert committed.split("\n", 1)[1] == unicode_classes.header_text().split("\n", 1)[1], \
        "regenerate with: python -m tools.unicode_classes"


@pytest.fixture(scope="module")
def pairs(gpt2, cl100k):
    """name -> (our tokenizer, encoding natively; tiktoken built from the same ranks and pattern)."""
    import tiktoken

    out = {}
    for name, tok in (("gpt2", gpt2), ("cl100k", cl100k)):
        assert tok.backend == "native"
        out[name] = tok, tiktoken.Encoding(name, pat_str=tok.pattern, mergeable_ranks=tok.mergeable_ranks, special_tokens={})
    return out


@pytest.fixture(params=["gpt2", "cl100k"])
def pair(request, pairs):
    return pairs[request.param]


def test_every_code_point_in_every_neighbourhood(pair):
    tok, peer = pair
    rng = random.Random(0)
    points = [chr(c) for c in range(0x110000) if not 0xD800 <= c <= 0xDFFF]
    rng.shuffle(points)
    around = [" ", "  ", "'", "a", "1", ".", "\n", "\r\n", "\t", "\u3000", "'s", "'S"]
    text = "".join(c + rng.choice(around) if rng.random() < 0.5 else c for c in points)
    assert tok.encode_ordinary(text) == peer.encode_ordinary(text)


# Characters where the two patterns' alternatives meet: contractions (and U+017F, which GPT-4's
# case-insensitive [sdmt] takes for s), spaces before each class, runs of whitespace with and
# without line breaks, Unicode spaces, digits of other scripts, marks, emoji, other punctuation.
EDGES = list("'sSdDmMtTlLvVeErRxX ") + ["\u017f", "\n", "\r", "\t", "\x0b", "\x0c", "\x85", "\xa0", "\u2028", "\u3000",
                                          "1", "9", "\u0663", "\u00b2", "\u2166", ".", "!", "-", "\u0301", "\U0001f389",
                                          "\u200d", "\u00e9", "\u4e2d", "\x00", "_"]


@settings(max_examples=1000, deadline=None)
@given(text=st.lists(st.sampled_from(EDGES), max_size=40).map("".join))
def test_the_scanners_split_as_the_pattern_regexes(pairs, text):
    for tok, peer in pairs.values():
        assert tok.encode_ordinary(text) == peer.encode_ordinary(text), (tok.pattern, text)


@settings(max_examples=100, deadline=None)
@given(text=st.text(max_size=300))
def test_any_text(pairs, text):
    for tok, peer in pairs.values():
        assert tok.encode_ordinary(text) == peer.encode_ordinary(text)


@pytest.mark.parametrize("length", [2, 63, 64, 65, 300, 5000])
@pytest.mark.parametrize("unit", ["a", "ab", "-", " ", "\u00e9", "\U0001f469\u200d\U0001f4bb", "\xf0"])
def test_long_pieces_merge_as_tiktoken_does(pair, unit, length):
    """Both merge paths (the short scan, the tree of long pieces) and the edge between them."""
    tok, peer = pair
    text = (unit * length)[: max(length, 1)] if len(unit) == 1 else unit * (length // len(unit) + 1)
    assert tok.encode_ordinary(text) == peer.encode_ordinary(text)


def test_a_one_megabyte_piece_answers_within_seconds(pair):
    import time

    tok, peer = pair
    rng = random.Random(1)
    piece = "".join(rng.choice("abcdefghij") for _ in range(1 << 20))  # one word
    start = time.perf_counter()
    ids = tok.encode_ordinary(piece)
    assert time.perf_counter() - start < 10
    assert ids == peer.encode_ordinary(piece)


def test_the_encoder_checks_its_tokens():
    singles = [bytes([b]) for b in range(256)]
    assert Encoder(singles + [b"ab"], 0).encode("abab") == [256, 256]
    with pytest.raises(ValueError, match="twice"):
        Encoder(singles + [b"a"], 0)
    with pytest.raises(ValueError, match="byte 255 is not a token"):
        Encoder(singles[:255] + [b"ab"], 0)
    with pytest.raises(TypeError, match="non-empty bytes"):
        Encoder(singles + ["ab"], 0)
    with pytest.raises(ValueError, match="pattern must be"):
        Encoder(singles, 2)
    with pytest.raises(TypeError, match="takes a str"):
        Encoder(singles, 0).encode(b"x")


def test_tokens_outside_rank_order_keep_their_ids(gpt2):
    """GPT-2's single bytes are not ranks 0-255 in byte order: ids come from the ranks, not the bytes."""
    assert gpt2.mergeable_ranks[b"!"] == 0 and gpt2.encode_ordinary("! a") == [0, 257]
    reference = BPETokenizer(gpt2.mergeable_ranks, gpt2.pattern, backend="python")
    assert gpt2.encode_ordinary("\x00\xff ÿ") == reference.encode_ordinary("\x00\xff ÿ")
