"""gpt-prepare: token files that decode back to the corpus, the same tokens as encoding each document
whole (however it is chunked and however many workers, with or without line breaks), the split, EOTs,
meta.json, bounded memory on one huge line, and errors found before any work that touch nothing."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import tokenizers_bpe
import tools.prepare as prepare_module
from gpt.data import load_meta, open_split
from tokenizers_bpe.patterns import chunk_cut_regex
from tools.cli import max_threads
from tools.corpus import plays
from tokenizers_bpe.fileio import read_file_blocks as file_blocks
from tools.prepare import Document, chunks, text_blocks
from tools.prepare import main as prepare_main


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("corpus")
    texts = [plays()[0].text()[:30000], plays()[1].text()[:20000] + "é ünïcode — and a literal <|endoftext|>\r\n"]
    files = []
    for i, text in enumerate(texts):
        (root / f"doc{i}.txt").write_bytes(text.encode("utf-8"))
        files.append(root / f"doc{i}.txt")
    bpe = tokenizers_bpe.train_from_iterator(texts, 300, progress=False)
    bpe.save(root / "bpe.json")
    tokenizers_bpe.train_char([*texts, "<|>"]).save(root / "char.json")  # the literal "<|endoftext|>" is text here
    return {"root": root, "texts": texts, "files": [str(f) for f in files], "bpe": root / "bpe.json", "char": root / "char.json"}


def prepare(corpus, out: Path, *extra: str, tokenizer: str = "bpe") -> int:
    return prepare_main([*corpus["files"], "--tokenizer", str(corpus[tokenizer]), "-o", str(out), "--quiet", *extra])


def all_tokens(out: Path) -> np.ndarray:
    meta = load_meta(out)
    return np.concatenate([open_split(out, "train", meta), open_split(out, "val", meta)])


def test_tokens_equal_whole_document_encoding_whatever_the_chunking(corpus, tmp_path):
    tok = tokenizers_bpe.load(corpus["bpe"])
    expected = np.concatenate([tok.encode_ordinary(t) for t in corpus["texts"]])
    assert prepare(corpus, tmp_path / "one", "--workers", "1") == 0
    # 2 KB chunks: dozens of cuts per document, encoded by two processes.
    assert prepare(corpus, tmp_path / "many", "--workers", "2", "--chunk-mb", "0.002") == 0
    for out in (tmp_path / "one", tmp_path / "many"):
        assert np.array_equal(all_tokens(out), expected)
        assert open_split(out, "train").dtype == np.uint16
    assert tok.decode(all_tokens(tmp_path / "many").tolist()) == "".join(corpus["texts"])


def test_split_sizes_meta_and_tokenizer_copy(corpus, tmp_path, capsys):
    out = tmp_path / "data"
    assert prepare(corpus, out, "--val-fraction", "0.2", tokenizer="char") == 0
    assert "train:" in capsys.readouterr().out
    meta = load_meta(out)
    total = sum(len(t.encode("utf-8")) for t in corpus["texts"])
    train, val = meta.splits["train"], meta.splits["val"]
    assert train.bytes + val.bytes == total
    assert abs(val.bytes / total - 0.2) < 0.01  # cut at the first line start after 80%
    assert meta.n_vocab == tokenizers_bpe.load(corpus["char"]).n_vocab and meta.dtype == "uint16"
    assert [s["path"] for s in meta.sources] == [str(Path(f).resolve()) for f in corpus["files"]]
    assert tokenizers_bpe.load(out / "tokenizer.json").fingerprint() == meta.tokenizer_fingerprint
    char = tokenizers_bpe.load(corpus["char"])
    text = char.decode(open_split(out, "train").tolist()) + char.decode(open_split(out, "val").tolist())
    assert text == "".join(corpus["texts"])
    assert meta.bytes_per_token("val") == pytest.approx(val.bytes / val.tokens)


def test_append_eot_ends_every_document(corpus, tmp_path):
    out = tmp_path / "data"
    assert prepare(corpus, out, "--append-eot", "--val-fraction", "0.05") == 0
    tok = tokenizers_bpe.load(corpus["bpe"])
    tokens = all_tokens(out)
    assert int((tokens == tok.eot_token).sum()) == 2 and tokens[-1] == tok.eot_token
    n0 = len(tok.encode_ordinary(corpus["texts"][0]))
    assert tokens[n0] == tok.eot_token  # right after the first document
    assert load_meta(out).append_eot


def test_builtin_corpus_streams_play_by_play(tmp_path, monkeypatch):
    import tools.prepare as prepare_module

    few = plays()[:2]
    monkeypatch.setattr(prepare_module, "plays", lambda: few)  # two plays keep the test short
    char = tokenizers_bpe.train_char([p.text() for p in few])
    char.save(tmp_path / "char.json")
    out = tmp_path / "data"
    assert prepare_main(["--builtin", "shakespeare", "--tokenizer", str(tmp_path / "char.json"), "-o", str(out), "--quiet", "--workers", "1"]) == 0
    assert char.decode(all_tokens(out).tolist()) == "".join(p.text() for p in few)
    assert load_meta(out).sources == [{"builtin": "shakespeare", "bytes": sum(len(p.text().encode()) for p in few)}]


def tree(root: Path) -> dict[str, bytes | None]:
    """Every path under ``root`` (hidden ones too) -> its bytes (None for a directory)."""
    return {str(p.relative_to(root)): None if p.is_dir() else p.read_bytes() for p in sorted(root.rglob("*"))}


def assert_one_line_error(capsys, expected: str) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith("gpt-prepare: error:") and "\n" not in err and expected in err, (expected, err)
    return err


def test_bad_inputs_are_one_line_errors_that_touch_nothing(corpus, tmp_path, capsys):
    existing = tmp_path / "existing"
    assert prepare(corpus, existing) == 0
    (tmp_path / "latin1.txt").write_bytes("caf\xe9\n".encode("latin-1"))
    (tmp_path / "tiny.txt").write_text("one line only" + "!" * 20)  # nothing to cut after 90%
    (tmp_path / "emoji.txt").write_text("the char tokenizer never saw \U0001F600\n" * 50)
    (tmp_path / "empty.txt").write_bytes(b"")
    (tmp_path / "a_directory").mkdir()
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    tok, out = str(corpus["bpe"]), str(existing)
    ok = [*corpus["files"], "--tokenizer", tok]
    cases = {
        "no input": ["--tokenizer", tok, "-o", out],
        "missing.txt: no such file": [str(tmp_path / "missing.txt"), "--tokenizer", tok, "-o", out],
        "a_directory: is a directory": [str(tmp_path / "a_directory"), "--tokenizer", tok, "-o", out],
        "/dev/null: is a device, not a text file": ["/dev/null", "--tokenizer", tok, "-o", out],
        "empty.txt: the file is empty": [*corpus["files"], str(tmp_path / "empty.txt"), "--tokenizer", tok, "-o", out],
        "--tokenizer": [*corpus["files"], "--tokenizer", str(tmp_path / "none.json"), "-o", out],
        "latin1.txt: not UTF-8 at byte offset 3": [str(tmp_path / "latin1.txt"), "--tokenizer", tok, "-o", out],
        "would be empty": [str(tmp_path / "tiny.txt"), "--tokenizer", tok, "-o", out],
        "not a gpt-prepare data directory": [*ok, "-o", str(foreign)],
        "emoji.txt: --tokenizer": [*corpus["files"], str(tmp_path / "emoji.txt"), "--tokenizer", str(corpus["char"]), "-o", out],
        "a_directory: a directory without a tokenizer.json": [*corpus["files"], "--tokenizer", str(tmp_path / "a_directory"), "-o", out],
        "--pattern applies to a .tiktoken rank file only": [*ok, "--pattern", "gpt4", "-o", out],
        "argument --pattern: invalid pattern '(unclosed'": [*ok, "--pattern", "(unclosed", "-o", out],
    }
    for value in ("inf", "nan", "0", "-1", "x", "2000"):
        cases[f"argument --chunk-mb: must be a number in (0, 1024], got '{value}'"] = [*ok, "-o", out, "--chunk-mb", value]
    for value in ("0", "-3", "1.5", "x"):
        cases[f"argument --workers: must be an integer in [1, {max_threads()}], got '{value}'"] = [*ok, "-o", out, "--workers", value]
    for value in ("0", "1", "1.5", "-0.1", "nan", "inf", "x"):
        cases[f"argument --val-fraction: must be a number in (0, 1), got '{value}'"] = [*ok, "-o", out, "--val-fraction", value]
    before = tree(tmp_path)
    for expected, argv in cases.items():
        assert prepare_main([*argv, "--quiet"]) == 2, expected
        assert_one_line_error(capsys, expected)
        assert tree(tmp_path) == before, expected  # inputs byte-identical, the old output kept, nothing new
    json.loads((existing / "meta.json").read_text())  # still the good one


# ------------------------------------------------------------------------------ text without line breaks
@pytest.fixture(scope="module")
def gpt2_tokenizer(tmp_path_factory):
    """The real GPT-2 ranks as a tokenizer.json (from ../shared/data)."""
    from tests.conftest import SHARED_DATA

    if not (SHARED_DATA / "gpt2" / "vocab.bpe").is_file():
        pytest.skip(f"GPT-2 files not found under {SHARED_DATA}")
    tok = tokenizers_bpe.load_gpt2(SHARED_DATA / "gpt2" / "encoder.json", SHARED_DATA / "gpt2" / "vocab.bpe")
    path = tmp_path_factory.mktemp("gpt2") / "tokenizer.json"
    tok.save(path)
    return path


def test_a_file_without_line_breaks_is_split_and_chunked_with_the_tokens_of_the_whole(gpt2_tokenizer, tmp_path):
    """A 300 KB line of prose (the issue: a 29 MB one ended in "the val split would be empty"), cut into
    ~8 KB chunks by two workers: the ids are tiktoken's for the whole text, and validation holds 10%."""
    text = plays()[0].text().replace("\n", " ")[:300_000]
    (tmp_path / "line.txt").write_text(text, encoding="utf-8")
    out = tmp_path / "data"
    assert prepare_main([str(tmp_path / "line.txt"), "--tokenizer", str(gpt2_tokenizer), "-o", str(out), "--quiet",
                         "--workers", "2", "--chunk-mb", "0.008"]) == 0
    reference = tokenizers_bpe.load(gpt2_tokenizer).to_tiktoken()
    assert all_tokens(out).tolist() == reference.encode_ordinary(text)
    meta = load_meta(out)
    train_bytes = round(len(text) * 0.9)
    cut = next(m.start() for m in chunk_cut_regex(tokenizers_bpe.GPT2_PATTERN).finditer(text, train_bytes))
    assert meta.splits["train"].bytes == cut and meta.splits["val"].bytes == len(text) - cut  # the first cut after 90%
    assert meta.splits["train"].tokens == len(reference.encode_ordinary(text[:cut]))


