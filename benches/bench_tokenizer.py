"""Tokenizer speed next to its peers, in the same run (`pytest benches/bench_tokenizer.py`).

- training on tinyshakespeare.txt at vocab 4096 and 16384: ours on one process vs HF `tokenizers`
  (ByteLevel BPE trainer) on one thread; ours on all cores for reference.
- encoding throughput (MB/s): one thread, ours vs tiktoken built from the same GPT-2 ranks, with a
  cold piece cache (a fresh tokenizer) and a warm one (the steady state of a long-lived tokenizer);
  and `encode_batch` on all cores vs tiktoken's `encode_batch`.
Compare within a group (`--benchmark-group-by=group`, the default here); MB/s is in extra_info.
"""

from __future__ import annotations

import os

# HF tokenizers sizes its thread pool when first used: pin it to one thread before it is imported
os.environ.setdefault("RAYON_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402

import tokenizers_bpe  # noqa: E402
from tools.corpus import builtin_text  # noqa: E402

ROUNDS = 3
CORES = os.cpu_count() or 1


@pytest.fixture(scope="module")
def shakespeare(shared_file):
    return shared_file("tinyshakespeare.txt")


@pytest.fixture(scope="module")
def large_text(shakespeare):
    """About 6 MB: tinyshakespeare plus the built-in corpus."""
    return shakespeare.read_text(encoding="utf-8") + builtin_text("shakespeare")


@pytest.fixture(scope="module")
def gpt2(shared_file):
    return tokenizers_bpe.load_gpt2(shared_file("gpt2/encoder.json"), shared_file("gpt2/vocab.bpe"))


def _hf_train(path, vocab_size):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=0,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train([str(path)], trainer)
    return tok.get_vocab_size()


@pytest.mark.parametrize("vocab_size", [4096, 16384])
@pytest.mark.parametrize("impl", ["ours-1-process", "hf-tokenizers-1-thread", "ours-all-cores"])
def test_train(benchmark, shakespeare, vocab_size, impl):
    benchmark.group = f"train tinyshakespeare vocab {vocab_size}"
    if impl == "hf-tokenizers-1-thread":
        n = benchmark.pedantic(_hf_train, args=(shakespeare, vocab_size), rounds=ROUNDS)
    else:
        workers = 1 if impl == "ours-1-process" else CORES
        tok = benchmark.pedantic(
            tokenizers_bpe.train, args=([shakespeare], vocab_size), kwargs={"workers": workers, "progress": False}, rounds=ROUNDS
        )
        n = tok.n_vocab
    assert n == vocab_size


def _mb_per_s(benchmark, text: str) -> None:
    benchmark.extra_info["MB/s"] = round(len(text.encode("utf-8")) / 1e6 / benchmark.stats.stats.min, 2)


@pytest.mark.parametrize("impl", ["ours-cold-cache", "ours-warm-cache", "tiktoken"])
def test_encode_one_thread(benchmark, large_text, gpt2, impl):
    benchmark.group = "encode ~6 MB, GPT-2 ranks, one thread"
    if impl == "tiktoken":
        enc = gpt2.to_tiktoken()
        ids = benchmark.pedantic(enc.encode_ordinary, args=(large_text,), rounds=ROUNDS)
    elif impl == "ours-warm-cache":
        gpt2.encode_ordinary(large_text)
        ids = benchmark.pedantic(gpt2.encode_ordinary, args=(large_text,), rounds=ROUNDS)
    else:  # a fresh tokenizer per round: every distinct piece goes through the BPE merge loop once
        ids = benchmark.pedantic(
            lambda tok: tok.encode_ordinary(large_text),
            setup=lambda: ((tokenizers_bpe.BPETokenizer(gpt2.mergeable_ranks, gpt2.pattern, gpt2.special_tokens),), {}),
            rounds=ROUNDS,
        )
        assert ids == gpt2.encode_ordinary(large_text)
    assert len(ids) > 1_000_000
    _mb_per_s(benchmark, large_text)


@pytest.mark.parametrize("impl", ["ours", "tiktoken"])
def test_encode_batch_all_cores(benchmark, large_text, gpt2, impl):
    benchmark.group = f"encode_batch ~6 MB in 64 texts, GPT-2 ranks, {CORES} cores"
    step = len(large_text) // 64 + 1
    texts = [large_text[i : i + step] for i in range(0, len(large_text), step)]
    if impl == "tiktoken":
        enc = gpt2.to_tiktoken()
        out = benchmark.pedantic(enc.encode_batch, args=(texts,), kwargs={"num_threads": CORES}, rounds=ROUNDS)
    else:
        out = benchmark.pedantic(gpt2.encode_batch, args=(texts,), kwargs={"num_threads": CORES}, rounds=ROUNDS)
    assert len(out) == len(texts)
    _mb_per_s(benchmark, large_text)
