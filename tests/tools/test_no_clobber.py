"""Outputs that cannot clobber: every command refuses an output that is one of its inputs, holds one, or
holds something this toolkit did not write (its stamp decides, never file names), with one line,
exit 2, and the user's files byte-identical; its own earlier output of the same kind is replaced; what
it writes honours the umask."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import tokenizers_bpe
from gpt.model import GPT, GPTConfig
from tests.conftest import ROOT
from tools.bpe_train import main as bpe_train
from tools.cli import ExitCode
from tools.convert import main as convert
from tools.prepare import main as prepare


def snapshot(d: Path) -> dict[str, bytes]:
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


def one_line_error(capsys, prog: str) -> str:
    err = capsys.readouterr().err
    assert err.startswith(f"{prog}: error: ") and err.count("\n") == 1, err
    return err


@pytest.fixture
def corpus(tmp_path) -> Path:
    path = tmp_path / "corpus.txt"
    path.write_text("To be, or not to be, that is the question.\n" * 40, encoding="utf-8")
    return path


def test_bpe_train_refuses_to_write_over_its_input_or_a_users_file(tmp_path, corpus, capsys):
    before = snapshot(tmp_path)
    assert bpe_train([str(corpus), "--vocab-size", "260", "-o", str(corpus), "--quiet"]) == ExitCode.USER_ERROR
    assert "is the input" in one_line_error(capsys, "bpe-train")
    notes = tmp_path / "notes.json"
    notes.write_text('{"mine": true}')
    before = snapshot(tmp_path)
    assert bpe_train([str(corpus), "--vocab-size", "260", "-o", str(notes), "--quiet"]) == ExitCode.USER_ERROR
    assert "already exists and is not a tokenizer.json this toolkit wrote" in one_line_error(capsys, "bpe-train")
    assert snapshot(tmp_path) == before
    # Its own previous output is replaced.
    out = tmp_path / "tok.json"
    for vocab in ("260", "270"):
        assert bpe_train([str(corpus), "--vocab-size", vocab, "-o", str(out), "--quiet"]) == 0
    assert tokenizers_bpe.load(out).n_vocab == 270


def test_gpt_prepare_refuses_a_folder_of_the_users_files_with_the_same_names(tmp_path, corpus, capsys):
    tok = tmp_path / "tok.json"
    tokenizers_bpe.train_char([corpus.read_text()]).save(tok)
    project = tmp_path / "proj"
    project.mkdir()
    (project / "meta.json").write_text('{"my": "metadata"}')
    (project / "tokenizer.json").write_text('{"my": "tokenizer"}')
    before = snapshot(tmp_path)
    assert prepare([str(corpus), "--tokenizer", str(tok), "-o", str(project), "--quiet"]) == ExitCode.USER_ERROR
    assert "is not a gpt-prepare data directory this toolkit wrote" in one_line_error(capsys, "gpt-prepare")
    assert prepare([str(corpus), "--tokenizer", str(tok), "-o", str(tmp_path), "--quiet"]) == ExitCode.USER_ERROR
    assert "holds the input" in one_line_error(capsys, "gpt-prepare")
    assert snapshot(tmp_path) == before
    data = tmp_path / "data"
    for _ in range(2):  # its own output is replaced
        assert prepare([str(corpus), "--tokenizer", str(tok), "-o", str(data), "--quiet"]) == 0
    capsys.readouterr()


def test_gpt_convert_refuses_a_folder_with_the_users_config_json(tmp_path, capsys):
    tok = tokenizers_bpe.train_char(["abcdefgh "])
    torch.manual_seed(0)
    GPT(GPTConfig(vocab_size=tok.n_vocab, n_ctx=8, n_embd=8, n_layer=1, n_head=2)).save_pretrained(tmp_path / "ckpt", tokenizer=tok)
    project = tmp_path / "proj"
    project.mkdir()
    (project / "config.json").write_text('{"project": "mine"}')
    before = snapshot(tmp_path)
    for command in ("hf-export", "merge-lora"):
        assert convert([command, str(tmp_path / "ckpt"), str(project)]) == ExitCode.USER_ERROR
        assert "already exists and holds config.json, and is not" in one_line_error(capsys, "gpt-convert")
    assert convert(["hf-export", str(tmp_path / "ckpt"), str(tmp_path / "ckpt" / "..")]) == ExitCode.USER_ERROR
    assert "holds the input" in one_line_error(capsys, "gpt-convert")
    assert snapshot(tmp_path) == before
    for _ in range(2):  # its own export is replaced
        assert convert(["hf-export", str(tmp_path / "ckpt"), str(tmp_path / "hf")]) == 0
    assert json.loads((tmp_path / "hf" / "gpt2_toolkit_export.json").read_text())["format"] == "gpt2-toolkit-hf-export"


def test_a_pytorch_bin_of_random_bytes_is_called_what_it_is(tmp_path, capsys):
    src = tmp_path / "hf"
    src.mkdir()
    (src / "config.json").write_text(json.dumps({"model_type": "gpt2", "vocab_size": 10, "n_positions": 8, "n_embd": 8,
                                                 "n_layer": 1, "n_head": 2}))
    (src / "pytorch_model.bin").write_bytes(os.urandom(4096))
    tokenizers_bpe.train_char(["abcdefghi"], special_tokens=()).save(tmp_path / "tok.json")
    assert convert(["hf-import", str(src), str(tmp_path / "out"), "--tokenizer", str(tmp_path / "tok.json")]) == ExitCode.USER_ERROR
    err = one_line_error(capsys, "gpt-convert")
    assert "pytorch_model.bin: not a PyTorch weights file" in err and "pickle code" not in err, err


def test_outputs_honour_the_umask(tmp_path, corpus):
    code = f"""
import os, sys
os.umask(0o022)
from tools.bpe_train import main as bpe_train
from tools.prepare import main as prepare
assert bpe_train([{str(corpus)!r}, "--vocab-size", "260", "-o", {str(tmp_path / "tok.json")!r}, "--quiet"]) == 0
assert prepare([{str(corpus)!r}, "--tokenizer", {str(tmp_path / "tok.json")!r}, "-o", {str(tmp_path / "data")!r}, "--quiet", "--workers", "1"]) == 0
"""
    done = subprocess.run([sys.executable, "-c", code], env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert (tmp_path / "tok.json").stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "data").stat().st_mode & 0o777 == 0o755
    assert {p.stat().st_mode & 0o777 for p in (tmp_path / "data").iterdir()} == {0o644}
