"""gpt-train: the run directory it writes, config files, SIGTERM and --resume on the command line, DDP
over gloo, and every bad input as a one-line error that touches nothing. A tiny char-level model on one
play keeps every run to seconds."""

from __future__ import annotations

import json
import os
import signal
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import gpt.memory
import tokenizers_bpe
from gpt.data import load_meta
from gpt.config import GPTConfig
from gpt.memory import micro_batch_bytes, training_state_bytes
from gpt.model import GPT
from gpt.run_state import checkpoint_dirs
from tests.conftest import ROOT
from tests.conftest import read_losses as losses
from tools.cli import ExitCode
from tools.train import main as train_main
from tools.training import DEFAULT_PRESET

TINY = ["--n-layer", "2", "--n-head", "2", "--n-embd", "32", "--n-ctx", "32", "--batch-size", "4", "--sample-tokens", "0",
        "--progress", "false", "--warmup-steps", "2", "--lr", "3e-3"]


def test_gpt_train_writes_a_complete_run_directory(data_dir, tmp_path, capsys):
    out = tmp_path / "run"
    rc = train_main(["--data", str(data_dir), "--out", str(out), "--max-steps", "8", "--eval-interval", "4", "--log-interval", "1",
                     "--keep-last", "1", *TINY, "--sample-tokens", "20"])
    assert rc == 0
    text = capsys.readouterr()
    assert "finished at step 8" in text.out and "final model" in text.out
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if "loss" in r]
    evals = [r for r in records if "val_loss" in r]
    assert [r["step"] for r in train] == list(range(1, 9))
    assert all({"step", "loss", "lr", "tokens_per_s", "grad_norm"} <= set(r) for r in train)
    assert [r["step"] for r in evals] == [4, 8]
    assert all(r["val_ppl"] == pytest.approx(np.exp(r["val_loss"])) and r["val_bpb"] > 0 and r["sample"] for r in evals)
    assert (out / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [p.name for _, p in checkpoint_dirs(out)] == ["step-000008"]  # keep_last 1
    for d in (out / "best", out / "final", out / "checkpoints" / "step-000008"):
        model = GPT.from_pretrained(d)
        assert model.config.n_embd == 32 and model.tokenizer is not None
    saved = json.loads((out / "run_config.json").read_text())
    assert saved["max_steps"] == 8 and saved["derived"]["tokens_per_step"] == 4 * 32


def test_config_file_with_command_line_overrides(data_dir, tmp_path):
    cfg = tmp_path / "run.toml"
    cfg.write_text(f'data = "{data_dir}"\nmax-steps = 3\neval_interval = 3\nlr = 1\nn_layer = 1\nn-head = 2\nn_embd = 16\nn_ctx = 16\n'
                   'batch_size = 2\nsample_tokens = 0\nprogress = false\n')
    assert train_main(["--config", str(cfg), "--out", str(tmp_path / "run"), "--lr", "0.002"]) == 0
    saved = json.loads((tmp_path / "run" / "run_config.json").read_text())
    assert saved["lr"] == 0.002 and saved["max_steps"] == 3 and saved["derived"]["model"]["n_layer"] == 1
    # The saved configuration is itself a valid --config: the same run again.
    assert train_main(["--config", str(tmp_path / "run" / "run_config.json"), "--out", str(tmp_path / "again")]) == 0
    assert losses(tmp_path / "again") == losses(tmp_path / "run")


def _wait_for_step(metrics: Path, proc: subprocess.Popen, step: int, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        if metrics.exists() and any(json.loads(line).get("step", 0) >= step for line in metrics.read_text().splitlines() if line.endswith("}")):
            return
        time.sleep(0.05)


def test_sigterm_then_resume_on_the_command_line(data_dir, tmp_path):
    args = ["--data", str(data_dir), "--max-steps", "150", "--eval-interval", "50", "--log-interval", "1", *TINY]
    assert train_main([*args, "--out", str(tmp_path / "full")]) == 0
    cut = tmp_path / "cut"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "tools.train", *args, "--out", str(cut)], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    _wait_for_step(cut / "metrics.jsonl", proc, 3)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == ExitCode.INTERRUPTED, err
    assert "interrupted at step" in out and f"gpt-train --resume {cut}" in out
    assert checkpoint_dirs(cut) and not (cut / "final").exists()
    assert train_main(["--resume", str(cut), "--progress", "false"]) == 0
    assert losses(cut) == losses(tmp_path / "full")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ddp_two_gloo_processes_match_one_process_with_twice_the_accumulation(data_dir, tmp_path):
    common = ["--data", str(data_dir), "--max-steps", "6", "--eval-interval", "3", "--log-interval", "1", *TINY]
    assert train_main([*common, "--out", str(tmp_path / "one"), "--grad-accum", "4"]) == 0
    # As the README launches it: the installed command (--no-python), from a user's project whose own
    # tools/ must not be imported in its place.
    project = tmp_path / "project"
    (project / "tools").mkdir(parents=True)
    (project / "tools" / "__init__.py").write_text("raise ImportError('the project tools/ was imported')\n")
    (project / "tools" / "train.py").write_text("raise ImportError('the project tools/train.py was imported')\n")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={_free_port()}", "--master_addr=127.0.0.1",
         "--no-python", str(Path(sys.executable).parent / "gpt-train"), *common, "--out", str(tmp_path / "two"), "--grad-accum", "2"],
        env=env, cwd=project, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    one, two = losses(tmp_path / "one"), losses(tmp_path / "two")
    assert one.keys() == two.keys() and len(one) == 6
    for step in one:
        assert two[step] == pytest.approx(one[step], rel=1e-5, abs=1e-6)
    assert proc.stdout.count("finished at step 6") == 1  # only rank 0 speaks
    evals = lambda d: [json.loads(line)["val_loss"] for line in (d / "metrics.jsonl").read_text().splitlines() if "val_loss" in line]  # noqa: E731
    assert evals(tmp_path / "two") == pytest.approx(evals(tmp_path / "one"), rel=1e-5)


