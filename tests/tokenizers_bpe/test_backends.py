"""The three encoders give the same ids: the native one (the default for the GPT-2 and GPT-4 patterns),
tiktoken's core (any other pattern) and the pure-Python reference (tokenizers_bpe.pybpe, the fallback
for a pattern tiktoken cannot compile); long pieces in all of them."""

from __future__ import annotations

import io
import json
import logging
import random
import sys
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import tokenizers_bpe
from tokenizers_bpe import BPETokenizer
from tokenizers_bpe.pybpe import _LONG_PIECE, _encode_long_piece, encode_piece

from .test_encoding import any_text, generated_texts

# any code point, lone surrogates included (hypothesis's character strategies leave them out)
unicode_with_surrogates = st.lists(st.one_of(st.characters(), st.integers(0xD800, 0xDFFF).map(chr)), max_size=200).map("".join)


def twin(tok: BPETokenizer, backend: str) -> BPETokenizer:
    return BPETokenizer(tok.mergeable_ranks, tok.pattern, tok.special_tokens, backend=backend)


def python_twin(tok: BPETokenizer) -> BPETokenizer:
    return twin(tok, "python")


@pytest.fixture(scope="module")
def trained_gpt4(play_text):
    return tokenizers_bpe.train_from_iterator([play_text], 1024, pattern="gpt4", workers=1)


@pytest.fixture(scope="module")
def tokenizers(gpt2, cl100k, trained, trained_gpt4):
    """name -> (the tokenizer as loaded, which encodes natively; its pure-Python twin)."""
    toks = {"gpt2": gpt2, "cl100k": cl100k, "trained-gpt2": trained, "trained-gpt4": trained_gpt4}
    for tok in toks.values():  # the extension takes both named patterns where it is built (make install)
        assert tok.backend == ("native" if tokenizers_bpe.tokenizer._native_bpe is not None else "tiktoken")
    return {name: (tok, python_twin(tok)) for name, tok in toks.items()}


@pytest.fixture(scope="module")
def tiktoken_twins(tokenizers):
    return {name: twin(tok, "tiktoken") for name, (tok, _) in tokenizers.items()}


NAMES = ["gpt2", "cl100k", "trained-gpt2", "trained-gpt4"]


@pytest.mark.parametrize("name", NAMES)
def test_ids_identical_on_shared_corpora(name, tokenizers, tiktoken_twins, shared_file):
    fast, reference = tokenizers[name]
    shakespeare = shared_file("tinyshakespeare.txt").read_text(encoding="utf-8")
    instruct = json.dumps(json.loads(shared_file("instruct/instruction-data.json").read_text(encoding="utf-8"))[:300],
                          ensure_ascii=False, indent=1)
    for text in (shakespeare[:300_000], instruct, *generated_texts(20)):
        ids = fast.encode(text, disallowed_special=())
        assert ids == reference.encode(text, disallowed_special=())
        assert ids == tiktoken_twins[name].encode(text, disallowed_special=())
    ids = fast.encode_ordinary(shakespeare)  # all of it, on the two fast paths
    assert ids == tiktoken_twins[name].encode_ordinary(shakespeare) and fast.decode(ids) == shakespeare


@pytest.mark.parametrize("name", NAMES)
@settings(max_examples=40, deadline=None)
@given(text=st.one_of(any_text, unicode_with_surrogates))
def test_ids_identical_on_random_unicode(name, tokenizers, tiktoken_twins, text):
    fast, reference = tokenizers[name]
    ids = fast.encode_ordinary(text)
    assert ids == reference.encode_ordinary(text) == tiktoken_twins[name].encode_ordinary(text)
    assert fast.encode(text, allowed_special="all") == reference.encode(text, allowed_special="all")


@pytest.mark.parametrize("backend", ["native", "tiktoken", "python"])
def test_lone_surrogates_are_replaced_the_same_way_by_every_path(gpt2, tiktoken_encoding, backend):
    if backend == "native" and tokenizers_bpe.tokenizer._native_bpe is None:
        pytest.skip("the native encoder is not built here")
    tok = twin(gpt2, backend)
    text = "ab\ud800cd\udfff"
    assert tok.encode(text) == tiktoken_encoding("gpt2").encode(text)
    assert tok.decode(tok.encode(text)) == "ab\ufffdcd\ufffd"
    assert tok.backend == backend


@pytest.mark.parametrize("char", ["^", "a", "1", " ", "\n", ".", "é", "🎉"])
def test_a_long_run_of_one_character_is_fast_on_every_path(tokenizers, tiktoken_twins, char):
    fast, reference = tokenizers["gpt2"]
    start = time.perf_counter()
    ids = fast.encode_ordinary(char * 10**6)  # tiktoken issue 245: it once panicked on "^" * 10**6
    assert time.perf_counter() - start < 20
    assert ids == tiktoken_twins["gpt2"].encode_ordinary(char * 10**6)
    start = time.perf_counter()
    assert reference.encode_ordinary(char * 100_000) == fast.encode_ordinary(char * 100_000)
    assert time.perf_counter() - start < 20  # quadratic, this was minutes
    assert fast.decode(ids) == char * 10**6


