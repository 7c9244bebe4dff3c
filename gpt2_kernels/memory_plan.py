"""The one rule for when an op trades time for memory: the output layer's loss in chunks of tokens
(``linear_cross_entropy``) and the MLP's GELU recomputed in the backward (``gelu_linear``).

Both savings cost time, so they are taken only where there is memory worth saving:

- ``loss_chunk_rows``: how many tokens (rows) ``linear_cross_entropy`` puts through the output layer at
  a time. All of them (one chunk: the plain computation, the logits whole) when the tokens fit in one
  efficient chunk; otherwise equal chunks of at most ``LOSS_CHUNK_ROWS[device]`` rows (and more than
  half that), about the fewest rows for which each chunk's matmuls stay efficient and the per-chunk
  addition to the weight gradient is amortised, so chunking costs no measurable time; smaller chunks
  (down to ``memory_saving_rows``) only where one such chunk of logits would take more than
  ``MAX_CHUNK_SHARE`` of the memory available.
- ``recompute_gelu``: ``gelu_linear`` keeps only its input and recomputes the GELU in the backward
  when one layer's GELU output is at least ``GELU_RECOMPUTE_MIN_BYTES``; below, it keeps the output
  (one kernel less in the backward).

The thresholds were measured on a CPU (docs/architecture.md, "When the kernels trade time for memory",
has the figures; benches/bench_train.py and bench_train_memory.py re-measure them); the CUDA row count
is set from the GPU's ratio of matmul throughput to memory bandwidth, not measured yet.

``save_memory="always"`` forces the memory-saving path at any size (loss chunks as small as
``memory_saving_rows``: a chunk's logits about the size of the hidden states, the GELU recomputed);
``"never"`` forces the plain one (one chunk, the GELU's output kept). ``"auto"`` applies the rule; the
environment variable ``GPT2_KERNELS_SAVE_MEMORY`` (auto|always|never) overrides ``"auto"`` globally, e.g.
``GPT2_KERNELS_SAVE_MEMORY=never gpt-train ...`` to time a run without the savings. Values and
gradients are the same on every path up to float rounding.
"""

from __future__ import annotations

import os

import torch

from gpt2_kernels.dispatch import cdiv

SAVE_MEMORY = ("auto", "always", "never")
SAVE_MEMORY_ENV_VAR = "GPT2_KERNELS_SAVE_MEMORY"

# Rows (tokens) per loss chunk below which chunking costs time. CPU: GPT-2's head (C=768, V=50257),
# fp32, forward + backward of the loss alone, one thread: chunks of 63 rows (the old
# memory-first rule) took 1.15x the unfused time, 504 rows 0.96x (docs/architecture.md). CUDA: a
# chunk's matmuls (6 N C V FLOPs) outweigh re-reading the fp32 weight-gradient accumulator (8 V C
# bytes) about 10 to 1 at 4096 rows on an H100 in bf16 (3072 FLOPs per byte against its ~300).
LOSS_CHUNK_ROWS = {"cpu": 512, "cuda": 4096}
# GELU outputs smaller than this per layer are kept (GPT-2 124M: below 1024 tokens in fp32).
GELU_RECOMPUTE_MIN_BYTES = 12 * 2**20
# Where memory is short: the most of the available memory one chunk of logits may take before the
# chunks shrink towards memory_saving_rows.
MAX_CHUNK_SHARE = 1 / 8


def save_memory_mode(save_memory: str) -> str:
    """"auto", "always" or "never" after $GPT2_KERNELS_SAVE_MEMORY overrides "auto"; ValueError for
    an unknown name (naming the variable when it came from there)."""
    if save_memory not in SAVE_MEMORY:
        raise ValueError(f"save_memory: unknown mode {save_memory!r}; expected one of {', '.join(SAVE_MEMORY)}")
    if save_memory == "auto" and (value := os.environ.get(SAVE_MEMORY_ENV_VAR)):
        if value not in SAVE_MEMORY:
            raise ValueError(f"${SAVE_MEMORY_ENV_VAR}: unknown mode {value!r}; expected one of {', '.join(SAVE_MEMORY)}")
        return value
    return save_memory


def available_memory_bytes(device: torch.device | str = "cpu") -> int | None:
    """Memory an allocation on ``device`` can still get: on a CPU what the OS can give without swapping
    (Linux ``MemAvailable``), on CUDA the free device memory plus what PyTorch's caching allocator holds
    unused; None where unknown."""
    device = torch.device(device)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    if device.type != "cpu":
        return None
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def memory_saving_rows(n_tokens: int, n_channels: int, vocab_size: int) -> int:
    """The smallest chunk: ceil(N / ceil(V / C)) rows, so a chunk's logits are about the size of the
    hidden states (N x C). What ``save_memory="always"`` uses."""
    return max(1, cdiv(n_tokens, cdiv(vocab_size, n_channels)))


def loss_chunk_rows(n_tokens: int, n_channels: int, vocab_size: int, dtype: torch.dtype, device: torch.device | str,
                    *, save_memory: str = "auto", available_bytes: int | None = None) -> int:
    """Rows per chunk for ``linear_cross_entropy`` over N = ``n_tokens`` rows of width C = ``n_channels``
    into V = ``vocab_size`` logits of ``dtype`` on ``device``; N means one chunk (the plain path).
    ``available_bytes`` is the memory available (None: unknown, nothing is shortened for it)."""
    mode = save_memory_mode(save_memory)
    floor = memory_saving_rows(n_tokens, n_channels, vocab_size)
    if mode == "always":
        return floor
    if mode == "never":
        return max(1, n_tokens)
    rows = LOSS_CHUNK_ROWS["cpu" if torch.device(device).type == "cpu" else "cuda"]
    # The chunk's logits in fp32 (the CPU fallback computes in fp32 whatever the logits' dtype).
    row_bytes = vocab_size * max(torch.finfo(dtype).bits // 8, 4)
    if available_bytes is not None:
        rows = min(rows, int(available_bytes * MAX_CHUNK_SHARE) // row_bytes)
    rows = max(rows, floor)
    return cdiv(n_tokens, cdiv(n_tokens, rows)) if n_tokens > 0 else 1  # equal chunks: no thin last one


def recompute_gelu(n_elements: int, dtype: torch.dtype, *, save_memory: str = "auto") -> bool:
    """Whether ``gelu_linear`` recomputes the GELU of an input of ``n_elements`` of ``dtype`` in the
    backward (keeping only its input) rather than keeping the GELU's output. Shapes only, so that it
    traces under torch.compile without a graph break."""
    mode = save_memory_mode(save_memory)
    if mode != "auto":
        return mode == "always"
    return n_elements * torch.finfo(dtype).bits // 8 >= GELU_RECOMPUTE_MIN_BYTES
