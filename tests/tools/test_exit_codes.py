"""One exit-code table for every command (tools.cli.ExitCode): each console script through a user error,
and the two training commands through an interrupt and a divergence."""

from __future__ import annotations

import importlib
import json
import signal
import string
import tomllib

import pytest
import torch

from gpt.model import GPT, GPTConfig
from gpt.trainer import Trainer
from tests.conftest import ROOT
from tokenizers_bpe import CharTokenizer
from tools.cli import ExitCode

SCRIPTS = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]["scripts"]
TINY_TRAIN = ["--n-layer", "1", "--n-head", "2", "--n-embd", "16", "--n-ctx", "16", "--batch-size", "2", "--sample-tokens", "0",
              "--progress", "false", "--max-steps", "6", "--eval-interval", "2", "--warmup-steps", "1"]
FINETUNE = ["--device", "cpu", "--progress", "false", "--max-steps", "6", "--eval-interval", "2", "--batch-size", "2"]


def command(name: str):
    module, _, function = SCRIPTS[name].partition(":")
    return getattr(importlib.import_module(module), function)


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A tiny GPT checkpoint with a char-level tokenizer, and instruction records it can encode."""
    root = tmp_path_factory.mktemp("base")
    tok = CharTokenizer.from_texts([string.printable], special_tokens=["<|endoftext|>"])
    torch.manual_seed(0)
    GPT(GPTConfig(vocab_size=tok.n_vocab, n_ctx=256, n_embd=16, n_layer=1, n_head=2)).save_pretrained(root / "ckpt", tokenizer=tok)
    records = [{"instruction": f"Say {w}.", "input": "", "output": w} for w in ("sun", "moon", "star", "sky", "sea", "rain")]
    (root / "data.json").write_text(json.dumps(records), encoding="utf-8")
    return root


def user_errors(tmp_path, base) -> dict[str, list[str]]:
    missing = str(tmp_path / "missing")
    return {
        "bpe-train": [missing, "-o", str(tmp_path / "tok.json")],
        "bpe-encode": ["--tokenizer", missing, "hello"],
        "bpe-decode": ["--tokenizer", missing, "[1, 2]"],
        "bpe-inspect": [missing],
        "bpe-export": [missing, "--format", "hf", "-o", str(tmp_path / "hf")],
        "gpt-prepare": [missing, "--tokenizer", missing, "-o", str(tmp_path / "data")],
        "gpt-train": ["--data", missing, "--out", str(tmp_path / "run")],
        "gpt-generate": ["--model", missing, "Hello"],
        "gpt-convert": ["hf-export", missing, str(tmp_path / "hf")],
        "gpt-inspect": [missing],
        "gpt-finetune": ["instruct", "--model", str(base / "ckpt"), "--data", missing, "--out", str(tmp_path / "ft")],
        "gpt-classify": ["--model", missing, "some text"],
        "gpt-genre-experiment": ["--work", str(tmp_path / "work"), "--variants", "missing"],
    }


def test_every_command_exits_2_on_a_user_error(tmp_path, base, capsys):
    cases = user_errors(tmp_path, base)
    assert set(cases) == set(SCRIPTS)  # a new command gets a case here
    for name, argv in cases.items():
        assert command(name)(argv) == ExitCode.USER_ERROR, name
        err = capsys.readouterr().err
        assert err.startswith(f"{name}: error: ") and err.count("\n") == 1, (name, err)
        assert "missing" in err, (name, err)  # the line names the file at fault
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # and nothing was written


@pytest.fixture
def interrupt_at_step_2(monkeypatch):
    """Ctrl-C while the trainer runs its third step."""
    train_step = Trainer.train_step

    def interrupted_step(self):
        if self.step == 2:
            signal.raise_signal(signal.SIGINT)
        return train_step(self)

    monkeypatch.setattr(Trainer, "train_step", interrupted_step)


@pytest.fixture
def diverging(monkeypatch):
    """A loss that turns NaN at the third step."""
    forward = GPT.forward
    steps = []

    def nan_forward(self, idx, targets=None, kv_cache=None):
        logits, loss = forward(self, idx, targets, kv_cache)
        if loss is not None and self.training:
            steps.append(1)
            if len(steps) > 2:
                loss = loss * float("nan")
        return logits, loss

    monkeypatch.setattr(GPT, "forward", nan_forward)


def training_commands(tmp_path, data_dir, base) -> dict[str, list[str]]:
    return {
        "gpt-train": ["--data", str(data_dir), "--out", str(tmp_path / "run"), *TINY_TRAIN],
        "gpt-finetune": ["instruct", "--model", str(base / "ckpt"), "--data", str(base / "data.json"), "--val-fraction", "0.34",
                         "--out", str(tmp_path / "ft"), *FINETUNE],
    }


@pytest.mark.parametrize("name", ["gpt-train", "gpt-finetune"])
def test_training_interrupted_exits_130_after_a_checkpoint(name, tmp_path, data_dir, base, interrupt_at_step_2, capsys):
    assert command(name)(training_commands(tmp_path, data_dir, base)[name]) == ExitCode.INTERRUPTED == 130
    out = capsys.readouterr().out
    assert "interrupted at step 3" in out and "resume with:" in out


@pytest.mark.parametrize("name", ["gpt-train", "gpt-finetune"])
def test_training_diverged_exits_3_naming_the_last_good_checkpoint(name, tmp_path, data_dir, base, diverging, capsys):
    assert command(name)(training_commands(tmp_path, data_dir, base)[name]) == ExitCode.DIVERGED == 3
    err = capsys.readouterr().err.strip().splitlines()[-1]  # after the start-up banner
    assert err.startswith(f"{name}: error: non-finite loss"), err
    assert "the last good checkpoint is" in err and "step-000002" in err