def test_blank_lines_keep_their_tokens(gpt2_tokenizer, tmp_path):
    """The old rule (cut before any line that starts with a non-space) split GPT-2's "\\n\\n" pieces differently
    from the whole text ("a\\n\\n" + "b" is not "a\\n\\nb"); the cuts now come from the pattern."""
    text = "".join(f"Line {i} of the text.\n\n{'Second' if i % 2 else 'Third'} part\n" for i in range(3000))
    (tmp_path / "blank.txt").write_text(text, encoding="utf-8")
    out = tmp_path / "data"
    assert prepare_main([str(tmp_path / "blank.txt"), "--tokenizer", str(gpt2_tokenizer), "-o", str(out), "--quiet",
                         "--workers", "1", "--chunk-mb", "0.0001"]) == 0
    assert all_tokens(out).tolist() == tokenizers_bpe.load(gpt2_tokenizer).to_tiktoken().encode_ordinary(text)


def test_a_char_level_tokenizer_cuts_anywhere(tmp_path):
    text = "x" * 5000  # no letter edge, no line start: only a char-level tokenizer can cut it
    (tmp_path / "x.txt").write_text(text)
    tokenizers_bpe.train_char([text]).save(tmp_path / "char.json")
    out = tmp_path / "data"
    assert prepare_main([str(tmp_path / "x.txt"), "--tokenizer", str(tmp_path / "char.json"), "-o", str(out), "--quiet",
                         "--workers", "1", "--chunk-mb", "0.0005"]) == 0
    meta = load_meta(out)
    assert meta.splits["train"].bytes == 4500 and meta.splits["val"].bytes == 500


