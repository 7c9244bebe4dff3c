"""Training: throughput of gpt.trainer.Trainer next to transformers.GPT2LMHeadModel on the CPU, and
nanoGPT's character-level Shakespeare recipe end to end.

Throughput: one optimiser step = forward, cross-entropy, backward, gradient clipping at 1.0 and the
same AdamW (``gpt.trainer.build_optimizer``: fused, weight decay 0.1 on matrices) on the same batch,
fp32, dropout 0. Ours is ``Trainer.train_step`` itself (the real loop: it also reads the loss and
the gradient norm back every step); transformers' model gets the same optimiser and batch. Shapes:
nanoGPT's CPU config (4 layers x 4 heads x 128, block 64, batch 12, vocabulary 65) and GPT-2 124M
at block 256 (batch 2). Figures are the best round (the least disturbed on a shared machine).
MFU = model FLOPs (6N + 12 L C T per token, as nanoGPT's estimate_mfu) over this CPU's fp32 matmul
throughput measured in the same run (a 2048^3 matmul), not a datasheet peak.

The recipe (``GPT_BENCH_RECIPE=1``, several minutes) runs the commands of benches/README.md on
../shared/data/tinyshakespeare.txt and checks nanoGPT's validation loss of 1.88 is reached.
"""

from __future__ import annotations

import json
import os
import time

import pytest
import torch

from gpt.model import GPT, GPTConfig
from gpt.trainer import TrainConfig, Trainer, build_optimizer

SHAPES = {  # name: (model config, batch, block)
    "nanogpt-cpu": (dict(vocab_size=65, n_layer=4, n_head=4, n_embd=128, n_ctx=64), 12, 64),
    "gpt2-124M": (dict(n_layer=12, n_head=12, n_embd=768, n_ctx=256), 2, 256),
}
ROUNDS = {"nanogpt-cpu": 20, "gpt2-124M": 3}


def matmul_flops() -> float:
    """fp32 FLOP/s of a large matmul on this CPU right now (the 'peak' for MFU)."""
    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    a @ b
    best = float("inf")
    for _ in range(3):
        t = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t)
    return 2 * 2048**3 / best


@pytest.fixture(scope="module")
def table(request):
    rows: dict[tuple[str, str], dict] = {}
    yield rows
    if not rows:
        return
    peak = matmul_flops()
    lines = ["", f"Training step on CPU ({torch.get_num_threads()} threads; fp32 matmul {peak / 1e9:.0f} GFLOP/s): "
             "Trainer vs transformers.GPT2LMHeadModel, same optimiser and batch",
             f"{'shape':<12} {'impl':<13} {'ms/step':>9} {'tokens/s':>9} {'MFU':>6} {'ours/transformers':>18}"]
    for (shape, impl), r in sorted(rows.items()):
        tok_s = r["tokens"] / r["seconds"]
        theirs = rows.get((shape, "transformers"))
        ratio = f"{theirs['seconds'] / r['seconds']:.2f}x" if impl == "ours" and theirs else ""
        lines.append(f"{shape:<12} {impl:<13} {r['seconds'] * 1e3:>9.1f} {tok_s:>9.0f} {tok_s * r['flops_per_token'] / peak:>6.1%} {ratio:>18}")
    plugins = request.config.pluginmanager
    with plugins.get_plugin("capturemanager").global_and_fixture_disabled():
        for line in lines:
            plugins.get_plugin("terminalreporter").write_line(line)


def flops_per_token(cfg: GPTConfig, n_params: int, block: int) -> float:
    non_embedding = n_params - cfg.vocab_size * cfg.n_embd  # nanoGPT counts the tied head, not wte
    return 6 * non_embedding + 6 * cfg.vocab_size * cfg.n_embd + 12 * cfg.n_layer * cfg.n_embd * block


