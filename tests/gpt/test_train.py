"""The trainer: schedule, optimiser groups, batches, the run directory, exact resume, signals,
non-finite losses, DDP over gloo, and gpt-train's errors. A tiny char-level model on one play keeps
every run to seconds."""

from __future__ import annotations

import json
import math
import os
import signal
import socket
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import tokenizers_bpe
from gpt.data import RandomWindows, SlidingWindows, load_meta, open_split
from gpt.model import GPT, GPTConfig
from gpt.train import main as train_main
from gpt.trainer import TrainConfig, Trainer, TrainingDiverged, build_optimizer, checkpoint_dirs, lm_loss, lr_at
from tools.corpus import plays
from tools.prepare import main as prepare_main

ROOT = Path(__file__).resolve().parents[2]
TINY = ["--n-layer", "2", "--n-head", "2", "--n-embd", "32", "--n-ctx", "32", "--batch-size", "4", "--sample-tokens", "0",
        "--progress", "false", "--warmup-steps", "2", "--lr", "3e-3"]


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("data")
    text = plays()[0].text()
    (root / "play.txt").write_text(text, encoding="utf-8")
    tokenizers_bpe.train_char([text]).save(root / "char.json")
    assert prepare_main([str(root / "play.txt"), "--tokenizer", str(root / "char.json"), "-o", str(root / "data"), "--workers", "1", "--quiet"]) == 0
    return root / "data"


def losses(run_dir: Path) -> dict[int, float]:
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in lines if "loss" in r}


def tiny_model(data_dir: Path, dropout: float = 0.0) -> GPT:
    torch.manual_seed(0)
    return GPT(GPTConfig(vocab_size=load_meta(data_dir).n_vocab, n_layer=2, n_head=2, n_embd=32, n_ctx=32, dropout=dropout))


def tiny_trainer(data_dir: Path, out: Path, loss_fn=lm_loss, dropout: float = 0.0, **overrides) -> Trainer:
    meta = load_meta(data_dir)
    cfg = TrainConfig(**{**dict(max_steps=12, batch_size=4, lr=3e-3, warmup_steps=2, eval_interval=4, eval_iters=2, log_interval=1,
                                 checkpoint_interval=2, keep_last=2, progress=False, device="cpu"), **overrides})
    train = RandomWindows(open_split(data_dir, "train", meta), 32, 4, seed=cfg.seed)
    val = SlidingWindows(open_split(data_dir, "val", meta), 32, 4, max_batches=2)
    tok = tokenizers_bpe.load(data_dir / "tokenizer.json")
    return Trainer(tiny_model(data_dir, dropout), cfg, train, val, out_dir=out, loss_fn=loss_fn, tokenizer=tok,
                   bytes_per_token=meta.bytes_per_token())


# ---------------------------------------------------------------------------------------------- pieces


def test_lr_schedule_warms_up_then_decays_to_the_floor():
    cfg = TrainConfig(lr=1.0, min_lr=0.1, warmup_steps=10, max_steps=110)
    lrs = [lr_at(s, cfg) for s in range(130)]
    assert lrs[0] == pytest.approx(1 / 11) and lrs[9] == pytest.approx(10 / 11)
    assert lrs[10] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(lrs[10:110], lrs[11:110]))  # cosine decays monotonically
    assert lrs[60] == pytest.approx(0.55)  # half way: the mean of peak and floor
    assert lrs[110:] == [0.1] * 20


def test_weight_decay_only_on_matrices_and_embeddings():
    model = GPT(GPTConfig(vocab_size=50, n_layer=1, n_head=2, n_embd=16, n_ctx=8))
    opt = build_optimizer(model, TrainConfig(), "cpu")
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.dim() >= 2 for p in decay["params"]) and all(p.dim() < 2 for p in no_decay["params"])
    assert sum(p.numel() for g in opt.param_groups for p in g["params"]) == model.num_parameters()  # tied wte/lm_head once
    assert opt.defaults["betas"] == (0.9, 0.95)


def test_random_windows_are_reproducible_and_sharded_by_rank():
    tokens = np.arange(1000, dtype=np.uint16)
    single = RandomWindows(tokens, 8, 3, seed=5, grad_accum=4)
    x, y = single(7, 1)
    assert torch.equal(x[:, 1:], y[:, :-1]) and torch.equal(x, single(7, 1)[0])  # targets shifted, deterministic
    assert not torch.equal(x, single(8, 1)[0])
    # Two ranks with accumulation 2 see exactly the micro-batches of one process with accumulation 4.
    ranks = [RandomWindows(tokens, 8, 3, seed=5, grad_accum=2, rank=r, world_size=2) for r in range(2)]
    one = sorted(tuple(single(7, m)[0].flatten().tolist()) for m in range(4))
    two = sorted(tuple(ranks[r](7, m)[0].flatten().tolist()) for r in range(2) for m in range(2))
    assert one == two


def test_sliding_windows_follow_the_stride_and_cover_ranks():
    tokens = np.arange(100, dtype=np.uint16)
    batches = list(SlidingWindows(tokens, 10, 4, stride=5)())
    starts = [int(row[0]) for x, _ in batches for row in x]
    assert starts == list(range(0, 90, 5))
    x, y = batches[0]
    assert torch.equal(y, x + 1)
    halves = [[int(row[0]) for x, _ in SlidingWindows(tokens, 10, 4, stride=5, rank=r, world_size=2)() for row in x] for r in range(2)]
    assert sorted(halves[0] + halves[1]) == starts
    assert len(list(SlidingWindows(tokens, 10, 2, stride=5, max_batches=2)())) == 2


# ---------------------------------------------------------------------------------------------- runs


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