def _snapshot(d: Path) -> dict[str, bytes]:
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()} if d.exists() else {}


@pytest.fixture(scope="module")
def finished_run(data_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("finished") / "run"
    assert train_main(["--data", str(data_dir), "--out", str(out), "--max-steps", "2", "--eval-interval", "2", *TINY]) == 0
    return out


def test_bad_inputs_are_one_line_errors_that_touch_nothing(data_dir, finished_run, tmp_path, capsys):
    other = tmp_path / "other"
    other.mkdir()
    (other / "meta.json").write_text("{}")
    wrong_tok = tmp_path / "wrong.json"
    tokenizers_bpe.train_char(["abc"]).save(wrong_tok)
    a_file = tmp_path / "a-file"  # a directory cannot be made under a file (unlike chmod, this holds for root too)
    a_file.write_text("x")
    corrupt = tmp_path / "corrupt"
    shutil.copytree(finished_run, corrupt)
    (checkpoint_dirs(corrupt)[-1][1] / "trainer_state.json").write_text("{not json")
    foreign = tmp_path / "foreign"  # its checkpoints are of another model than its run_config.json says
    shutil.copytree(finished_run, foreign)
    run_config = json.loads((foreign / "run_config.json").read_text())
    (foreign / "run_config.json").write_text(json.dumps({**run_config, "n_embd": 64}))
    base = ["--data", str(data_dir), *TINY]
    cases = {
        "data directory": ["--data", str(tmp_path / "nope"), "--out", str(tmp_path / "o1"), *TINY],
        "meta.json": ["--data", str(tmp_path), "--out", str(tmp_path / "o2"), *TINY],
        "not a gpt-prepare data file": ["--data", str(other), "--out", str(tmp_path / "o3"), *TINY],
        "fingerprints differ": [*base, "--tokenizer", str(wrong_tok), "--out", str(tmp_path / "o4")],
        "divisible by n_head": [*base, "--n-head", "3", "--out", str(tmp_path / "o5")],
        "--vocab-size": [*base, "--vocab-size", "10", "--out", str(tmp_path / "o6")],
        "--block-size 1000 is longer": [*base, "--block-size", "1000", "--out", str(tmp_path / "o7")],
        "lower --block-size": [*base, "--n-ctx", "100000", "--out", str(tmp_path / "o8")],
        "cannot write there": [*base, "--out", str(a_file / "sub")],
        "already holds a run": [*base, "--out", str(finished_run)],
        "not a gpt-train run": ["--resume", str(other)],
        "corrupt": ["--resume", str(corrupt)],
        "do not fit this model": ["--resume", str(foreign)],
        "cannot change when resuming": ["--resume", str(finished_run), "--n-layer", "3"],
        "unknown option": ["--config", str(wrong_tok)],  # a JSON file whose keys are not options
        "must be an integer >= 1": [*base, "--max-steps", "0", "--out", str(tmp_path / "o10")],
        "argument --threads: must be an integer in [1, ": [*base, "--threads", "0", "--out", str(tmp_path / "o10")],
        "is a file, not a data directory": ["--data", str(data_dir / "meta.json"), "--out", str(tmp_path / "o10")],
        "--init-from " + str(tmp_path / "missing") + ": no such checkpoint directory": [*base, "--init-from", str(tmp_path / "missing"), "--out", str(tmp_path / "o10")],
        "float16 needs CUDA": [*base, "--dtype", "float16", "--device", "cpu", "--out", str(tmp_path / "o10")],
    }
    before = _snapshot(finished_run), _snapshot(corrupt), _snapshot(foreign)
    for expected, argv in cases.items():
        assert train_main(argv) == 2, expected
        err = capsys.readouterr().err.strip()
        assert err.startswith("gpt-train: error:") and "\n" not in err and expected in err, (expected, err)
    assert (_snapshot(finished_run), _snapshot(corrupt), _snapshot(foreign)) == before
    assert not any((tmp_path / f"o{i}").exists() for i in range(1, 11))


def test_a_batch_that_does_not_fit_names_the_option_to_lower(data_dir, tmp_path, monkeypatch, capsys):
    # A real out-of-memory would take the machine's memory first; the CPU allocator's error is this.
    def forward(self, idx, targets=None, kv_cache=None):
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:117] data. DefaultCPUAllocator: can't allocate memory: you tried to allocate 1099511627776 bytes.")

    monkeypatch.setattr(GPT, "forward", forward)
    assert train_main(["--data", str(data_dir), "--out", str(tmp_path / "run"), *TINY]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]  # after the banner: training had started
    assert err.startswith("gpt-train: error: a micro-batch of --batch-size 4 does not fit in memory") and "lower --batch-size" in err
    assert "\n" not in err and not (tmp_path / "run" / "checkpoints").exists()