@pytest.mark.parametrize("impl", ["ours", "transformers"])
@pytest.mark.parametrize("shape", list(SHAPES))
def test_train_step_cpu(benchmark, table, tmp_path, shape, impl):
    model_kwargs, batch, block = SHAPES[shape]
    torch.manual_seed(0)
    cfg = GPTConfig(**model_kwargs, dropout=0.0, backend="torch")
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, cfg.vocab_size, (batch, block + 1), generator=g)
    train_cfg = TrainConfig(batch_size=batch, device="cpu", dtype="float32", progress=False, warmup_steps=0, lr=1e-4)
    if impl == "ours":
        model = GPT(cfg)
        trainer = Trainer(model, train_cfg, lambda step, micro: (x[:, :-1], x[:, 1:]), out_dir=tmp_path)

        def step():
            trainer.train_step()
    else:
        from transformers import GPT2Config, GPT2LMHeadModel

        model = GPT2LMHeadModel(GPT2Config(vocab_size=cfg.vocab_size, n_positions=cfg.n_ctx, n_embd=cfg.n_embd, n_layer=cfg.n_layer,
                                           n_head=cfg.n_head, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0))
        model.train()
        opt = build_optimizer(model, train_cfg, "cpu")
        inputs = x[:, :-1]

        def step():
            loss = model(input_ids=inputs, labels=inputs).loss  # transformers shifts the labels itself
            loss.backward()
            loss.item()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0).item()
            opt.step()
            opt.zero_grad(set_to_none=True)

    step()  # warm-up
    benchmark.group = f"train step {shape}"
    benchmark.pedantic(step, rounds=ROUNDS[shape], iterations=1)
    if benchmark.stats is not None:  # None under --benchmark-disable
        n_params = sum(p.numel() for p in model.parameters())
        table[(shape, impl)] = {"seconds": benchmark.stats.stats.min, "tokens": batch * block,
                                "flops_per_token": flops_per_token(cfg, n_params, block)}
        benchmark.extra_info["tokens_per_s"] = batch * block / benchmark.stats.stats.min


@pytest.mark.skipif(os.environ.get("GPT_BENCH_RECIPE") != "1", reason="the nanoGPT recipe takes minutes: set GPT_BENCH_RECIPE=1")
def test_nanogpt_char_recipe(benchmark, shared_file, tmp_path):
    """nanoGPT README's CPU run at character level: reaches its validation loss of 1.88."""
    from gpt.train import main as train_main
    from tokenizers_bpe.cli import train_main as bpe_train_main
    from tools.prepare import main as prepare_main

    text = str(shared_file("tinyshakespeare.txt"))
    assert bpe_train_main([text, "--char", "-o", str(tmp_path / "char.json"), "--quiet"]) == 0
    assert prepare_main([text, "--tokenizer", str(tmp_path / "char.json"), "-o", str(tmp_path / "data"), "--quiet"]) == 0
    args = ["--data", str(tmp_path / "data"), "--out", str(tmp_path / "run"), *RECIPE, "--progress", "false"]
    start = time.perf_counter()
    benchmark.pedantic(lambda: train_main(args), rounds=1, iterations=1)
    evals = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines() if "val_loss" in line]
    benchmark.extra_info.update(val_loss=evals[-1]["val_loss"], wall_s=time.perf_counter() - start)
    assert evals[-1]["step"] == 2000 and evals[-1]["val_loss"] <= 1.88


# nanoGPT: python train.py config/train_shakespeare_char.py --device=cpu --compile=False --eval_iters=20
# --log_interval=1 --block_size=64 --batch_size=12 --n_layer=4 --n_head=4 --n_embd=128 --max_iters=2000
# --lr_decay_iters=2000 --dropout=0.0  (the config's lr 1e-3, min_lr 1e-4, warmup 100, beta2 0.99).
# We evaluate on the whole validation split (--eval-iters 1000 > its 145 batches) instead of 20 random batches.
RECIPE = ["--n-layer", "4", "--n-head", "4", "--n-embd", "128", "--n-ctx", "64", "--dropout", "0", "--batch-size", "12",
          "--max-steps", "2000", "--lr", "1e-3", "--min-lr", "1e-4", "--lr-decay-steps", "2000", "--warmup-steps", "100",
          "--beta2", "0.99", "--eval-interval", "250", "--eval-iters", "1000", "--log-interval", "10", "--sample-tokens", "200"]
