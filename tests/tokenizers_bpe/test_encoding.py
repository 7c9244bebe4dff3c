"""Encoding/decoding: exact tiktoken parity (GPT-2, cl100k), round trips on arbitrary Unicode, the
special-token rules and the tiktoken-like API."""

from __future__ import annotations

import json
import random
import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import tokenizers_bpe

# Fragments that stress the pre-tokenizer and byte-level BPE: whitespace runs, CRLF, contractions,
# digits, emoji (with ZWJ and skin tones), combining marks, CJK, RTL, and special-token look-alikes.
TRICKY = [
    " ", "  ", "\n", "\n\n", "\r\n", "\t", " " * 40, "\n" * 7, "'s", "'LL", "don't", "123", "4567890",
    "🎉", "👨‍👩‍👧", "👍🏽", "e\u0301", "a\u0308\u0323", "中文字符", "日本語", "한국어", "مرحبا", "ℵ", "\u00a0",
    "\u3000", "<|endoftext|>", "<|fim_prefix|>", "<|", "|>", "Hello", " world", "!!!", "...", "\x00", "\u200b",
]
tricky_text = st.lists(st.one_of(st.sampled_from(TRICKY), st.text(max_size=8)), max_size=30).map("".join)
any_text = st.one_of(st.text(), tricky_text)


def generated_texts(n: int = 40, seed: int = 0) -> list[str]:
    """Random mixes of the tricky fragments and random code points (deterministic)."""
    rng = random.Random(seed)
    alphabet = [chr(c) for c in range(32, 0x3000) if not 0xD800 <= c < 0xE000]
    texts = []
    for _ in range(n):
        parts = [rng.choice(TRICKY) if rng.random() < 0.5 else "".join(rng.choices(alphabet, k=rng.randint(1, 12))) for _ in range(rng.randint(1, 60))]
        texts.append("".join(parts))
    return texts


# ------------------------------------------------------------------------------ tiktoken parity
@pytest.mark.parametrize("name", ["gpt2", "cl100k_base"])
def test_ids_equal_tiktoken_on_shared_corpora(name, gpt2, cl100k, tiktoken_encoding, shared_file):
    ours, ref = (gpt2 if name == "gpt2" else cl100k), tiktoken_encoding(name)
    shakespeare = shared_file("tinyshakespeare.txt").read_text(encoding="utf-8")
    records = json.loads(shared_file("instruct/instruction-data.json").read_text(encoding="utf-8"))
    instructions = "\n\n".join(" ".join(str(v) for v in r.values()) for r in records[:300])
    for text in (shakespeare, instructions, json.dumps(records[:50], indent=2)):
        assert ours.encode_ordinary(text) == ref.encode_ordinary(text)


@pytest.mark.parametrize("name", ["gpt2", "cl100k_base"])
def test_ids_equal_tiktoken_on_generated_text(name, gpt2, cl100k, tiktoken_encoding):
    ours, ref = (gpt2 if name == "gpt2" else cl100k), tiktoken_encoding(name)
    for text in generated_texts():
        assert ours.encode(text, allowed_special="all") == ref.encode(text, allowed_special="all")
        assert ours.encode_ordinary(text) == ref.encode_ordinary(text)


@settings(max_examples=60, deadline=None)
@given(text=any_text)
def test_gpt2_matches_tiktoken_and_round_trips(gpt2, tiktoken_encoding, text):
    ids = gpt2.encode(text, disallowed_special=())
    assert ids == tiktoken_encoding("gpt2").encode(text, disallowed_special=())
    assert gpt2.decode(ids) == text


@settings(max_examples=40, deadline=None)
@given(text=any_text)
def test_cl100k_matches_tiktoken(cl100k, tiktoken_encoding, text):
    assert cl100k.encode(text, allowed_special="all") == tiktoken_encoding("cl100k_base").encode(text, allowed_special="all")


def test_gpt2_from_files_equals_rank_file_and_known_ids(gpt2, shared_file):
    from_rank_file = tokenizers_bpe.load_tiktoken(shared_file("gpt2/gpt2.tiktoken"), pattern="gpt2", special_tokens={"<|endoftext|>": 50256})
    assert from_rank_file == gpt2
    assert gpt2.n_vocab == 50257 and gpt2.eot_token == 50256 and gpt2.special_tokens == {"<|endoftext|>": 50256}
    assert gpt2.encode("Hello world") == [15496, 995]


