"""Every input checked before any work: options out of range (on the command line or in a --config
file), data that does not fit its metadata, a kernels backend the machine cannot run, an --out holding
the user's files. Each is one line, exit 2, before anything is written or trained."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from gpt.model import GPT, GPTConfig
from tests.conftest import ROOT
from tokenizers_bpe import CharTokenizer
from tools.cli import ExitCode
from tools.generate import main as generate
from tools.train import main as train

TINY = ["--n-layer", "1", "--n-head", "2", "--n-embd", "16", "--n-ctx", "16", "--batch-size", "2", "--sample-tokens", "0",
        "--progress", "false", "--max-steps", "2", "--eval-interval", "2"]


def snapshot(d: Path) -> dict[str, bytes]:
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()} if d.exists() else {}


def one_line_error(capsys, prog: str = "gpt-train") -> str:
    err = capsys.readouterr().err
    assert err.startswith(f"{prog}: error: ") and err.count("\n") == 1, err
    return err


BAD_OPTIONS = {
    "--seed": ("-1", "integer in [0, 2147483647]"),
    "--lr": ("inf", "--lr"),
    "--weight-decay": ("nan", "--weight-decay"),
    "--grad-clip": ("nan", "--grad-clip"),
    "--block-size": ("0", "integer >= 1"),
    "--batch-tokens": ("-5", "integer >= 1"),
    "--eval-stride": ("0", "integer >= 1"),
    "--dropout": ("1.5", "--dropout"),
    "--beta2": ("1", "--beta2"),
    "--n-layer": ("0", "integer >= 1"),
    "--device": ("gpu", "--device"),
    "--preset": ("huge", "--preset"),
}


@pytest.mark.parametrize("flag", BAD_OPTIONS)
def test_an_option_out_of_range_is_refused_before_any_work(data_dir, tmp_path, capsys, flag):
    value, words = BAD_OPTIONS[flag]
    assert train(["--data", str(data_dir), "--out", str(tmp_path / "run"), *TINY, flag, value]) == ExitCode.USER_ERROR
    err = one_line_error(capsys)
    assert flag in err and words in err, err
    assert not (tmp_path / "run").exists()
    # The same value in a --config file is refused the same way, naming the file and the option.
    config = tmp_path / "run.json"
    config.write_text(json.dumps({"data": str(data_dir), flag[2:]: float(value) if value in ("inf", "nan") else value}))
    assert train(["--config", str(config), "--out", str(tmp_path / "run"), *TINY]) == ExitCode.USER_ERROR
    assert "run.json" in one_line_error(capsys) and not (tmp_path / "run").exists()


def test_token_ids_beyond_the_vocabulary_are_found_before_training(data_dir, tmp_path, capsys):
    bad = tmp_path / "data"
    shutil.copytree(data_dir, bad)
    meta = json.loads((bad / "meta.json").read_text())
    tokens = np.memmap(bad / "train.bin", dtype=meta["dtype"], mode="r+")
    tokens[1234] = meta["n_vocab"] + 7
    tokens.flush()
    del tokens
    assert train(["--data", str(bad), "--out", str(tmp_path / "run"), *TINY]) == ExitCode.USER_ERROR
    err = one_line_error(capsys)
    assert "train.bin: token id" in err and "at position 1,234" in err and "re-run gpt-prepare" in err
    assert not (tmp_path / "run").exists()


def test_an_out_holding_the_users_files_is_refused_before_any_work(data_dir, tmp_path, capsys):
    project = tmp_path / "project"
    project.mkdir()
    (project / "notes.txt").write_text("mine")
    (project / "metrics.jsonl").write_text("not ours either\n")
    before = snapshot(project)
    assert train(["--data", str(data_dir), "--out", str(project), *TINY]) == ExitCode.USER_ERROR
    assert "is not a run directory this toolkit wrote" in one_line_error(capsys)
    assert snapshot(project) == before


def test_resume_says_which_value_the_run_used(data_dir, tmp_path, capsys):
    run = tmp_path / "run"
    assert train(["--data", str(data_dir), "--out", str(run), "--preset", "tiny", *TINY[8:], "--n-ctx", "16"]) == 0
    capsys.readouterr()
    assert train(["--resume", str(run), "--n-layer", "3"]) == ExitCode.USER_ERROR
    assert "--n-layer cannot change when resuming (the run used 2)" in one_line_error(capsys)


def test_the_triton_backend_without_a_gpu_is_one_line_before_anything_is_written(data_dir, tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "GPT2_KERNELS_BACKEND", "KERNELS_BACKEND")}
    env.update(PYTHONPATH=str(ROOT))
    for extra, name in (({}, "--backend"), ({"GPT2_KERNELS_BACKEND": "triton"}, "GPT2_KERNELS_BACKEND=triton")):
        argv = ["--data", str(data_dir), "--out", str(tmp_path / "run"), *TINY] + (["--backend", "triton"] if not extra else [])
        done = subprocess.run([sys.executable, "-m", "tools.train", *argv], env={**env, **extra}, capture_output=True, text=True,
                              timeout=300)
        err = done.stderr.strip()
        if torch.cuda.is_available():
            pytest.skip("this machine has a GPU: the Triton backend runs")
        assert done.returncode == ExitCode.USER_ERROR and "\n" not in err and name in err and "CUDA" in err, err
        assert not (tmp_path / "run").exists()


@pytest.fixture
def tiny_run(tmp_path):
    tok = CharTokenizer.from_texts(["abcdefgh \n"], special_tokens=["<|endoftext|>"])
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=tok.n_vocab, n_ctx=32, n_embd=16, n_layer=1, n_head=2))
    run = tmp_path / "run"
    model.save_pretrained(run / "final", tokenizer=tok)
    return run


def test_gpt_generate_takes_a_run_directory(tiny_run, capsys):
    assert generate(["--model", str(tiny_run), "abc", "-n", "3", "--temperature", "0"]) == 0
    err = capsys.readouterr().err
    assert f"{tiny_run} is a run directory; using its model {tiny_run / 'final'}" in err


def test_gpt_generate_on_nan_weights_is_one_line(tiny_run, capsys):
    model = GPT.from_pretrained(tiny_run / "final")
    with torch.no_grad():
        model.transformer.h[0].mlp.c_fc.weight.fill_(float("nan"))
    model.save_pretrained(tiny_run / "nan")
    assert generate(["--model", str(tiny_run / "nan"), "abc", "-n", "3"]) == ExitCode.USER_ERROR
    assert "not finite" in one_line_error(capsys, "gpt-generate")


def test_unknown_keys_in_generation_json_are_an_error(tiny_run, capsys):
    (tiny_run / "final" / "generation.json").write_text(json.dumps({"temperature": 0.5, "top_kk": 3}))
    assert generate(["--model", str(tiny_run / "final"), "abc", "-n", "3"]) == ExitCode.USER_ERROR
    assert "generation.json: unknown setting(s) top_kk" in one_line_error(capsys, "gpt-generate")


def test_gpt_finetune_refuses_an_out_of_the_users_files_before_training(tiny_run, tmp_path, capsys):
    from tools.finetune import main as finetune

    records = [{"instruction": f"Say {w}.", "input": "", "output": w} for w in ("ab", "cd", "ef", "gh")]
    (tmp_path / "data.json").write_text(json.dumps(records))
    project = tmp_path / "project"
    project.mkdir()
    (project / "notes.txt").write_text("mine")
    before = snapshot(project)
    argv = ["instruct", "--model", str(tiny_run), "--data", str(tmp_path / "data.json"), "--out", str(project), "--device", "cpu"]
    assert finetune(argv) == ExitCode.USER_ERROR
    assert "is not a run directory this toolkit wrote" in one_line_error(capsys, "gpt-finetune")
    assert snapshot(project) == before
