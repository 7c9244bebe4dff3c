"""The incremental trainer against an obviously-correct reference (a full recount per merge), plus
determinism, pre-tokenization chunking and save/load round trips."""

from __future__ import annotations

import mmap
import random
from collections import Counter

import pytest

import tokenizers_bpe
from tokenizers_bpe.patterns import compile_pattern, resolve_pattern
from tokenizers_bpe import merging
from tokenizers_bpe.trainer import _safe_chunks, count_pieces, learn_merges

from .reference_merges import learn_merges as word_list_merges


def reference_merges(piece_counts: dict[bytes, int], n_merges: int, min_frequency: int = 1, stats=None):
    """Textbook BPE, recounting every pair from scratch for every merge. The rules it spells out
    are the documented ones: the highest count wins; ties go to the smallest (left id, right id);
    a pair whose bytes already form a token is never merged; stop below min_frequency."""
    words = [(list(piece), n) for piece, n in piece_counts.items()]
    vocab = [bytes([i]) for i in range(256)]
    merges = []
    while len(merges) < n_merges:
        counts = Counter()
        for word, n in words:
            for pair in zip(word, word[1:]):
                counts[pair] += n
        candidates = [(c, p) for p, c in counts.items() if vocab[p[0]] + vocab[p[1]] not in vocab]
        if not candidates:
            break
        best_count = max(c for c, _ in candidates)
        if best_count < min_frequency:
            break
        tied = [p for c, p in candidates if c == best_count]
        a, b = min(tied)
        if stats is not None:
            stats["ties"] += len(tied) > 1
        new_id = len(vocab)
        vocab.append(vocab[a] + vocab[b])
        merges.append((a, b))
        for k, (word, n) in enumerate(words):
            out, i = [], 0
            while i < len(word):
                if i + 1 < len(word) and word[i] == a and word[i + 1] == b:
                    out.append(new_id)
                    i += 2
                else:
                    out.append(word[i])
                    i += 1
            words[k] = (out, n)
    return merges


def pieces_of(text: str, pattern: str = "gpt2") -> dict[bytes, int]:
    return dict(Counter(p.encode() for p in compile_pattern(resolve_pattern(pattern)).findall(text)))


def _random_text(seed: int, alphabet: str, n: int) -> str:
    rng = random.Random(seed)
    return "".join(rng.choice(alphabet) for _ in range(n))


CORPORA = {
    "repeats": "aaaaaaa aaaa aaa aa a abababab ababa abab aaabbb " * 5,  # overlapping and (X, X) pairs
    "small-alphabet": _random_text(1, "ab ", 3000),  # many ties and pairs reachable by two splits
    "letters": _random_text(2, "abcde \n", 2500),
    "unicode": _random_text(3, "aé中🎉 \n", 1500),
}


@pytest.mark.parametrize("name", list(CORPORA))
def test_incremental_trainer_matches_reference(name):
    pieces = pieces_of(CORPORA[name])
    for min_frequency in (1, 3):
        expected = reference_merges(pieces, 300, min_frequency)
        assert learn_merges(pieces, 300, min_frequency=min_frequency) == expected


def test_incremental_trainer_matches_reference_on_shakespeare(play_text):
    pieces = pieces_of(play_text[:12000], "gpt4")
    assert learn_merges(pieces, 150) == reference_merges(pieces, 150)


@pytest.mark.parametrize("init", ["python", "numpy"])
@pytest.mark.parametrize("pattern", ["gpt2", "gpt4"])
@pytest.mark.parametrize("min_frequency", [1, 2, 5])
def test_flat_array_trainer_matches_the_word_list_trainer_it_replaced(shared_file, play_text, pattern, min_frequency, init,
                                                                      monkeypatch):
    """Merge for merge what the previous implementation (reference_merges.py, kept verbatim) learned, with
    the arrays built by the Python loop (small corpora) and by numpy (large ones)."""
    monkeypatch.setattr(merging, "PYTHON_INIT_MAX_SLOTS", 2**31 if init == "python" else 0)
    shakespeare = shared_file("tinyshakespeare.txt").read_text(encoding="utf-8")
    for text in (shakespeare[:400_000], play_text, CORPORA["repeats"] * 20 + CORPORA["unicode"]):
        pieces = pieces_of(text, pattern)
        expected = word_list_merges(dict(pieces), 2000, min_frequency=min_frequency)
        assert learn_merges(pieces, 2000, min_frequency=min_frequency) == expected
        assert learn_merges(list(pieces.items())[::-1], 2000, min_frequency=min_frequency) == expected  # order-free


@pytest.mark.parametrize("min_frequency", [1, 3])
def test_arrays_mapped_from_a_file_give_the_same_merges_and_stay_under_the_limit(tmp_path, play_text, min_frequency,
                                                                                  monkeypatch):
    """With a memory budget the merge phase's arrays live in a scratch file (gone afterwards) whose pages
    are dropped whenever the resident memory is over the limit: the merges do not change."""
    pieces = pieces_of(play_text * 3, "gpt2")
    expected = learn_merges(pieces, 1500, min_frequency=min_frequency)
    assert learn_merges(pieces, 1500, min_frequency=min_frequency, scratch_dir=tmp_path, rss_limit=2**62) == expected
    drops, rss = [], iter(range(10**9))  # every other look at the resident memory finds it over the limit
    monkeypatch.setattr(merging, "current_rss", lambda: next(rss) % 2 * 2**40)
    monkeypatch.setattr(merging.ScratchArrays, "drop_resident", lambda self: drops.append(1) or self.mm.madvise(mmap.MADV_DONTNEED))
    monkeypatch.setattr(merging, "_OCCURRENCES_PER_CHECK", 7)
    assert learn_merges(pieces, 1500, min_frequency=min_frequency, scratch_dir=tmp_path, rss_limit=2**30) == expected
    assert len(drops) > 1000 and list(tmp_path.iterdir()) == []


