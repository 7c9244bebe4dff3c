"""gpt-prepare: token files that decode back to the corpus, the same tokens as encoding each document
whole (however it is chunked and however many workers), the split, EOTs, meta.json, and errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

import tokenizers_bpe
from gpt.data import load_meta, open_split
from tools.corpus import plays
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


def test_bad_inputs_are_one_line_errors_that_touch_nothing(corpus, tmp_path, capsys):
    existing = tmp_path / "existing"
    assert prepare(corpus, existing) == 0
    before = {p.name: p.read_bytes() for p in existing.iterdir()}
    (tmp_path / "latin1.txt").write_bytes("caf\xe9\n".encode("latin-1"))
    (tmp_path / "tiny.txt").write_text("one line only\n")
    (tmp_path / "emoji.txt").write_text("the char tokenizer never saw \U0001F600\n" * 50)
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    tok, out = str(corpus["bpe"]), str(existing)
    cases = {
        "no input": ["--tokenizer", tok, "-o", out],
        "does not exist": [str(tmp_path / "missing.txt"), "--tokenizer", tok, "-o", out],
        "--tokenizer": [*corpus["files"], "--tokenizer", str(tmp_path / "none.json"), "-o", out],
        "not UTF-8": [str(tmp_path / "latin1.txt"), "--tokenizer", tok, "-o", out],
        "--val-fraction": [*corpus["files"], "--tokenizer", tok, "-o", out, "--val-fraction", "1.5"],
        "would be empty": [str(tmp_path / "tiny.txt"), "--tokenizer", tok, "-o", out],
        "not a gpt-prepare data directory": [*corpus["files"], "--tokenizer", tok, "-o", str(foreign)],
        "invalid float": [*corpus["files"], "--tokenizer", tok, "-o", out, "--val-fraction", "x"],
        "emoji.txt: --tokenizer": [*corpus["files"], str(tmp_path / "emoji.txt"), "--tokenizer", str(corpus["char"]), "-o", out],
    }
    for expected, argv in cases.items():
        assert prepare_main([*argv, "--quiet"]) == 2, expected
        err = capsys.readouterr().err.strip()
        assert err.startswith("gpt-prepare: error:") and "\n" not in err and expected in err, (expected, err)
    assert {p.name: p.read_bytes() for p in existing.iterdir()} == before
    assert [p.name for p in foreign.iterdir()] == ["notes.txt"]
    json.loads((existing / "meta.json").read_text())  # still the good one
