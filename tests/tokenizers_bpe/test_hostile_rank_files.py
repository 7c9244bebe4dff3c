"""Rank files nothing should trust (issue 23): a vocabulary too large to handle in time, a token of a
megabyte, a token that is no merge of two lower ones. Each is answered in seconds, and the refusals are
one line that says what the file lacks."""

from __future__ import annotations

import base64
import json
import random
import time

import pytest

import tokenizers_bpe
import tokenizers_bpe.rankfiles
import tokenizers_bpe.tokenizer
from tokenizers_bpe import BPETokenizer
from tokenizers_bpe.errors import SettingError
from tokenizers_bpe.fileio import MAX_VOCAB_SIZE
from tokenizers_bpe.hf_tokenizer import all_merges
from tokenizers_bpe.pybpe import NO_RANK, split_token
from tokenizers_bpe.trainer import check_train_settings

BYTES = {bytes([i]): i for i in range(256)}


def reference_split(ranks, token, rank):
    """tiktoken's recovery of a merge, the plain way: BPE on the token's bytes with lower ranks only."""
    parts = [token[i : i + 1] for i in range(len(token))]
    while len(parts) > 2:
        best = min(range(len(parts) - 1), key=lambda i: (ranks.get(parts[i] + parts[i + 1], NO_RANK), i))
        if ranks.get(parts[best] + parts[best + 1], NO_RANK) >= rank:
            return None
        parts[best] += parts.pop(best + 1)
    return (ranks[parts[0]], ranks[parts[1]]) if len(parts) == 2 else None


@pytest.mark.parametrize("seed", range(4))
def test_long_tokens_split_as_the_plain_recovery_does(seed):
    rng = random.Random(seed)
    ranks = dict(BYTES)
    words = [b"a", b"b", b"c"]
    while len(ranks) < 256 + 400:  # random merges of what exists: long tokens of few letters, many cut points
        merged = rng.choice(words) + rng.choice(words)
        if merged not in ranks and len(merged) < 1500:
            ranks[merged] = len(ranks)
            words.append(merged)
    assert max(map(len, ranks)) >= 256  # the long-token path is taken
    for token, rank in ranks.items():
        if rank >= 256:
            expected = reference_split(ranks, token, rank)
            if expected is None:
                with pytest.raises(ValueError, match="no merge of two lower-ranked tokens"):
                    split_token(ranks, token, rank)
            else:
                assert split_token(ranks, token, rank) == expected


def doubling_vocabulary(length: int) -> dict[bytes, int]:
    ranks, size = dict(BYTES), 1
    while size < length:
        size *= 2
        ranks[b"a" * size] = len(ranks)
    return ranks


def test_a_token_of_a_quarter_megabyte_splits_in_about_a_second():
    ranks = doubling_vocabulary(1 << 18)
    start = time.perf_counter()
    tok = BPETokenizer(ranks)
    assert tok.merges[-1] == (len(ranks) - 2, len(ranks) - 2)
    assert time.perf_counter() - start < 20  # ~1 s here; the list rescan took hours


def test_a_megabyte_token_that_is_no_merge_is_a_short_error_and_exports_in_seconds():
    ranks = {**BYTES, b"ab": 256, b"x" * 1_000_000: 257}
    tok = BPETokenizer(ranks)
    assert tok.encode("ab") == [256]
    with pytest.raises(ValueError) as e:
        tok.merges
    assert "(1,000,000 bytes)" in str(e.value) and len(str(e.value)) < 400 and "tiktoken can encode" in str(e.value)
    start = time.perf_counter()
    assert (97, 98) in all_merges(tok)  # HF/GGUF exports: every cut of every token was tried (hours for this one)
    assert time.perf_counter() - start < 20


def rank_file(path, count):
    with open(path, "w") as f:
        for rank in range(count):
            token = bytes([rank]) if rank < 256 else b"t%d" % rank
            f.write(f"{base64.b64encode(token).decode()} {rank}\n")
    return path


def test_a_rank_file_larger_than_a_tokenizer_may_hold_is_refused_as_it_is_read(tmp_path, monkeypatch):
    monkeypatch.setattr(tokenizers_bpe.rankfiles, "MAX_VOCAB_SIZE", 300)
    with pytest.raises(ValueError, match="more than 300 ranks"):
        tokenizers_bpe.load_any(rank_file(tmp_path / "big.tiktoken", 301))
    assert tokenizers_bpe.load_any(rank_file(tmp_path / "fits.tiktoken", 300)).n_vocab == 300


def test_a_tokenizer_larger_than_the_limit_is_refused_from_every_source(tmp_path, monkeypatch):
    saved = tmp_path / "tokenizer.json"
    BPETokenizer({**BYTES, **{b"a" * (r - 254): r for r in range(256, 301)}}).save(saved)
    monkeypatch.setattr(tokenizers_bpe.tokenizer, "MAX_VOCAB_SIZE", 300)
    with pytest.raises(ValueError, match="more than a tokenizer may hold"):
        tokenizers_bpe.load(saved)
    with pytest.raises(ValueError, match="more than a tokenizer may hold"):
        BPETokenizer({**BYTES, **{b"t%d" % r: r for r in range(256, 301)}})
    with pytest.raises(SettingError, match="too large"):
        check_train_settings(MAX_VOCAB_SIZE + 1, ["<|endoftext|>"])
    check_train_settings(MAX_VOCAB_SIZE, ["<|endoftext|>"])


def test_special_token_names_of_a_transformers_directory_take_every_shape_it_writes(tmp_path):
    from tokenizers_bpe.errors import InputFileError
    from tokenizers_bpe.hf_tokenizer import hf_special_token_names

    assert hf_special_token_names(tmp_path) == set()
    (tmp_path / "special_tokens_map.json").write_text(json.dumps({
        "bos_token": "<s>", "eos_token": {"content": "</s>", "lstrip": False}, "additional_special_tokens": ["<a>", {"content": "<b>"}],
        "pad_token": None, "unk_token": 5, "model_max_length": 10, "other": "<not>"}))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"added_tokens_decoder": {"7": {"content": "<c>"}, "8": "odd"}, "eos_token": [[1]]}))
    assert hf_special_token_names(tmp_path) == {"<s>", "</s>", "<a>", "<b>", "<c>", "odd"}
    (tmp_path / "tokenizer_config.json").write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(InputFileError, match="tokenizer_config.json: nested more than"):
        hf_special_token_names(tmp_path)