def test_a_merge_phase_whose_pair_counts_alone_outgrow_the_budget_stops(tmp_path, play_text, monkeypatch):
    monkeypatch.setattr(merging, "current_rss", lambda: 2**40)
    with pytest.raises(merging.MemoryBudgetError, match="for its pair counts"):
        learn_merges(pieces_of(play_text, "gpt2"), 500, scratch_dir=tmp_path, rss_limit=2**30, max_bytes=2**29)
    assert list(tmp_path.iterdir()) == []


def test_reference_corpora_exercise_the_tie_break():
    """The comparison above means something only if counts tie often (so the rule decides)."""
    stats = Counter()
    for text in CORPORA.values():
        reference_merges(pieces_of(text), 300, stats=stats)
    assert stats["ties"] > 50


def test_train_builds_the_documented_ids():
    tok = tokenizers_bpe.train_from_iterator(["hello hello hello world"], 260, special_tokens=("<|endoftext|>", "<|pad|>"), workers=1)
    assert tok.n_vocab == 260
    assert tok.special_tokens == {"<|endoftext|>": 258, "<|pad|>": 259} and tok.eot_token == 258
    # "el", "he", "ll", "lo" all occur 3 times: the smallest (left, right) = ("e", "l") wins; then "h"+"el"
    assert tok.merges == [(ord("e"), ord("l")), (ord("h"), 256)]
    assert tok.decode_single_token_bytes(257) == b"hel"


def test_vocab_larger_than_corpus_stops_and_warns():
    with pytest.warns(UserWarning, match="only supports a vocabulary of 260"):
        tok = tokenizers_bpe.train_from_iterator(["abcd"], 1000, workers=1)
    assert tok.n_vocab == 260 and tok.encode("abcd") == [258]  # 3 merges + 1 special


def test_special_tokens_in_the_corpus_are_not_learned():
    with pytest.warns(UserWarning, match="vocabulary of 258"):  # only "ab" is left to merge
        tok = tokenizers_bpe.train_from_iterator(["<|endoftext|>" * 50 + "ab"], 300, workers=1)
    assert all(b"|" not in tok.decode_single_token_bytes(i) for i in range(256, tok.n_vocab - 1))


@pytest.mark.parametrize("line_end", ["\n", "\r\n"])
@pytest.mark.parametrize("pattern", ["gpt2", "gpt4"])
def test_safe_chunks_give_the_same_pieces_as_one_scan(play_text, pattern, line_end):
    text = (play_text[:60000] + "end  \nx\n\n \ny !\nz\r\n\r\nw \r\nv").replace("\n", line_end)
    rx = resolve_pattern(pattern)
    chunks = list(_safe_chunks([text[i : i + 997] for i in range(0, len(text), 997)], rx, size=2000))
    assert len(chunks) > 10 and "".join(chunks) == text
    assert count_pieces(chunks, rx, workers=1) == Counter(compile_pattern(rx).findall(text))


def test_training_is_deterministic_across_workers_and_chunking(tmp_path, play_text):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(play_text * 3, encoding="utf-8")  # > 1 read block: several chunks
    one = tokenizers_bpe.train([corpus], 600, workers=1, progress=False)
    two = tokenizers_bpe.train([corpus], 600, workers=2, progress=False)
    from_text = tokenizers_bpe.train_from_iterator([play_text * 3], 600, workers=1)
    one.save(tmp_path / "a.json")
    two.save(tmp_path / "b.json")
    assert (tmp_path / "a.json").read_bytes() == (tmp_path / "b.json").read_bytes()
    assert one.merges == from_text.merges


def test_save_load_round_trip(tmp_path, trained, gpt2):
    for tok in (trained, gpt2, tokenizers_bpe.train_char(["hello world"])):
        tok.save(tmp_path / "t.json")
        loaded = tokenizers_bpe.load(tmp_path / "t.json")
        assert loaded == tok and loaded.fingerprint() == tok.fingerprint() and type(loaded) is type(tok)
        assert loaded.special_tokens == tok.special_tokens and loaded.n_vocab == tok.n_vocab
    assert trained.fingerprint() != gpt2.fingerprint()


def test_tiktoken_and_gpt2_file_round_trips(tmp_path, trained):
    trained.save_tiktoken(tmp_path / "t.tiktoken")
    again = tokenizers_bpe.load_tiktoken(tmp_path / "t.tiktoken", pattern=trained.pattern, special_tokens=trained.special_tokens)
    assert again == trained
    assert trained.is_gpt2_compatible()
    trained.save_gpt2(tmp_path / "encoder.json", tmp_path / "vocab.bpe")
    again = tokenizers_bpe.load_gpt2(tmp_path / "encoder.json", tmp_path / "vocab.bpe")
    assert again.mergeable_ranks == trained.mergeable_ranks and again.special_tokens == trained.special_tokens


def test_gpt2_files_load_in_hf_tokenizers(tmp_path, trained, play_text):
    """The GPT-2 export is what HF's byte-level BPE reads, and it encodes the same."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    trained.save_gpt2(tmp_path / "vocab.json", tmp_path / "merges.txt")
    hf = Tokenizer(models.BPE.from_file(str(tmp_path / "vocab.json"), str(tmp_path / "merges.txt")))
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = decoders.ByteLevel()
    text = play_text[:5000]
    assert hf.encode(text).ids == trained.encode_ordinary(text)
