"""gpt-train FILE: from text to a trained model in one command. Its tokenizer and data are byte for byte
what bpe-train and gpt-prepare write with the same options; --resume does not redo them; a bad input in
any stage is one line before the first stage runs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tools.bpe_train import main as bpe_train
from tools.cli import ExitCode
from tools.corpus import plays
from tools.generate import main as generate
from tools.prepare import main as prepare
from tools.train import main as train

QUICK = ["--progress", "false", "--sample-tokens", "0"]


@pytest.fixture
def corpus(tmp_path) -> Path:
    path = tmp_path / "corpus.txt"
    path.write_text(plays()[3].text(), encoding="utf-8")
    return path


def test_one_command_from_text_to_a_model(corpus, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert train(["corpus.txt", "--out", "runs/x", "--preset", "tiny", "--max-steps", "20", *QUICK]) == 0
    err = capsys.readouterr().err
    assert "1/3 tokenizer" in err and "2/3 data" in err
    run = tmp_path / "runs" / "x"
    assert sorted(p.name for p in (run / "data").iterdir()) == ["meta.json", "tokenizer.json", "train.bin", "val.bin"]
    assert (run / "final" / "config.json").is_file() and (run / "run_config.json").is_file()
    saved = json.loads((run / "run_config.json").read_text())
    assert saved["files"] == [str(Path("corpus.txt").resolve())] and saved["data"] == str(Path("runs/x/data").resolve()) and saved["format"] == "gpt-run"
    assert generate(["--model", "runs/x/final", "Hello", "-n", "5"]) == 0
    # The same files as the three separate commands write with the same options.
    assert bpe_train(["corpus.txt", "-o", "tok.json", "--quiet"]) == 0
    assert prepare(["corpus.txt", "--tokenizer", "tok.json", "-o", "data", "--quiet"]) == 0
    assert (tmp_path / "tok.json").read_bytes() == (run / "tokenizer.json").read_bytes() == (run / "data" / "tokenizer.json").read_bytes()
    for name in ("train.bin", "val.bin", "meta.json"):
        assert (tmp_path / "data" / name).read_bytes() == (run / "data" / name).read_bytes(), name
    meta = json.loads((run / "data" / "meta.json").read_text())
    assert meta["splits"]["train"]["documents"] == meta["splits"]["val"]["documents"] == 1  # one file, in both splits
    # --resume continues the run without making the tokenizer or the data again.
    stamps = {p: p.stat().st_mtime_ns for p in (run / "tokenizer.json", run / "data" / "train.bin")}
    capsys.readouterr()
    assert train(["--resume", "runs/x", "--max-steps", "30"]) == 0
    out, err = capsys.readouterr()
    assert "1/3" not in err and "finished at step 30" in out
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps
    # Resuming a finished run says there is nothing to do, and how to train further.
    assert train(["--resume", "runs/x"]) == 0
    out = capsys.readouterr().out
    assert "nothing to train: the run was already at step 30" in out and "--max-steps 60" in out and "0 tok/s" not in out
    # A second run on the same directory is the usual clear error.
    assert train(["corpus.txt", "--out", "runs/x", *QUICK]) == ExitCode.USER_ERROR
    assert "already holds a run; continue it with --resume" in capsys.readouterr().err


def test_builtin_corpus_and_char_level(tmp_path, capsys):
    argv = ["--builtin", "shakespeare", "--char", "--out", str(tmp_path / "run"), "--preset", "tiny", "--max-steps", "2", *QUICK]
    assert train(argv) == 0
    meta = json.loads((tmp_path / "run" / "data" / "meta.json").read_text())
    assert meta["sources"] == [{"builtin": "shakespeare", "bytes": meta["sources"][0]["bytes"]}]
    assert meta["splits"]["train"]["documents"] > 30 and meta["splits"]["val"]["documents"] >= 1


def bad_inputs(tmp_path: Path, corpus: Path) -> dict[str, tuple[list[str], str]]:
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes("hello world\n".encode() * 200 + "caf\u00e9\n".encode("latin-1"))
    tiny = tmp_path / "tiny.txt"
    tiny.write_text("........")
    c = str(corpus)
    return {
        "missing file": ([str(tmp_path / "nope.txt")], "nope.txt: no such file"),
        "a directory": ([str(tmp_path)], "is a directory"),
        "invalid UTF-8": ([c, str(latin1)], "latin1.txt: not UTF-8 at byte offset 2403"),
        "vocabulary too small": ([c, "--vocab-size", "100"], "vocab size 100 is too small"),
        "bad pattern": ([c, "--pattern", "(unclosed"], "--pattern"),
        "val fraction": ([c, "--val-fraction", "1.5"], "--val-fraction"),
        "no split possible": ([str(tiny)], "split would be empty"),
        "model shape": ([c, "--n-head", "3", "--n-embd", "64"], "divisible by n_head"),
        "window longer than the context": ([c, "--block-size", "4096", "--preset", "tiny"], "--block-size 4096 is longer"),
        "both text and data": ([c, "--data", str(tmp_path)], "not both"),
        "text option with data": (["--data", str(tmp_path), "--val-fraction", "0.2"], "--val-fraction go with text FILEs"),
        "eot without the token": ([c, "--special", "<|pad|>", "--append-eot"], "--append-eot"),
        "tokenizer and its options": ([c, "--tokenizer", str(tmp_path / "t.json"), "--vocab-size", "300"], "drop --vocab-size"),
        "out is the input": ([c, "--out", c], "is the input"),
    }


def test_bad_input_in_any_stage_is_one_line_before_the_first_stage(corpus, tmp_path, capsys):
    for name, (argv, expected) in bad_inputs(tmp_path, corpus).items():
        before = sorted(p.name for p in tmp_path.iterdir())
        out = [] if "--out" in argv else ["--out", str(tmp_path / "run")]
        assert train([*argv, *out, *QUICK]) == ExitCode.USER_ERROR, name
        err = capsys.readouterr().err
        assert err.startswith("gpt-train: error: ") and err.count("\n") == 1, (name, err)
        assert expected in err, (name, err)
        assert sorted(p.name for p in tmp_path.iterdir()) == before, name  # nothing written, not even the run directory


def test_the_stages_are_redone_when_a_kill_came_before_the_data(corpus, tmp_path, capsys, monkeypatch):
    import tools.train_text

    def killed(*args, **kwargs):
        raise KeyboardInterrupt  # as a Ctrl-C in the data stage

    monkeypatch.setattr(tools.train_text, "prepare", killed)
    argv = [str(corpus), "--out", str(tmp_path / "run"), "--preset", "tiny", "--max-steps", "2", *QUICK]
    assert train(argv) == ExitCode.INTERRUPTED
    monkeypatch.undo()
    assert (tmp_path / "run" / "tokenizer.json").is_file() and not (tmp_path / "run" / "data").exists()
    assert not (tmp_path / "run" / ".lock").exists()
    assert train(["--resume", str(tmp_path / "run")]) == 0  # makes the data, then trains
    assert (tmp_path / "run" / "final").is_dir()
