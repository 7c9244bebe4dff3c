"""The trainer: schedule, optimiser groups, batches, exact resume, signals, non-finite losses, the
memory bound. A tiny char-level model on one play keeps every run to seconds (the gpt-train command
is tested in tests/tools/test_train.py)."""

from __future__ import annotations

import json
import math
import signal
from pathlib import Path

import numpy as np
import pytest
import torch

import tokenizers_bpe
from gpt.data import RandomWindows, SlidingWindows, load_meta, open_split
from gpt.memory import micro_batch_bytes
from gpt.model import GPT, GPTConfig
from gpt.run_state import checkpoint_dirs
from gpt.train_config import TrainConfig, build_optimizer, lr_at
from gpt.trainer import Trainer, TrainingDiverged, lm_loss
from tests.conftest import read_losses as losses


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


def test_a_signal_cuts_a_long_step_short_and_the_resume_is_exact(data_dir, tmp_path):
    """A signal in the middle of a step of many micro-batches does not wait for the step: it is dropped
    (gradients and random draws undone), the last whole step is checkpointed, and the resumed run
    reproduces the uninterrupted one bit for bit (dropout on)."""
    full = tiny_trainer(data_dir, tmp_path / "full", dropout=0.1, grad_accum=3, max_steps=8)
    assert not full.fit().interrupted
    calls = []

    def interrupting_loss(model, batch):
        if trainer.step == 5:  # step 6: SIGTERM in its first micro-batch
            calls.append(1)
            if len(calls) == 1:
                signal.raise_signal(signal.SIGTERM)
        return lm_loss(model, batch)

    trainer = tiny_trainer(data_dir, tmp_path / "cut", interrupting_loss, dropout=0.1, grad_accum=3, max_steps=8)
    result = trainer.fit()
    assert result.interrupted and result.step == 5 and result.stop_signal == signal.SIGTERM and len(calls) == 1
    assert (tmp_path / "cut" / "checkpoints" / "step-000005").is_dir()
    assert tiny_trainer(data_dir, tmp_path / "cut", dropout=0.1, grad_accum=3, max_steps=8).fit(resume=True).step == 8
    assert losses(tmp_path / "cut") == losses(tmp_path / "full")


@pytest.mark.parametrize("first, second", [(signal.SIGTERM, signal.SIGTERM), (signal.SIGINT, signal.SIGTERM), (signal.SIGTERM, signal.SIGINT)])
def test_a_second_signal_stops_at_once(data_dir, tmp_path, first, second):
    """One signal lets the micro-batch end (then a checkpoint); a second one, of either kind, stops now."""
    def signalling_loss(model, batch):
        if trainer.step == 2:
            signal.raise_signal(first)
            signal.raise_signal(second)
        return lm_loss(model, batch)

    trainer = tiny_trainer(data_dir, tmp_path / "run", signalling_loss)
    with pytest.raises(KeyboardInterrupt):
        trainer.fit()
    assert [p.name for _, p in checkpoint_dirs(tmp_path / "run")] == ["step-000002"]


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


def test_the_memory_bound_stays_below_what_a_micro_batch_really_takes():
    # One fp32 micro-batch of the tiny model: the bound must not exceed the activations autograd keeps.
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


def test_a_signal_in_the_last_step_is_an_interrupt_and_the_resume_writes_final(data_dir, tmp_path):
    """The last step finished anyway, and the run went on as if no signal had come (final/, then the
    command's own work after training - gpt-finetune classify evaluated 3M examples - and exit 0)."""
    def interrupting_loss(model, batch):
        if trainer.step == 11:  # Ctrl-C in the middle of the 12th and last step
            signal.raise_signal(signal.SIGINT)
        return lm_loss(model, batch)

    trainer = tiny_trainer(data_dir, tmp_path / "cut", interrupting_loss)
    result = trainer.fit()
    assert result.interrupted and result.step == 12 and result.stop_signal == signal.SIGINT
    assert (tmp_path / "cut" / "checkpoints" / "step-000012").is_dir() and not (tmp_path / "cut" / "final").exists()
    resumed = tiny_trainer(data_dir, tmp_path / "cut").fit(resume=True)
    assert not resumed.interrupted and resumed.step == 12 and (tmp_path / "cut" / "final").is_dir()