@settings(max_examples=60, deadline=None)
@given(data=st.data())
def test_the_long_piece_merge_equals_the_short_one(tokenizers, data):
    """The heap + linked list of long pieces picks the same merges as the rescanning list."""
    ranks = tokenizers[data.draw(st.sampled_from(NAMES))][0].mergeable_ranks
    alphabet = data.draw(st.sampled_from([b"ab", b"abc de", b" \n\t", b"ab\xc3\xa9 1", bytes(range(256))]))
    piece = bytes(data.draw(st.lists(st.sampled_from(alphabet), min_size=2, max_size=_LONG_PIECE - 1)))
    assert _encode_long_piece(ranks, piece) == encode_piece(ranks, piece)


def test_bpe_encode_counts_a_one_megabyte_piece_within_seconds(monkeypatch, capsys, tmp_path, gpt2):
    from tools import bpe_encode

    path = tmp_path / "tokenizer.json"
    gpt2.save(path)
    rng = random.Random(0)
    piece = "".join(rng.choice("abcdefghij") for _ in range(1 << 20))  # one word, no break
    monkeypatch.setattr("sys.stdin", io.StringIO(piece))
    start = time.perf_counter()
    assert bpe_encode.main(["--count", "-t", str(path), "-"]) == 0
    assert time.perf_counter() - start < 30
    assert int(capsys.readouterr().out) == len(gpt2.encode_ordinary(piece))


def test_a_pattern_tiktoken_cannot_compile_falls_back_with_one_warning(gpt2, caplog):
    pattern = r"\X|\s+|[^\S\s]{0}x7"  # \X (a grapheme) is the `regex` module's, not fancy-regex's
    with caplog.at_level(logging.WARNING, logger="tokenizers_bpe"):
        toks = [BPETokenizer(gpt2.mergeable_ranks, pattern) for _ in range(2)]
        ids = [tok.encode("héllo wörld") for tok in toks]
    assert [tok.backend for tok in toks] == ["python", "python"]
    assert ids[0] == ids[1] and toks[0].decode(ids[0]) == "héllo wörld"
    warnings = [r for r in caplog.records if "cannot compile" in r.getMessage()]
    assert len(warnings) == 1 and warnings[0].levelno == logging.WARNING
    with pytest.raises(ValueError, match="tiktoken cannot encode"):
        BPETokenizer(gpt2.mergeable_ranks, pattern, backend="tiktoken").encode("x")
    with pytest.raises(ValueError, match="backend must be"):
        BPETokenizer(gpt2.mergeable_ranks, backend="rust")


def test_a_custom_pattern_encodes_through_tiktoken_and_native_refuses_it(gpt2):
    pattern = r"\p{L}+|\p{N}|[^\p{L}\p{N}]+"
    tok = BPETokenizer(gpt2.mergeable_ranks, pattern)
    assert tok.encode("abc 123!") == twin(tok, "python").encode("abc 123!") and tok.backend == "tiktoken"
    with pytest.raises(ValueError, match="GPT-2 and GPT-4 patterns only"):
        BPETokenizer(gpt2.mergeable_ranks, pattern, backend="native").encode("x")


def test_without_the_native_module_encoding_goes_through_tiktoken(gpt2, monkeypatch):
    monkeypatch.setattr(tokenizers_bpe.tokenizer, "_native_bpe", None)  # as if it was not built
    tok = twin(gpt2, "auto")
    assert tok.encode("hello world") == gpt2.encode("hello world") and tok.backend == "tiktoken"
    with pytest.raises(ValueError, match="C module is not built"):
        twin(gpt2, "native").encode("x")


@pytest.mark.parametrize("name", ["gpt2", "trained-gpt4"])
def test_encode_batch_is_encode_on_every_path(tokenizers, tiktoken_twins, name):
    fast, reference = tokenizers[name]
    texts = [*generated_texts(30, seed=3), "a<|endoftext|>b", ""]
    for tok in (fast, tiktoken_twins[name], reference):
        assert tok.encode_batch(texts, num_threads=2, disallowed_special=()) == [reference.encode(t, disallowed_special=()) for t in texts]
        assert tok.encode_batch(texts, num_threads=2, allowed_special="all") == [reference.encode(t, allowed_special="all") for t in texts]
    with pytest.raises(ValueError, match="disallowed"):
        fast.encode_batch(texts, num_threads=2)


@pytest.mark.parametrize("pattern", [r"(\w+)|(\s+)|[^\w\s]+", r"'(?:[sdmt]|ll|ve|re)| ?(\p{L}+)| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"])
def test_a_pattern_with_capturing_groups_splits_into_whole_matches(play_text, pattern):
    """A user's pattern may hold groups: its pieces are the whole matches (as tiktoken splits), never
    the groups that ``findall`` would return. Training and both encoders agree."""
    tok = tokenizers_bpe.train_from_iterator([play_text[:200_000]], 600, pattern=pattern, workers=1)
    text = play_text[:20_000]
    ids = tok.to_tiktoken().encode_ordinary(text)
    assert python_twin(tok).encode(text) == ids == tok.encode(text)
    assert tok.decode(ids) == text
    merged = {tok.decode([i]) for i in range(256, tok.n_vocab - len(tok.special_tokens))}
    assert " the" in merged or "the" in merged  # merges of words, not of empty group leftovers