@pytest.mark.parametrize(
    "text, pattern, rule",
    [
        ("word " * 20 + "!" * 100, "gpt2", "after a letter or a digit followed by another kind of character"),
        ("word " * 20 + "x" * 100, "gpt4", "after a letter or a digit followed by another kind of character"),
        ("line\n" * 100 + "word " * 30, r"\S+|\s+", "only at a line start (a custom pattern"),
    ],
    ids=["punctuation-tail", "one-long-word", "custom-pattern"],
)
def test_an_impossible_split_is_known_before_any_encoding(tmp_path, capsys, monkeypatch, text, pattern, rule):
    """No place to cut after 90% of the text: one line, exit 2, found by the pre-pass (encoding never
    starts), nothing written."""
    (tmp_path / "in.txt").write_text(text)
    tokenizers_bpe.train_from_iterator([text], 260, pattern=pattern, workers=1).save(tmp_path / "tok.json")
    monkeypatch.setattr(prepare_module, "prepare", lambda *a, **k: pytest.fail("encoding started"))
    before = tree(tmp_path)
    assert prepare_main([str(tmp_path / "in.txt"), "--tokenizer", str(tmp_path / "tok.json"), "-o", str(tmp_path / "out"), "--quiet"]) == 2
    err = assert_one_line_error(capsys, "the val split would be empty")
    assert rule in err and "--val-fraction 0.1" in err
    assert tree(tmp_path) == before


