"""Training: throughput of gpt.trainer.Trainer next to transformers.GPT2LMHeadModel on the CPU, and
nanoGPT's character-level Shakespeare recipe end to end.

Throughput: one optimiser step = forward, cross-entropy, backward, gradient clipping at 1.0 and the
same AdamW (``gpt.train_config.build_optimizer``: fused, weight decay 0.1 on matrices) on the same batch,
fp32, dropout 0. Ours is ``Trainer.train_step`` itself (the real loop: it also reads the loss and
the gradient norm back every step), in three cases:

- ``ours``: as it trains by default (gpt2_kernels.memory_plan picks the paths: ``save_memory="auto"``);
- ``ours-fused``: the memory-saving paths forced ($GPT2_KERNELS_SAVE_MEMORY=always: the loss in the
  smallest chunks, the GELU recomputed);
- ``ours-unfused``: the plain paths forced (``model(x, y, return_logits=True)``: the logits, then
  F.cross_entropy; $GPT2_KERNELS_SAVE_MEMORY=never: the GELU's output kept);

transformers' model gets the same optimiser and batch. The grid (``SHAPES``): nanoGPT's CPU config
(4 layers x 4 heads x 128, block 64, batch 12, vocabulary 65); GPT-2 124M at 1x128, 2x256, 4x512 and
4x1024 tokens; and fine-tuning's shape, 124M at gpt-finetune's default batch of 8 instructions of
72 tokens (the mean longest of 8 examples of ../shared/data/instruct, the batch's length), the
padding's targets ignored. Each at one and two threads. Figures are the best round (the least
disturbed on a shared machine). Targets (issue 24): ``ours`` within 5% of the faster of
``ours-fused`` and ``ours-unfused``, and at least 1.0x transformers' tokens/s.
MFU = model FLOPs (6N + 12 L C T per token, as nanoGPT's estimate_mfu) over this CPU's fp32 matmul
throughput measured in the same run (a 2048^3 matmul), not a datasheet peak.

    OMP_NUM_THREADS=1 pytest benches/bench_train.py -k "train_step and 2x256"   # one shape, both thread counts

``GPT_BENCH_COMPILE=1`` adds ours with ``TrainConfig(compile=True)`` (torch.compile; its first step
compiles, which takes minutes on a CPU).

The recipe (``GPT_BENCH_RECIPE=1``, about three minutes per run) runs the commands of
benches/README.md on ../shared/data/tinyshakespeare.txt, with learned and with rotary positions, next
to nanoGPT's own loop (benches/nanogpt_loop.py), and checks nanoGPT's validation loss of 1.88 is
reached.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import time

import pytest
import torch

from gpt.model import GPT, GPTConfig
from gpt.train_config import TrainConfig, build_optimizer
from gpt.trainer import Trainer, lm_loss
from gpt2_kernels import SAVE_MEMORY_ENV_VAR

GPT2_124M = dict(n_layer=12, n_head=12, n_embd=768)
SHAPES = {  # name: (model config, batch, block, targets ignored (padding): the last `pad * row` of row `row`)
    "nanogpt-cpu": (dict(vocab_size=65, n_layer=4, n_head=4, n_embd=128, n_ctx=64), 12, 64, 0),
    "gpt2-124M-1x128": (GPT2_124M, 1, 128, 0),
    "gpt2-124M-2x256": (GPT2_124M, 2, 256, 0),
    "gpt2-124M-4x512": (GPT2_124M, 4, 512, 0),
    "gpt2-124M-4x1024": (GPT2_124M, 4, 1024, 0),
    "finetune-124M-8x72": (GPT2_124M, 8, 72, 4),
}
ROUNDS = {"nanogpt-cpu": 15, "gpt2-124M-1x128": 3, "gpt2-124M-2x256": 3, "gpt2-124M-4x512": 2, "gpt2-124M-4x1024": 2,
          "finetune-124M-8x72": 3}
OUR_CASES = {  # name: ($GPT2_KERNELS_SAVE_MEMORY, logits + F.cross_entropy)
    "ours": (None, False),
    "ours-fused": ("always", False),
    "ours-unfused": ("never", True),
}


def matmul_seconds(a: torch.Tensor, b: torch.Tensor) -> float:
    t = time.perf_counter()
    a @ b
    return time.perf_counter() - t


def flops_per_token(cfg: GPTConfig, n_params: int, block: int) -> float:
    """nanoGPT's estimate: 6 FLOPs per parameter per token (the tied head counted once, position
    embeddings not at all) plus the attention scores and their use, 12 L C T."""
    return 6 * (n_params - cfg.n_ctx * cfg.n_embd) + 12 * cfg.n_layer * cfg.n_embd * block


@contextlib.contextmanager
def save_memory_env(mode: str | None):
    """$GPT2_KERNELS_SAVE_MEMORY set to ``mode`` (unset for None) for the duration."""
    before = os.environ.pop(SAVE_MEMORY_ENV_VAR, None)
    if mode is not None:
        os.environ[SAVE_MEMORY_ENV_VAR] = mode
    try:
        yield
    finally:
        os.environ.pop(SAVE_MEMORY_ENV_VAR, None)
        if before is not None:
            os.environ[SAVE_MEMORY_ENV_VAR] = before


def unfused_loss(model, batch) -> torch.Tensor:
    x, y = batch
    return model(x, targets=y, return_logits=True)[1]


def batch_for(cfg: GPTConfig, batch: int, block: int, pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.randint(0, cfg.vocab_size, (batch, block + 1), generator=torch.Generator().manual_seed(0))
    inputs, targets = x[:, :-1], x[:, 1:].clone()
    for row in range(batch):
        targets[row, block - pad * row:] = -100
    return inputs, targets


def our_steps(cfg: GPTConfig, train_cfg: TrainConfig, batch, out_dir) -> tuple[GPT, dict]:
    """One Trainer (one model and optimiser: the memory of one) stepped in each of OUR_CASES."""
    trainer = Trainer(GPT(cfg), train_cfg, lambda step, micro: batch, out_dir=out_dir)

    def step_as(mode, unfused):
        def step():
            trainer.loss_fn = unfused_loss if unfused else lm_loss
            with save_memory_env(mode):
                trainer.train_step()
        return step

    return trainer.model, {name: step_as(*case) for name, case in OUR_CASES.items()}


def transformers_step(cfg: GPTConfig, train_cfg: TrainConfig, batch):
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(vocab_size=cfg.vocab_size, n_positions=cfg.n_ctx, n_embd=cfg.n_embd, n_layer=cfg.n_layer,
                                       n_head=cfg.n_head, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0))
    model.train()
    opt = build_optimizer(model, train_cfg, "cpu")
    inputs, targets = batch
    labels = torch.cat([inputs[:, :1], targets[:, :-1]], dim=1)  # it shifts the labels itself

    def step():
        loss = model(input_ids=inputs, labels=labels).loss
        loss.backward()
        loss.item()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0).item()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return model, step


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("shape", list(SHAPES))
def test_train_step_cpu(benchmark, request, tmp_path, shape, threads):
    """One benchmark round = one step of each case (in turn first) and one 2048^3 matmul, interleaved
    so that a shared machine's load hits all alike; each figure is its best round."""
    model_kwargs, batch, block, pad = SHAPES[shape]
    torch.manual_seed(0)
    cfg = GPTConfig(**model_kwargs, dropout=0.0, backend="torch")
    data = batch_for(cfg, batch, block, pad)
    train_cfg = TrainConfig(batch_size=batch, device="cpu", dtype="float32", progress=False, warmup_steps=0, lr=1e-4)
    model, steps = our_steps(cfg, train_cfg, data, tmp_path)
    impls = {name: (model, step) for name, step in steps.items()}
    impls["transformers"] = transformers_step(cfg, train_cfg, data)
    if os.environ.get("GPT_BENCH_COMPILE") == "1":  # the warm-up round compiles: minutes on a CPU
        compiled, compiled_steps = our_steps(cfg, dataclasses.replace(train_cfg, compile=True), data, tmp_path / "compiled")
        impls["ours-compiled"] = (compiled, compiled_steps["ours"])
    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    times: dict[str, list[float]] = {name: [] for name in [*impls, "matmul"]}
    cpu_times: dict[str, list[float]] = {name: [] for name in impls}  # less disturbed by other jobs

    rounds_done = [0]

    def round_():
        # The cases take turns at going first: the one after the matmul finds the caches cold, which
        # at the nanoGPT shape (30 ms steps) cost the first case ~5%.
        names = list(impls)
        shift = rounds_done[0] % len(names)
        rounds_done[0] += 1
        for name in names[shift:] + names[:shift]:
            step = impls[name][1]
            t, c = time.perf_counter(), time.process_time()
            step()
            times[name].append(time.perf_counter() - t)
            cpu_times[name].append(time.process_time() - c)
        times["matmul"].append(matmul_seconds(a, b))

    threads_before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        round_()  # warm-up
        for v in [*times.values(), *cpu_times.values()]:
            v.clear()
        benchmark.group = f"train step {shape}, {threads} threads"
        benchmark.pedantic(round_, rounds=ROUNDS[shape], iterations=1)
    finally:
        torch.set_num_threads(threads_before)
    peak = 2 * 2048**3 / min(times["matmul"])
    n_tokens = batch * block
    lines = [f"{shape}: ours vs transformers.GPT2LMHeadModel, {batch}x{block} tokens, {threads} threads, "
             f"fp32 matmul {peak / 1e9:.0f} GFLOP/s, best of {ROUNDS[shape]} rounds"]
    best = {name: min(times[name]) for name in impls}
    for name, (m, _) in impls.items():
        tok_s = n_tokens / best[name]
        mfu = tok_s * flops_per_token(cfg, sum(p.numel() for p in m.parameters()), block) / peak
        benchmark.extra_info[f"{name}_tokens_per_s"] = tok_s
        benchmark.extra_info[f"{name}_mfu"] = mfu
        lines.append(f"  {name:<13} {best[name] * 1e3:9.1f} ms/step {tok_s:9.0f} tokens/s  MFU {mfu:6.1%}")
    for name in impls:
        if name != "transformers":
            ratio = best["transformers"] / best[name]
            benchmark.extra_info[f"{name}_over_transformers"] = ratio
            lines.append(f"  {name}/transformers tokens/s: {ratio:.2f}x" + (" (target >= 1.0)" if name == "ours" else ""))
    over_faster = best["ours"] / min(best["ours-fused"], best["ours-unfused"])
    benchmark.extra_info["ours_time_over_faster_forced_path"] = over_faster
    lines.append(f"  ours time / the faster of fused and unfused: {over_faster:.3f}x (target <= 1.05)")
    # CPU time (all threads' together): on a machine shared with other jobs, the steadier figure.
    cpu = {name: min(cpu_times[name]) for name in impls}
    benchmark.extra_info["cpu_s"] = cpu
    lines.append("  CPU time: " + ", ".join(f"{name} {cpu[name] * 1e3:.0f} ms" for name in impls)
                 + f"; transformers/ours {cpu['transformers'] / cpu['ours']:.2f}x, ours / the faster of fused and unfused "
                 f"{cpu['ours'] / min(cpu['ours-fused'], cpu['ours-unfused']):.3f}x")
    plugins = request.config.pluginmanager
    with plugins.get_plugin("capturemanager").global_and_fixture_disabled():
        for line in ["", *lines]:
            plugins.get_plugin("terminalreporter").write_line(line)


