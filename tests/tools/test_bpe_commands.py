"""The bpe-* commands, run in-process: the happy paths, and every bad input from the issue giving
one line on stderr, exit status 2 and no half-written output."""

from __future__ import annotations

import json
import shutil

import pytest

import tokenizers_bpe
from tests.tokenizers_bpe.conftest import tiktoken_encoding  # noqa: F401 (a fixture: tiktoken's own encodings, offline)
from tools.bpe_decode import main as decode_main
from tools.bpe_encode import main as encode_main
from tools.bpe_inspect import main as inspect_main
from tools.bpe_train import main as train_main

CORPUS = "First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\nSpeak, speak.\n" * 40


@pytest.fixture
def corpus(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text(CORPUS, encoding="utf-8")
    return path


@pytest.fixture
def tokenizer_file(tmp_path, corpus):
    out = tmp_path / "tok.json"
    assert train_main([str(corpus), "--vocab-size", "300", "-o", str(out), "--quiet", "--workers", "1"]) == 0
    return out


def one_line_error(capsys, prog: str) -> str:
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.startswith(f"{prog}: error: "), err
    return err


# ------------------------------------------------------------------------------ happy paths
def test_train_encode_decode_inspect(tmp_path, corpus, tokenizer_file, capsys):
    capsys.readouterr()
    assert encode_main(["--tokenizer", str(tokenizer_file), "Speak, speak."]) == 0
    ids = json.loads(capsys.readouterr().out)
    assert decode_main(["--tokenizer", str(tokenizer_file), json.dumps(ids)]) == 0
    assert capsys.readouterr().out == "Speak, speak."
    assert encode_main(["--tokenizer", str(tokenizer_file), "--count", "Speak, speak."]) == 0
    assert int(capsys.readouterr().out) == len(ids)
    assert inspect_main([str(tokenizer_file), "--sample", str(corpus), "--top", "3"]) == 0
    out = capsys.readouterr().out
    assert "300 ids = 256 bytes + 43 merges + 1 special" in out and "bytes/token" in out and "longest tokens" in out


def test_inspect_measures_a_large_sample_on_its_start(tmp_path, corpus, tokenizer_file, capsys, monkeypatch):
    """--sample was read and encoded whole: a 5 GB file would have held some 45 GB of ids."""
    import tools.bpe_inspect

    monkeypatch.setattr(tools.bpe_inspect, "SAMPLE_BYTES", 1000)
    large = tmp_path / "large.txt"
    large.write_text(corpus.read_text() * 1000)  # read in blocks of about 1 MB: the first one is measured
    capsys.readouterr()
    assert inspect_main([str(tokenizer_file), "--sample", str(large)]) == 0
    line = next(x for x in capsys.readouterr().out.splitlines() if "compression" in x)
    measured = int(line.split("(its first ")[1].split(":")[1].split()[0].replace(",", ""))
    assert 1000 <= measured < large.stat().st_size and "bytes/token" in line


def test_train_output_is_byte_identical_across_runs(tmp_path, corpus):
    outs = []
    for workers in ("1", "2"):
        out = tmp_path / f"t{workers}.json"
        assert train_main([str(corpus), "--vocab-size", "320", "-o", str(out), "--quiet", "--workers", workers, "--seed", workers]) == 0
        outs.append(out.read_bytes())
    assert outs[0] == outs[1]


def test_train_char_and_options(tmp_path, corpus):
    out = tmp_path / "chars.json"
    assert train_main([str(corpus), "--char", "-o", str(out)]) == 0
    tok = tokenizers_bpe.load(out)
    assert isinstance(tok, tokenizers_bpe.CharTokenizer) and tok.decode(tok.encode(CORPUS)) == CORPUS
    out = tmp_path / "gpt4.json"
    assert train_main([str(corpus), "--vocab-size", "300", "--pattern", "gpt4", "--special", "<|a|>", "--special", "<|b|>", "-o", str(out), "--quiet"]) == 0
    tok = tokenizers_bpe.load(out)
    assert tok.pattern == tokenizers_bpe.GPT4_PATTERN and tok.special_tokens == {"<|a|>": 298, "<|b|>": 299}


def test_encode_text_a_char_tokenizer_lacks(tmp_path, corpus, capsys):
    out = tmp_path / "chars.json"
    assert train_main([str(corpus), "--char", "-o", str(out)]) == 0
    capsys.readouterr()
    assert encode_main(["-t", str(out), "\U0001F600"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("bpe-encode: error: TEXT: character") and "U+1F600" in err and err.count("\n") == 1, err


def test_encode_special_tokens_and_stdin(tokenizer_file, capsys, monkeypatch):
    import io

    tok = tokenizers_bpe.load(tokenizer_file)
    assert encode_main(["-t", str(tokenizer_file), "--special", "allow", "a<|endoftext|>"]) == 0
    assert json.loads(capsys.readouterr().out)[-1] == tok.eot_token
    assert encode_main(["-t", str(tokenizer_file), "a<|endoftext|>"]) == 2
    assert "--special allow" in one_line_error(capsys, "bpe-encode")
    monkeypatch.setattr("sys.stdin", io.StringIO("[72, 105]"))
    assert decode_main(["-t", str(tokenizer_file), "-"]) == 0
    assert capsys.readouterr().out == "Hi"


MIXED = ("First Citizen:\nBefore we proceed, hear me <|endoftext|>speak.\r\n\nÉté 2026 — 東京\n  x\ty123abc<|endoftext|>"
         "\n\n\n  \U0001F600 it's   42nd\n" * 30)


@pytest.mark.parametrize("kind", ["gpt2", "gpt4", "char", "custom"])
@pytest.mark.parametrize("special", ["allow", "ordinary"])
def test_encode_a_block_at_a_time_gives_the_ids_of_the_whole_text(tmp_path, kind, special, capsys, monkeypatch):
    """bpe-encode held every id of its text as a Python list and then their JSON (5 GB for 255 MB);
    it now encodes and writes a block at a time, cut where the pieces end anyway: the same ids, cut at
    many places here (blocks of a few characters), the same JSON."""
    import io

    import tools.bpe_encode

    corpus = tmp_path / "c.txt"
    corpus.write_text(MIXED + "<|>", encoding="utf-8")  # ("<|>": characters of the special token, as text too)
    out = tmp_path / "tok.json"
    options = {"gpt2": [], "gpt4": ["--pattern", "gpt4"], "char": ["--char"], "custom": ["--pattern", r" ?\w+|\s+|[^\w\s]+"]}
    assert train_main([str(corpus), "--vocab-size", "400", "-o", str(out), "--quiet", "--workers", "1", *options[kind]]) == 0
    tok = tokenizers_bpe.load(out)
    expected = tok.encode(MIXED, allowed_special="all") if special == "allow" else tok.encode_ordinary(MIXED)
    for block in (7, 1 << 20):
        monkeypatch.setattr(tools.bpe_encode, "BLOCK_CHARS", block)
        for count in ([], ["--count"]):
            monkeypatch.setattr("sys.stdin", io.StringIO(MIXED))
            capsys.readouterr()
            assert encode_main(["-t", str(out), "--special", special, *count, "-"]) == 0
            assert capsys.readouterr().out == (f"{len(expected)}\n" if count else json.dumps(expected) + "\n")


def test_a_character_a_char_tokenizer_lacks_late_in_the_text_writes_no_ids(tmp_path, corpus, capsys, monkeypatch):
    """Encoded a block at a time, the ids before the unknown character were written (half a JSON list)."""
    import tools.bpe_encode

    monkeypatch.setattr(tools.bpe_encode, "BLOCK_CHARS", 5)
    out = tmp_path / "chars.json"
    assert train_main([str(corpus), "--char", "-o", str(out)]) == 0
    capsys.readouterr()
    assert encode_main(["-t", str(out), "--special", "allow", "Speak, speak.\nAll:\nSpeak<|endoftext|> \U0001F600"]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and "U+1F600" in captured.err and captured.err.count("\n") == 1, captured


def test_a_text_on_stdin_that_cannot_fit_in_memory_is_refused_as_it_is_read(tokenizer_file, capsys, monkeypatch):
    """Killed by the OS (a 200 MB text under a 1 GiB memory cgroup: bpe-encode, bpe-decode, gpt-generate's
    PROMPT, gpt-classify); refused once what was read would need more than the available memory."""
    import io

    import tools.cli

    monkeypatch.setattr(tools.cli, "available_memory", lambda: 4 << 20)
    monkeypatch.setattr("sys.stdin", io.TextIOWrapper(io.BytesIO(b"word " * (1 << 20))))
    assert encode_main(["-t", str(tokenizer_file), "--count", "-"]) == 2
    assert "TEXT on stdin: more than 1.0 MB, the most that the 4.2 MB of memory available" in one_line_error(capsys, "bpe-encode")
    monkeypatch.setattr("sys.stdin", io.TextIOWrapper(io.BytesIO(b"[1, 2, 3]" * (1 << 20))))
    assert decode_main(["-t", str(tokenizer_file), "-"]) == 2
    assert "IDS on stdin: more than" in one_line_error(capsys, "bpe-decode")


# ------------------------------------------------------------------------------ bad input
def _empty_file(d):
    (d / "empty.txt").write_text("")
    return d / "empty.txt"


@pytest.mark.parametrize(
    "make, expected",
    [
        (lambda d: d / "missing.txt", "missing.txt: no such file"),
        (_empty_file, "empty.txt: the file is empty"),
        (lambda d: d, "is a directory"),
    ],
    ids=["missing", "empty", "directory"],
)
def test_train_rejects_bad_corpus_paths(tmp_path, capsys, make, expected):
    path = make(tmp_path)
    out = tmp_path / "out.json"
    assert train_main([str(path), "-o", str(out), "--quiet"]) == 2
    assert expected in one_line_error(capsys, "bpe-train")
    assert not out.exists()


def test_train_reports_non_utf8_with_offset_and_offers_replace(tmp_path, capsys):
    path = tmp_path / "latin1.txt"
    path.write_bytes(b"hello world\n" * 3 + "caf\u00e9\n".encode("latin-1"))
    out = tmp_path / "out.json"
    assert train_main([str(path), "--vocab-size", "260", "-o", str(out), "--quiet"]) == 2
    err = one_line_error(capsys, "bpe-train")
    assert "latin1.txt" in err and "byte offset 39" in err and "--errors replace" in err
    assert not out.exists()
    assert train_main([str(path), "--vocab-size", "260", "-o", str(out), "--quiet", "--errors", "replace"]) == 0
    assert tokenizers_bpe.load(out).n_vocab == 260


@pytest.mark.parametrize(
    "args, expected",
    [
        (["--vocab-size", "256"], "vocab size 256 is too small: the minimum is 257"),
        (["--vocab-size", "258", "--special", "<|a|>", "--special", "<|b|>", "--special", "<|c|>"], "the minimum is 259"),
        (["--pattern", "(unclosed"], "invalid pattern '(unclosed'"),
        (["--pattern", "x*"], "matches the empty string"),
        (["--pattern", r"\w+"], "its pieces skip ','"),  # encoding would drop every such character
        (["--pattern", "(a|aa)*c|."], "its pieces skip '\\n'"),
        (["--pattern", "a*(?=c)|(?s:.)"], "matches the empty string (before 'c'"),  # tiktoken then drops the 'c'
        (["--vocab-size", "many"], "must be an integer, got 'many'"),
        (["--min-frequency", "0"], "--min-frequency must be at least 1"),
    ],
    ids=["vocab-below-256", "vocab-below-specials", "bad-regex", "empty-match-regex", "skipping-regex", "skipping-newlines",
         "empty-match-inside",
         "not-a-number", "min-frequency"],
)
def test_train_rejects_bad_arguments(tmp_path, corpus, capsys, args, expected):
    out = tmp_path / "out.json"
    assert train_main([str(corpus), "-o", str(out), "--quiet", *args]) == 2
    assert expected in one_line_error(capsys, "bpe-train")
    assert not out.exists()


def test_train_vocab_beyond_corpus_warns_and_still_saves(tmp_path, corpus, capsys):
    out = tmp_path / "out.json"
    assert train_main([str(corpus), "--vocab-size", "5000", "-o", str(out), "--quiet"]) == 0
    err = capsys.readouterr().err
    assert "bpe-train: warning: the corpus only supports a vocabulary of" in err
    assert tokenizers_bpe.load(out).n_vocab < 5000


def test_failed_training_leaves_existing_output_untouched(tmp_path, corpus, tokenizer_file, capsys):
    before = tokenizer_file.read_bytes()
    assert train_main([str(tmp_path / "nope.txt"), "-o", str(tokenizer_file), "--quiet"]) == 2
    assert tokenizer_file.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temp files left


@pytest.mark.parametrize(
    "corrupt, expected",
    [
        (lambda t: t[: len(t) // 2], "corrupt or truncated tokenizer.json"),
        (lambda t: t.replace('"format_version": 1', '"format_version": 99'), "unknown tokenizer format version 99"),
        (lambda t: t.replace('"format": "tokenizers_bpe"', '"format": "other"'), "not a tokenizers_bpe tokenizer.json"),
        (lambda t: t.replace('"type": "bpe"', '"type": "wordpiece"'), "unknown tokenizer type 'wordpiece'"),
        (lambda t: json.dumps({**json.loads(t), "merges": [[7, 300]] + json.loads(t)["merges"][1:]}), "merge 0 (7, 300)"),
        (lambda t: json.dumps({**json.loads(t), "merges": json.loads(t)["merges"][:-1]}), "merges for"),
        (lambda t: json.dumps({**json.loads(t), "vocab": json.loads(t)["vocab"][:-1]}), "merges for"),
        (lambda t: json.dumps({**json.loads(t), "special_tokens": {"<|endoftext|>": 3}}), "an ordinary token already uses"),
    ],
    ids=["truncated", "version", "format", "type", "bad-merge", "missing-merge", "missing-token", "special-collides"],
)
def test_corrupt_tokenizer_json_is_rejected(tmp_path, tokenizer_file, capsys, corrupt, expected):
    bad = tmp_path / "bad.json"
    bad.write_text(corrupt(tokenizer_file.read_text(encoding="utf-8")), encoding="utf-8")
    with pytest.raises(ValueError, match="bad.json"):
        tokenizers_bpe.load(bad)
    for main, prog in ((inspect_main, "bpe-inspect"), (encode_main, "bpe-encode")):
        argv = [str(bad)] if prog == "bpe-inspect" else ["-t", str(bad), "x"]
        assert main(argv) == 2
        err = one_line_error(capsys, prog)
        assert "bad.json" in err and expected in err


def test_decode_rejects_ids_outside_vocabulary_and_bad_json(tokenizer_file, capsys):
    assert decode_main(["-t", str(tokenizer_file), "[1, 300, 2]"]) == 2
    assert "token id 300 is not in the vocabulary (valid ids: 0..299)" in one_line_error(capsys, "bpe-decode")
    assert decode_main(["-t", str(tokenizer_file), "[1, -5]"]) == 2
    assert "token id -5" in one_line_error(capsys, "bpe-decode")
    for bad in ("1, 2", "[1.5]", '{"a": 1}', "[true]"):
        assert decode_main(["-t", str(tokenizer_file), bad]) == 2
        assert "JSON list of integers" in one_line_error(capsys, "bpe-decode")


def test_missing_tokenizer_file(tmp_path, capsys):
    assert encode_main(["-t", str(tmp_path / "none.json"), "x"]) == 2
    assert "none.json: no such file" in one_line_error(capsys, "bpe-encode")
    assert inspect_main([str(tmp_path)]) == 2
    assert "a directory without a tokenizer.json" in one_line_error(capsys, "bpe-inspect")


def test_non_utf8_offset_is_exact_beyond_the_first_read_block(tmp_path, capsys):
    path = tmp_path / "big.txt"
    good = ("a line of text, " * 4 + "\n").encode() * 5000  # ~330 KB: more than one read block
    path.write_bytes(good + b"ok \xff\n")
    assert train_main([str(path), "--vocab-size", "260", "-o", str(tmp_path / "o.json"), "--quiet"]) == 2
    assert f"byte offset {len(good) + 3}" in one_line_error(capsys, "bpe-train")


def test_builtin_corpus_is_the_default(tmp_path, monkeypatch, capsys):
    plays = ["ROMEO:\nBut soft, what light through yonder window breaks?\n", "JULIET:\nO Romeo, Romeo!\n"]
    monkeypatch.setattr("tools.bpe_train.iter_builtin_texts", lambda name: iter(plays))
    for argv in ([], ["--builtin", "shakespeare"]):
        out = tmp_path / "b.json"
        assert train_main([*argv, "--vocab-size", "270", "-o", str(out), "--quiet"]) == 0
        assert "built-in corpus 'shakespeare'" in capsys.readouterr().out
        assert tokenizers_bpe.load(out).n_vocab == 270
    assert train_main([str(tmp_path / "b.json"), "--builtin", "shakespeare", "-o", str(out)]) == 2
    assert "not both" in one_line_error(capsys, "bpe-train")


# ------------------------------------------------------------------------------ --tokenizer: what it accepts
def tree(root) -> dict:
    """Every path under ``root`` (hidden ones too) -> its bytes (None for a directory)."""
    return {str(p.relative_to(root)): None if p.is_dir() else p.read_bytes() for p in sorted(root.rglob("*"))}


TEXT = "Hello world! It's 2024: naïve café, 中文, 12345678 spaces    here\n\n\tand <|endoftext|> too"


@pytest.mark.parametrize("name, path", [("cl100k_base", "cl100k/cl100k_base.tiktoken"), ("gpt2", "gpt2/gpt2.tiktoken")])
def test_encode_with_a_tiktoken_file_gives_tiktokens_ids(shared_file, tiktoken_encoding, capsys, name, path):
    ranks = str(shared_file(path))
    for special in ("allow", "ordinary"):
        assert encode_main(["-t", ranks, "--special", special, TEXT]) == 0
        ids = json.loads(capsys.readouterr().out)
        reference = tiktoken_encoding(name)
        assert ids == (reference.encode(TEXT, allowed_special="all") if special == "allow" else reference.encode_ordinary(TEXT))
    assert decode_main(["-t", ranks, json.dumps(ids)]) == 0
    assert capsys.readouterr().out == TEXT
    assert inspect_main([ranks, "--top", "2", "--sample", str(shared_file("tinyshakespeare.txt"))]) == 0
    out = capsys.readouterr().out
    assert "<|endoftext|>=" in out and ("gpt4 (as tiktoken)" if name == "cl100k_base" else "gpt2 (as tiktoken)") in out


def test_pattern_replaces_the_pattern_of_a_rank_file(tmp_path, shared_file, capsys):
    import tiktoken

    mine = tmp_path / "mine.tiktoken"  # not a known name: the gpt2 pattern, no special tokens
    shutil.copyfile(shared_file("gpt2/gpt2.tiktoken"), mine)
    ranks = tokenizers_bpe.load_any(mine).mergeable_ranks
    for pattern, rx in (("gpt2", tokenizers_bpe.GPT2_PATTERN), ("gpt4", tokenizers_bpe.GPT4_PATTERN)):
        argv = ["-t", str(mine), TEXT] + ([] if pattern == "gpt2" else ["--pattern", pattern])
        assert encode_main(argv) == 0
        reference = tiktoken.Encoding(pattern, pat_str=rx, mergeable_ranks=ranks, special_tokens={})
        assert json.loads(capsys.readouterr().out) == reference.encode_ordinary(TEXT)


def test_a_data_or_checkpoint_directory_means_its_tokenizer(data_dir, tmp_path, capsys):
    import torch

    from gpt.model import GPT, GPTConfig

    tok = tokenizers_bpe.load(data_dir / "tokenizer.json")
    torch.manual_seed(0)
    checkpoint = tmp_path / "ckpt"
    GPT(GPTConfig(vocab_size=tok.n_vocab, n_ctx=16, n_embd=8, n_layer=1, n_head=1, backend="torch")).save_pretrained(checkpoint, tokenizer=tok)
    for directory in (data_dir, checkpoint):
        assert encode_main(["-t", str(directory), "ROMEO:"]) == 0
        ids = json.loads(capsys.readouterr().out)
        assert ids == tok.encode("ROMEO:")
        assert decode_main(["-t", str(directory), json.dumps(ids)]) == 0
        assert capsys.readouterr().out == "ROMEO:"
        assert inspect_main([str(directory), "--sample", str(data_dir / "meta.json")]) == 0
        assert "char tokenizer" in capsys.readouterr().out


def test_bad_tokenizer_arguments_are_one_line_errors_that_touch_nothing(tmp_path, tokenizer_file, shared_file, capsys):
    (tmp_path / "no_tokenizer").mkdir()
    (tmp_path / "no_tokenizer" / "notes.txt").write_text("mine")
    lines = shared_file("gpt2/gpt2.tiktoken").read_text().splitlines()[:300]
    (tmp_path / "bad.tiktoken").write_text(lines[0] + "\nnot a rank line\n")
    (tmp_path / "gaps.tiktoken").write_text("\n".join(lines[:256] + [lines[299]]) + "\n")
    cases = {
        "--pattern applies to a .tiktoken rank file only": [str(tokenizer_file), "--pattern", "gpt4"],
        "argument --pattern: invalid pattern '(unclosed'": [str(tokenizer_file), "--pattern", "(unclosed"],
        "argument --pattern: invalid pattern 'x*': it matches the empty string": [str(tokenizer_file), "--pattern", "x*"],
        "argument --pattern: invalid pattern '[a-z]+': its pieces skip 'H'": [str(tmp_path / "gaps.tiktoken"), "--pattern", "[a-z]+"],
        "no_tokenizer: a directory without a tokenizer.json": [str(tmp_path / "no_tokenizer")],
        "bad.tiktoken:2: expected 'BASE64TOKEN RANK'": [str(tmp_path / "bad.tiktoken")],
        "gaps.tiktoken: token ranks must be the contiguous ids": [str(tmp_path / "gaps.tiktoken")],
        "missing.tiktoken: no such file": [str(tmp_path / "missing.tiktoken")],
    }
    before = tree(tmp_path)
    for expected, (tokenizer, *options) in cases.items():
        for main, prog, argv in ((encode_main, "bpe-encode", ["-t", tokenizer, *options, "x"]),
                                 (decode_main, "bpe-decode", ["-t", tokenizer, *options, "[1]"]),
                                 (inspect_main, "bpe-inspect", [tokenizer, *options])):
            assert main(argv) == 2, (prog, expected)
            assert expected in one_line_error(capsys, prog), (prog, expected)
            assert tree(tmp_path) == before, (prog, expected)


def test_a_rank_file_without_a_merge_list_encodes_and_is_refused_before_work_where_one_is_kept(tmp_path, capsys):
    """tiktoken encodes with a token that is no merge of two lower ones; our tokenizer.json cannot hold
    it: bpe-inspect says so and goes on, gpt-prepare and gpt-train refuse it before encoding any text
    (gpt-prepare encoded the whole corpus first), naming the file; a megabyte token is shown cut."""
    import base64

    from tools.prepare import main as prepare_main
    from tools.train import main as gpt_train_main

    ranks = [bytes([i]) for i in range(256)] + [b"Sp", b"x" * 1_000_000]
    rank_file = tmp_path / "odd.tiktoken"
    rank_file.write_text("".join(f"{base64.b64encode(t).decode()} {r}\n" for r, t in enumerate(ranks)))
    (tmp_path / "text.txt").write_text(CORPUS)
    assert encode_main(["-t", str(rank_file), "Speak"]) == 0
    assert json.loads(capsys.readouterr().out) == [256, ord("e"), ord("a"), ord("k")]
    assert inspect_main([str(rank_file)]) == 0
    out = capsys.readouterr().out
    assert "merges         none: token 257 (b'xxxx" in out and "(1,000,000 bytes)) is no merge" in out and len(out) < 5000
    before = tree(tmp_path)
    for main, prog, argv in ((prepare_main, "gpt-prepare", ["--tokenizer", str(rank_file), "-o", str(tmp_path / "data"), str(tmp_path / "text.txt")]),
                             (gpt_train_main, "gpt-train", [str(tmp_path / "text.txt"), "--tokenizer", str(rank_file), "--out", str(tmp_path / "run")])):
        assert main(argv) == 2
        err = one_line_error(capsys, prog)
        assert f"{rank_file}: token 257" in err and "train a tokenizer with bpe-train" in err and len(err) < 350 + len(str(rank_file)), err
        assert tree(tmp_path) == before


def test_training_on_thousands_of_files_names_a_few_and_counts_them(tmp_path, capsys):
    """A glob of 20,000 files printed a 340 KB line naming every one."""
    files = []
    for i in range(2000):
        files.append(tmp_path / f"f{i:04d}.txt")
        files[-1].write_text(f"text number {i} here.\n")
    assert train_main([*map(str, files), "--vocab-size", "270", "-o", str(tmp_path / "tok.json"), "--quiet", "--workers", "1"]) == 0
    line = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("trained on"))
    assert f"{files[4]}, ... (2,000 files) in" in line and str(files[5]) not in line and len(line) < 400 + 5 * len(str(files[0]))