def test_a_batch_far_beyond_memory_is_refused_before_anything_is_written(data_dir, tmp_path, capsys):
    # For real: on a CPU such a batch would not raise, the OS would kill the process.
    argv = ["--data", str(data_dir), "--out", str(tmp_path / "run"), *TINY, "--batch-size", str(10**9)]
    assert train_main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"gpt-train: error: a micro-batch of --batch-size {10**9} x --block-size") and "\n" not in err
    assert "lower --batch-size" in err and not (tmp_path / "run").exists()


def tiny_training_bytes(data_dir) -> tuple[int, int]:
    """TINY's micro-batch and its parameters' training state (weights not built yet included)."""
    n_vocab = load_meta(data_dir).n_vocab
    parameters = GPTConfig.from_preset(DEFAULT_PRESET, n_layer=2, n_head=2, n_embd=32, n_ctx=32, vocab_size=n_vocab).num_parameters()
    return micro_batch_bytes(2, 32, n_vocab, 4, 32, torch.float32), training_state_bytes(parameters, unbuilt_parameters=parameters)


def test_a_batch_close_to_the_memory_limit_is_a_warning_not_an_error(data_dir, tmp_path, monkeypatch, capsys):
    need = sum(tiny_training_bytes(data_dir))
    monkeypatch.setattr(gpt.memory, "available_memory_bytes", lambda: int(need * 1.5))
    assert train_main(["--data", str(data_dir), "--out", str(tmp_path / "run"), *TINY, "--max-steps", "2"]) == 0
    err = capsys.readouterr().err
    assert "gpt-train: warning: a micro-batch of --batch-size 4 x --block-size 32 needs at least" in err
    assert "if the process is killed, lower --batch-size" in err and (tmp_path / "run" / "final").is_dir()


def test_training_whose_weights_gradients_and_optimizer_state_cannot_fit_is_refused(data_dir, tmp_path, monkeypatch, capsys):
    """Only the micro-batch was checked: a model whose weights fitted but not their gradients and AdamW's
    moments (16 bytes a parameter) was killed by the OS at its first step. Both checks count them: the
    one before the text stages and the one once the model is built; a batch that cannot fit beside them
    names the batch and the state."""
    batch, state = tiny_training_bytes(data_dir)
    for available, says in ((state // 2, "needs at least 0.0 GiB more (the gradients and AdamW state"),
                            (state + batch // 2, "with 0.0 GiB for the weights' training state")):
        monkeypatch.setattr(gpt.memory, "available_memory_bytes", lambda available=available: available)
        assert train_main(["--data", str(data_dir), "--out", str(tmp_path / "run"), *TINY, "--max-steps", "2"]) == ExitCode.USER_ERROR
        assert says in capsys.readouterr().err
        assert not (tmp_path / "run").exists()