def test_one_huge_line_is_read_in_bounded_blocks_and_chunks(tmp_path):
    """The reader never waits for a newline, and chunks stay near --chunk-mb on a single 2 MB line."""
    text = ("Sing, goddess, the anger of Peleus' son Achilles 1234 é中 " * 40000)[: 2 << 20]
    path = tmp_path / "line.txt"
    path.write_text(text, encoding="utf-8")
    blocks = list(file_blocks(path, size=1 << 16))
    assert "".join(b for b, _ in blocks) == text and max(n for _, n in blocks) <= 1 << 16
    assert sum(n for _, n in blocks) == path.stat().st_size
    doc = Document("line", path.stat().st_size, lambda: file_blocks(path, size=1 << 16))
    out = list(chunks([doc], train_bytes=doc.bytes * 9 // 10, chunk_bytes=50_000, cuts=chunk_cut_regex(tokenizers_bpe.GPT2_PATTERN)))
    assert "".join(c.text for c in out) == text and len(out) > 40
    assert max(c.nbytes for c in out) < 50_000 + 20  # a chunk ends at the first cut after its size
    assert [c.split for c in out] == sorted(c.split for c in out) and out[-1].split == "val"


def test_invalid_utf8_deep_in_a_long_line_is_found_with_its_offset(corpus, tmp_path, capsys):
    good = ("no line break here, " * 30000).encode()
    (tmp_path / "bad.txt").write_bytes(good + b"\xe9t\xc3\xa9" + good)
    assert prepare_main([str(tmp_path / "bad.txt"), "--tokenizer", str(corpus["bpe"]), "-o", str(tmp_path / "out"), "--quiet"]) == 2
    assert_one_line_error(capsys, f"bad.txt: not UTF-8 at byte offset {len(good)}")
    assert not (tmp_path / "out").exists()


chunk_texts = st.lists(
    st.one_of(st.sampled_from(["word", " ", "  ", "\n", "\r\n", "\n\n", "é", "中文", "🎉", "123", "'s", "!!", "\t", "x"]),
              st.text(max_size=4)),
    max_size=60,
).map("".join)


@settings(max_examples=200, deadline=None)
@given(text=chunk_texts, chunk_bytes=st.integers(1, 40), block=st.integers(1, 17), fraction=st.floats(0.05, 0.95),
       pattern=st.sampled_from(["gpt2", "gpt4", None]))
def test_chunks_cut_only_at_cuts_whatever_the_read_blocks(tmp_path_factory, text, chunk_bytes, block, fraction, pattern):
    """chunks(): the text back whole, every chunk end a cut of the whole text, the split at the first cut
    at or after the training bytes, and the same chunks whatever size the file is read in."""
    from tokenizers_bpe.patterns import resolve_pattern

    rx = chunk_cut_regex(None if pattern is None else resolve_pattern(pattern))
    path = tmp_path_factory.mktemp("chunks") / "t.txt"
    path.write_bytes(text.encode("utf-8"))
    size = len(text.encode("utf-8"))
    train_bytes = max(1, round(size * fraction))

    def run(read_size):
        doc = Document("t", size, lambda: file_blocks(path, size=read_size) if read_size else text_blocks(text, 5))
        return [(c.split, c.text, c.nbytes, c.doc_end) for c in chunks([doc], train_bytes, chunk_bytes, rx)]

    out = run(block)
    assert out == run(4096) == run(None)
    assert "".join(t for _, t, _, _ in out) == text and all(n == len(t.encode()) for _, t, n, _ in out)
    cuts = {m.start() for m in rx.finditer(text)}
    ends = np.cumsum([len(t) for _, t, _, _ in out])[:-1].tolist()
    assert set(ends) <= cuts
    val_start = next((i for i, (split, _, _, _) in enumerate(out) if split == "val"), None)
    byte_cuts = sorted(len(text[:c].encode()) for c in cuts)
    first_cut = next((b for b in byte_cuts if b >= train_bytes), None)
    if first_cut is None:
        assert val_start is None
    else:
        assert sum(n for split, _, n, _ in out if split == "train") == first_cut


@pytest.mark.parametrize("pattern", ["gpt2", "gpt4"])
def test_a_cut_decided_by_characters_not_yet_read_is_still_found(tmp_path, pattern):
    """GPT-2 cuts "!\\r" | "\\n!" (two characters of look-ahead; nothing else cuts this text): wherever a read
    block ends, the chunks are the same."""
    from tokenizers_bpe.patterns import resolve_pattern

    text = "!\r\n" * 300
    path = tmp_path / "crlf.txt"
    path.write_bytes(text.encode())
    rx = chunk_cut_regex(resolve_pattern(pattern))
    results = {tuple(c.text for c in chunks([Document("crlf", len(text), lambda: file_blocks(path, size=size))], 700, 3, rx))
               for size in range(1, 9)}
    assert len(results) == 1 and len(next(iter(results))) > 100


def test_char_index_is_the_first_character_at_or_after_a_byte():
    from tools.prepare import _char_index

    assert [_char_index("aé中b", n) for n in range(8)] == [0, 1, 2, 2, 3, 3, 3, 4]
    assert [_char_index("abc", n) for n in range(4)] == [0, 1, 2, 3]


@settings(max_examples=200, deadline=None)
@given(parts=st.lists(st.one_of(st.text(max_size=5).map(str.encode), st.binary(max_size=3)), max_size=12),
       size=st.integers(1, 9))
def test_file_blocks_decode_like_bytes_decode_whatever_the_block_size(tmp_path_factory, parts, size):
    """Blocks never split a character, and invalid UTF-8 (a stray byte, a character cut off by the end
    of the file) is reported at the offset Python's own decoder gives."""
    from tokenizers_bpe import InvalidTextError

    data = b"".join(parts)
    path = tmp_path_factory.mktemp("blocks") / "b.txt"
    path.write_bytes(data)
    try:
        expected = data.decode("utf-8")
    except UnicodeDecodeError as e:
        with pytest.raises(InvalidTextError) as raised:
            list(file_blocks(path, size=size))
        assert (raised.value.source, raised.value.offset) == (str(path), e.start)
    else:
        blocks = list(file_blocks(path, size=size))
        assert "".join(b for b, _ in blocks) == expected and all(n == len(b.encode()) for b, n in blocks)


def test_chunks_that_cannot_fit_in_memory_are_refused_before_encoding(corpus, tmp_path, monkeypatch, capsys):
    """--chunk-mb (up to 1024) times the batch of chunks in flight, at ~40 bytes of memory per byte of text
    encoded, was never checked: a large one on a large input got the process killed."""
    total = sum(Path(f).stat().st_size for f in corpus["files"])  # ~50 KB: about 2 MB in flight at worst
    monkeypatch.setattr(prepare_module, "available_memory_bytes", lambda: total * 40)
    assert prepare(corpus, tmp_path / "data", "--chunk-mb", "0.002", "--workers", "1") == 0  # 2 KB x 5 in flight: fits
    assert prepare(corpus, tmp_path / "big", "--chunk-mb", "64", "--workers", "2") == 2  # the whole input at once: not
    err = capsys.readouterr().err
    assert "--chunk-mb 64 with --workers 2" in err and "lower --chunk-mb" in err and "Traceback" not in err
    assert not (tmp_path / "big").exists()


@pytest.mark.parametrize("field, value, words", [("val_fraction", -1, "val_fraction -1.0 is not in (0, 1)"),
                                                 ("val_fraction", 1e308, "is not in (0, 1)"),
                                                 ("n_vocab", 10**30, "n_vocab must be an integer"),
                                                 ("tokenizer_fingerprint", None, "tokenizer_fingerprint is null")])
def test_a_data_directory_whose_meta_lies_is_refused_on_load(corpus, tmp_path, field, value, words):
    assert prepare(corpus, tmp_path / "data") == 0
    meta = json.loads((tmp_path / "data" / "meta.json").read_text())
    meta[field] = value
    (tmp_path / "data" / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=re.escape(words)):
        load_meta(tmp_path / "data")


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="FIFOs are POSIX")
def test_a_token_file_that_is_not_a_file_is_named_for_what_it_is(corpus, tmp_path):
    """A FIFO as train.bin was reported "missing"."""
    assert prepare(corpus, tmp_path / "data") == 0
    (tmp_path / "data" / "train.bin").unlink()
    os.mkfifo(tmp_path / "data" / "train.bin")
    with pytest.raises(ValueError, match="train.bin: is a FIFO"):
        open_split(tmp_path / "data", "train")
    (tmp_path / "data" / "train.bin").unlink()
    with pytest.raises(ValueError, match="train.bin: file not found; re-run gpt-prepare"):
        open_split(tmp_path / "data", "train")


def test_a_file_written_to_while_it_is_read_is_one_line_and_leaves_nothing(corpus, tmp_path, capsys, monkeypatch):
    """The splits are planned on a first pass over the text and cut on the second: a file that grew
    in between (a log still written) is refused, never cut where the plan no longer holds."""
    growing = tmp_path / "growing.txt"
    growing.write_text(corpus["texts"][0])
    planned = prepare_module.plan_data

    def plan_then_grow(*args, **kwargs):
        plan = planned(*args, **kwargs)
        with open(growing, "a") as f:
            f.write("a line written after the first pass\n" * 100)
        return plan

    monkeypatch.setattr(prepare_module, "plan_data", plan_then_grow)
    rc = prepare_main([str(growing), "--tokenizer", str(corpus["bpe"]), "-o", str(tmp_path / "data"), "--quiet"])
    assert rc == 2
    assert_one_line_error(capsys, "the text changed while it was read")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["growing.txt"]


def test_the_tokenizer_is_t_as_in_bpe_encode_and_bpe_decode(corpus, tmp_path, capsys):
    assert prepare_main(["-t", str(corpus["char"]), "-o", str(tmp_path / "data"), *map(str, corpus["files"]), "--quiet"]) == 0
    assert load_meta(tmp_path / "data").n_vocab == tokenizers_bpe.load(corpus["char"]).n_vocab
