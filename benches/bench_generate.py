"""Decoding speed of gpt.generate next to transformers' generate (with its KV cache), same weights, same run.

GPT-2 124M (random weights: speed does not depend on them), a 16-token prompt, 128 new tokens, greedy
(so both do the same work per step and always run all 128 steps), batch 1 and batch 8, fp32 and bf16,
on the CPU. The memory-bandwidth bound of batch-1 decoding is (bytes of weights read per token) /
(memory bandwidth measured in the same run, by a large copy and by a read-only stream); our rows
report how close they come. Run:  .venv/bin/python -m pytest benches/bench_generate.py
(OMP_NUM_THREADS=1 in front measures one core, which is steadier on a shared machine).
"""

from __future__ import annotations

import functools
import time

import pytest
import torch

from gpt.model import GPT, GPTConfig
from gpt.sampling import generate
from tools import convert

transformers = pytest.importorskip("transformers")

PROMPT_LEN, NEW_TOKENS, ROUNDS = 16, 128, 3
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
results: dict[tuple[str, str, int], float] = {}  # (impl, dtype, batch) -> tokens/s, read by later rows


@pytest.fixture(scope="module")
def models(tmp_path_factory, shared_file):
    """dtype -> (our 124M model, the transformers model with the same weights via gpt-convert hf-export)."""
    import tokenizers_bpe

    torch.manual_seed(0)
    model = GPT(GPTConfig.from_preset("gpt2", backend="torch"))
    model.tokenizer = tokenizers_bpe.load_gpt2(shared_file("gpt2/encoder.json"), shared_file("gpt2/vocab.bpe"))
    ckpt, hf_dir = tmp_path_factory.mktemp("bench") / "ckpt", tmp_path_factory.mktemp("bench") / "hf"
    model.save_pretrained(ckpt)
    assert convert.main(["hf-export", str(ckpt), str(hf_dir)]) == 0

    @functools.cache
    def load(dtype: str):
        hf = transformers.GPT2LMHeadModel.from_pretrained(hf_dir, dtype=DTYPES[dtype]).eval()
        hf.generation_config.eos_token_id = None  # always decode all NEW_TOKENS steps, like stop_tokens=()
        hf.generation_config.pad_token_id = 0
        return GPT.from_pretrained(ckpt, dtype=DTYPES[dtype]), hf

    return load


@pytest.fixture(scope="module")
def bandwidth() -> dict[str, float]:
    """Bytes per second through memory, best of 5 on a 512 MiB fp32 tensor: "copy" counts the bytes read
    plus the bytes written by a copy (the issue's reference, STREAM's convention); "read" is a
    read-only stream (a sum), the access pattern of reading weights."""
    src = torch.randn(128 * 2**20)
    dst = torch.empty_like(src)
    nbytes = src.numel() * src.element_size()

    def best(fn) -> float:
        times = []
        for _ in range(5):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        return min(times)

    return {"copy": 2 * nbytes / best(lambda: dst.copy_(src)), "read": nbytes / best(src.sum)}


def weight_bytes_per_token(model: GPT) -> int:
    """Every weight is read once per decoded token, except that the embeddings contribute one row each
    (the tied wte matrix is read in full as the output head)."""
    n = sum(p.numel() for p in model.parameters())
    if "wpe" in model.transformer:
        n -= model.transformer.wpe.weight.numel() - model.config.n_embd
    if not model.config.tie_embeddings:
        n -= model.transformer.wte.weight.numel() - model.config.n_embd
    return n * next(model.parameters()).element_size()


# transformers first in each (dtype, batch) pair, so that our row can report the ratio.
CASES = [(impl, dtype, batch) for dtype in DTYPES for batch in (1, 8) for impl in ("transformers", "ours")]


@pytest.mark.parametrize("impl, dtype, batch", CASES, ids=[f"{i}-{d}-batch{b}" for i, d, b in CASES])
def test_decode_speed(benchmark, models, bandwidth, capsys, impl, dtype, batch):
    ours, hf = models(dtype)
    prompt = list(range(1000, 1000 + PROMPT_LEN))
    if impl == "ours":

        def run(n=NEW_TOKENS):
            return generate(ours, prompt, n, temperature=0, stop_tokens=(), num_samples=batch)
    else:
        ids = torch.tensor([prompt] * batch)

        def run(n=NEW_TOKENS):
            with torch.inference_mode():
                return hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False)

    run(4)  # warm-up: first-call allocations and dispatch
    out = benchmark.pedantic(run, rounds=ROUNDS, iterations=1)
    n_new = sum(map(len, out)) if impl == "ours" else (out.shape[1] - PROMPT_LEN) * batch
    assert n_new == NEW_TOKENS * batch
    tokens_per_s = n_new / benchmark.stats.stats.mean
    results[impl, dtype, batch] = tokens_per_s
    info = {"tokens_per_s": round(tokens_per_s, 2), "threads": torch.get_num_threads()}
    line = f"{impl} {dtype} batch {batch} ({torch.get_num_threads()} threads): {tokens_per_s:.1f} tokens/s"
    if impl == "ours":
        peer = results.get(("transformers", dtype, batch))
        if peer:
            info["speedup_vs_transformers"] = round(tokens_per_s / peer, 3)
            line += f", {tokens_per_s / peer:.2f}x transformers ({peer:.1f} tokens/s)"
        if batch == 1:
            weight_bytes = weight_bytes_per_token(ours)
            line += f"; {weight_bytes / 1e6:.0f} MB of weights per token"
            for kind, bytes_per_s in bandwidth.items():
                bound = bytes_per_s / weight_bytes
                info[f"{kind}_bandwidth_gb_s"] = round(bytes_per_s / 1e9, 2)
                info[f"fraction_of_{kind}_bound"] = round(tokens_per_s / bound, 3)
                line += f"; {kind} bound {bound:.1f} tokens/s ({bytes_per_s / 1e9:.1f} GB/s): {100 * tokens_per_s / bound:.0f}% of it"
    benchmark.extra_info.update(info)
    with capsys.disabled():
        print(f"\n  {line}")