def test_exact_resume_after_sigint_reproduces_the_losses_bit_for_bit(data_dir, tmp_path):
    full = tiny_trainer(data_dir, tmp_path / "full", dropout=0.1)
    assert not full.fit().interrupted

    def interrupting_loss(model, batch):
        if trainer.step == 6:  # Ctrl-C in the middle of step 7
            signal.raise_signal(signal.SIGINT)
        return lm_loss(model, batch)

    trainer = tiny_trainer(data_dir, tmp_path / "cut", interrupting_loss, dropout=0.1)
    result = trainer.fit()
    assert result.interrupted and result.step == 7 and result.stop_signal == signal.SIGINT
    assert (tmp_path / "cut" / "checkpoints" / "step-000007").is_dir() and not (tmp_path / "cut" / "final").exists()
    resumed = tiny_trainer(data_dir, tmp_path / "cut", dropout=0.1)
    assert resumed.fit(resume=True).step == 12
    assert losses(tmp_path / "cut") == losses(tmp_path / "full")  # exact float equality, every step
    assert len(losses(tmp_path / "full")) == 12


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(data_dir, tmp_path):
    def exploding_loss(model, batch):
        loss = lm_loss(model, batch)
        return loss * float("nan") if trainer.step == 4 else loss  # step 5 diverges

    trainer = tiny_trainer(data_dir, tmp_path / "run", exploding_loss)
    with pytest.raises(TrainingDiverged, match="at step 5"):
        trainer.fit()
    assert [p.name for _, p in checkpoint_dirs(tmp_path / "run")] == ["step-000002", "step-000004"]
    state = json.loads((tmp_path / "run" / "checkpoints" / "step-000004" / "trainer_state.json").read_text())
    assert state["step"] == 4 and not (tmp_path / "run" / "final").exists()
    assert max(losses(tmp_path / "run")) == 4


def test_bfloat16_autocast_on_cpu_trains_fp32_weights(data_dir, tmp_path):
    trainer = tiny_trainer(data_dir, tmp_path / "run", dtype="bfloat16", max_steps=6, eval_interval=6)
    assert trainer.dtype == torch.bfloat16
    result = trainer.fit()
    assert result.step == 6 and result.last_eval["val_loss"] < math.log(load_meta(data_dir).n_vocab)  # below a uniform guess
    assert GPT.from_pretrained(tmp_path / "run" / "final").transformer.wte.weight.dtype == torch.float32


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
    proc = subprocess.Popen([sys.executable, "-m", "gpt.train", *args, "--out", str(cut)], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    _wait_for_step(cut / "metrics.jsonl", proc, 3)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, err
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
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={_free_port()}", "--master_addr=127.0.0.1",
         "-m", "gpt.train", *common, "--out", str(tmp_path / "two"), "--grad-accum", "2"],
        env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    one, two = losses(tmp_path / "one"), losses(tmp_path / "two")
    assert one.keys() == two.keys() and len(one) == 6
    for step in one:
        assert two[step] == pytest.approx(one[step], rel=1e-5, abs=1e-6)
    assert proc.stdout.count("finished at step 6") == 1  # only rank 0 speaks
    evals = lambda d: [json.loads(line)["val_loss"] for line in (d / "metrics.jsonl").read_text().splitlines() if "val_loss" in line]  # noqa: E731
    assert evals(tmp_path / "two") == pytest.approx(evals(tmp_path / "one"), rel=1e-5)


# ---------------------------------------------------------------------------------------------- bad input


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
        "--threads must be at least 1": [*base, "--threads", "0", "--out", str(tmp_path / "o10")],
        "is a file, not a data directory": ["--data", str(data_dir / "meta.json"), "--out", str(tmp_path / "o10")],
        "--init-from " + str(tmp_path / "missing") + ": checkpoint directory not found": [*base, "--init-from", str(tmp_path / "missing"), "--out", str(tmp_path / "o10")],
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


def test_the_memory_bound_stays_below_what_a_micro_batch_really_takes():
    # One fp32 micro-batch of the tiny model: the bound must not exceed the activations autograd keeps.
    from gpt.trainer import micro_batch_bytes

    torch.manual_seed(0)
    model = GPT(GPTConfig.from_preset("tiny", vocab_size=300))
    idx = torch.randint(0, 300, (8, 128))
    weights = {p.data_ptr() for p in model.parameters()}
    saved = {}  # storage -> bytes: views of one tensor count once

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved[t.data_ptr()] = t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(idx, idx)
    activations = sum(n for ptr, n in saved.items() if ptr not in weights)
    bound = micro_batch_bytes(2, 64, 300, 8, 128, torch.float32)
    assert 0.7 * activations <= bound <= activations + 2 * idx.numel() * 8  # + the int64 windows, not autograd's


def test_a_batch_close_to_the_memory_limit_is_a_warning_not_an_error(data_dir, tmp_path, monkeypatch, capsys):
    import gpt.trainer
    from gpt.trainer import micro_batch_bytes

    need = micro_batch_bytes(2, 32, load_meta(data_dir).n_vocab, 4, 32, torch.float32)  # TINY's model and batch
    monkeypatch.setattr(gpt.trainer, "available_memory_bytes", lambda: int(need * 1.5))
    assert train_main(["--data", str(data_dir), "--out", str(tmp_path / "run"), *TINY, "--max-steps", "2"]) == 0
    err = capsys.readouterr().err
    assert "gpt-train: warning: a micro-batch of --batch-size 4 x --block-size 32 needs at least" in err
    assert "if the process is killed, lower --batch-size" in err and (tmp_path / "run" / "final").is_dir()