# ------------------------------------------------------------------------------ round trips
@settings(max_examples=80, deadline=None)
@given(text=any_text)
def test_trained_round_trips_arbitrary_unicode(trained, text):
    assert trained.decode(trained.encode_ordinary(text)) == text
    assert trained.decode_bytes(trained.encode(text, allowed_special="all")) == text.encode("utf-8")


def test_to_tiktoken_encodes_identically(trained, play_text):
    enc = trained.to_tiktoken()
    for text in [play_text[:20000], *generated_texts(10, seed=1)]:
        assert enc.encode(text, allowed_special="all") == trained.encode(text, allowed_special="all")


def test_round_trip_of_long_whitespace_and_repeats(gpt2, trained):
    for text in [" " * 5000, "\n" * 3000 + "x", "a" * 4000, "🎉" * 500, "ab" * 3000]:
        for tok in (gpt2, trained):
            assert tok.decode(tok.encode(text)) == text


# ------------------------------------------------------------------------------ API
def test_special_tokens_follow_tiktoken_rules(gpt2):
    text = "a<|endoftext|>b"
    with pytest.raises(ValueError, match="disallowed"):
        gpt2.encode(text)
    assert gpt2.encode(text, allowed_special={"<|endoftext|>"}) == [64, 50256, 65]
    assert gpt2.encode(text, allowed_special="all") == [64, 50256, 65]
    assert gpt2.encode(text, disallowed_special=()) == gpt2.encode_ordinary(text)
    assert 50256 not in gpt2.encode_ordinary(text)
    assert gpt2.encode_single_token("<|endoftext|>") == 50256


def test_decode_api(gpt2):
    ids = gpt2.encode("héllo 🎉")
    assert gpt2.decode_bytes(ids) == "héllo 🎉".encode()
    assert b"".join(gpt2.decode_tokens_bytes(ids)) == "héllo 🎉".encode()
    assert gpt2.decode_single_token_bytes(50256) == b"<|endoftext|>"
    emoji = gpt2.encode("🎉")
    assert len(emoji) > 1 and gpt2.decode(emoji[:1]) == "\ufffd"  # half a character, replaced
    with pytest.raises(UnicodeDecodeError):
        gpt2.decode(emoji[:1], errors="strict")


@pytest.mark.parametrize("bad", [50257, -1, 10**9, "7", 1.5, None])
def test_decode_rejects_ids_outside_vocabulary(gpt2, trained, bad):
    for tok in (gpt2, trained):
        with pytest.raises(ValueError, match=f"token id {bad!r} is not in the vocabulary"):
            tok.decode([1, bad, 2])


def test_encode_batch_equals_encode(gpt2, shared_file):
    lines = shared_file("tinyshakespeare.txt").read_text(encoding="utf-8").splitlines(keepends=True)
    texts = ["".join(lines[i : i + 200]) for i in range(0, len(lines), 200)]  # > 1 MB in all: runs in worker processes
    assert gpt2.encode_batch(texts, num_threads=2) == [gpt2.encode(t) for t in texts]
    assert gpt2.encode_batch(["a<|endoftext|>"], allowed_special="all") == [[64, 50256]]


def test_lone_surrogates_are_replaced_like_tiktoken(gpt2, tiktoken_encoding):
    text = "ab\ud800cd"
    assert gpt2.encode(text) == tiktoken_encoding("gpt2").encode(text)


def test_char_tokenizer_interface(play_text):
    tok = tokenizers_bpe.train_char([play_text])
    assert tok.decode(tok.encode(play_text)) == play_text
    assert tok.n_vocab == len(set(play_text)) + 1 and tok.eot_token == tok.n_vocab - 1
    assert tok.encode("a<|endoftext|>", allowed_special="all")[-1] == tok.eot_token
    assert tok.decode_single_token_bytes(tok.encode("a")[0]) == b"a"
    with pytest.raises(ValueError, match="U\\+1F389"):
        tok.encode("🎉")
    with pytest.raises(ValueError, match="not in the vocabulary"):
        tok.decode([tok.n_vocab])
    assert not tok.is_gpt2_compatible()
    with pytest.raises(ValueError, match="cannot be written as GPT-2"):
        tok.save_gpt2("e.json", "v.bpe")