RECIPE_SKIP = pytest.mark.skipif(os.environ.get("GPT_BENCH_RECIPE") != "1", reason="the nanoGPT recipe takes minutes: set GPT_BENCH_RECIPE=1")


@RECIPE_SKIP
def test_nanogpt_loop_char_recipe(benchmark, shared_file):
    """The peer: nanoGPT's own loop (benches/nanogpt_loop.py) on the recipe, scored on the whole val split."""
    from benches.nanogpt_loop import train_char_recipe

    text = shared_file("tinyshakespeare.txt").read_text(encoding="utf-8")
    result = benchmark.pedantic(lambda: train_char_recipe(text, seed=1337), rounds=1, iterations=1)
    benchmark.extra_info.update(result)
    assert result["val_loss"] < 2.0  # it trained; its exact figure is the yardstick, recorded


@RECIPE_SKIP
@pytest.mark.parametrize("pos_embedding, limit", [("learned", 1.92), ("rope", 1.88)])
def test_nanogpt_char_recipe(benchmark, shared_file, tmp_path, pos_embedding, limit):
    """nanoGPT README's CPU run at character level through bpe-train, gpt-prepare and gpt-train.

    With GPT-2's learned positions (nanoGPT's model) it lands where nanoGPT's own loop does on the
    whole validation split (1.90, within the 1.89-1.91 spread of seeds); with rotary positions, the
    same hyperparameters reach nanoGPT's reported 1.88 and go past it.
    """
    from tools.bpe_train import main as bpe_train_main
    from tools.train import main as train_main
    from tools.prepare import main as prepare_main

    text = str(shared_file("tinyshakespeare.txt"))
    assert bpe_train_main([text, "--char", "-o", str(tmp_path / "char.json"), "--quiet"]) == 0
    assert prepare_main([text, "--tokenizer", str(tmp_path / "char.json"), "-o", str(tmp_path / "data"), "--quiet"]) == 0
    args = ["--data", str(tmp_path / "data"), "--out", str(tmp_path / "run"), *RECIPE, "--pos-embedding", pos_embedding,
            "--progress", "false"]
    start = time.perf_counter()
    benchmark.pedantic(lambda: train_main(args), rounds=1, iterations=1)
    evals = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines() if "val_loss" in line]
    benchmark.extra_info.update(val_loss=evals[-1]["val_loss"], wall_s=time.perf_counter() - start)
    assert evals[-1]["step"] == 2000 and evals[-1]["val_loss"] <= limit


# nanoGPT: python train.py config/train_shakespeare_char.py --device=cpu --compile=False --eval_iters=20
# --log_interval=1 --block_size=64 --batch_size=12 --n_layer=4 --n_head=4 --n_embd=128 --max_iters=2000
# --lr_decay_iters=2000 --dropout=0.0  (the config's lr 1e-3, min_lr 1e-4, warmup 100, beta2 0.99).
# We evaluate on the whole validation split (--eval-iters 1000 > its 145 batches) instead of 20 random batches.
RECIPE = ["--n-layer", "4", "--n-head", "4", "--n-embd", "128", "--n-ctx", "64", "--dropout", "0", "--batch-size", "12",
          "--max-steps", "2000", "--lr", "1e-3", "--min-lr", "1e-4", "--lr-decay-steps", "2000", "--warmup-steps", "100",
          "--beta2", "0.99", "--eval-interval", "250", "--eval-iters", "1000", "--log-interval", "10", "--sample-tokens", "200"]