# ------------------------------------------------------------------------------ fast pre-tokenizer
ascii_text = st.lists(
    st.one_of(st.sampled_from(["'s", "'LL", "'Ve", " ", "   ", "\n", "\r\n", "\r", "\t", "\x0b", "\x0c", "\x1c", "123456", "?!", " x", "\n\n", " \n"]), st.characters(max_codepoint=127)),
    max_size=40,
).map("".join)


@settings(max_examples=300, deadline=None)
@given(text=ascii_text)
def test_ascii_twin_patterns_split_like_regex(text):
    """The stdlib-`re` twins of the GPT-2/GPT-4 patterns give regex's pieces on any ASCII text."""
    from tokenizers_bpe.patterns import _ASCII_TWINS, compile_pattern

    for pattern, twin in _ASCII_TWINS.items():
        assert re.findall(twin, text) == compile_pattern(pattern).findall(text)


@pytest.mark.parametrize("line_end", ["\n", "\r\n"])
@pytest.mark.parametrize("pattern", ["gpt2", "gpt4"])
def test_block_splitting_of_mixed_text_gives_the_same_pieces(pattern, line_end, play_text):
    from tokenizers_bpe.patterns import compile_pattern, piece_splitter, resolve_pattern, safe_blocks

    rx = resolve_pattern(pattern)
    # mostly ASCII with a non-ASCII character every so often, so blocks of both kinds occur
    base = play_text * (1 + 300000 // len(play_text))
    text = (base[:100000] + "é \n\n  中\n" + base[100000:300000] + " 🎉\n").replace("\n", line_end)
    blocks = list(safe_blocks(text, 1 << 16, rx))
    assert "".join(blocks) == text and sorted({b.isascii() for b in blocks}) == [False, True]
    assert piece_splitter(rx)(text) == compile_pattern(rx).findall(text)


@settings(max_examples=300, deadline=None)
@given(text=st.lists(st.sampled_from(["a", "Z", "é", "1", "!", "'s", " ", "\t", "\n", "\r", "\r\n", "\u00a0", "中"]), max_size=60).map("".join))
def test_every_allowed_cut_keeps_the_pieces(text):
    """Cutting wherever safe_cut_regex allows (here: at every such place) changes no piece."""
    from tokenizers_bpe.patterns import compile_pattern, resolve_pattern, safe_blocks

    for name in ("gpt2", "gpt4"):
        rx = resolve_pattern(name)
        findall = compile_pattern(rx).findall
        assert [p for block in safe_blocks(text, 1, rx) for p in findall(block)] == findall(text)


def test_char_tokenizer_names_a_character_it_lacks():
    tok = tokenizers_bpe.train_char(["abc"])
    with pytest.raises(tokenizers_bpe.UnknownCharacterError, match=r"character 'z' \(U\+007A\) is not in this char-level vocabulary of 3"):
        tok.encode_ordinary("abz")
    assert issubclass(tokenizers_bpe.UnknownCharacterError, ValueError)


def test_special_token_ids_far_past_the_vocabulary_are_refused(tmp_path):
    # An id of 5000 in a 3-character vocabulary would give every model of it 5001 rows.
    d = tokenizers_bpe.train_char(["abc"]).to_dict()
    d["special_tokens"] = {"<|endoftext|>": 5000}
    (tmp_path / "t.json").write_text(json.dumps(d))
    with pytest.raises(ValueError, match="leave 4997 ids unused"):
        tokenizers_bpe.load(tmp_path / "t.json")
    d["special_tokens"] = {"<|endoftext|>": 20}  # a few unused ids, as tiktoken's own encodings have, are fine
    (tmp_path / "t.json").write_text(json.dumps(d))
    assert tokenizers_bpe.load(tmp_path / "t.json").n_vocab == 21
