"""Causal attention: FlashAttention-2 style Triton kernels, PyTorch fallback.

Queries may be fewer than keys (decoding with a KV cache): q is (B, H, Tq, D), k and v are
(B, H, Tk, D) with Tk >= Tq, and query i sits at absolute position Tk - Tq + i, so it sees keys
0 .. Tk - Tq + i. Training is the case Tq == Tk.

Forward: one program per tile of query rows of one (batch, head) walks the key tiles with an online
softmax (running max, running sum and unnormalised output, fp32, in base 2). Key tiles that every
row sees need no mask, tiles straddling the diagonal are masked, tiles wholly in the future are never
loaded. Only the output and the per-row log-sum-exp are saved.
Backward: delta = rowsum(dO * O), then one pass per key tile summing dK and dV over the query tiles
that see it and one pass per query tile summing dQ; both recompute P = exp2(S - LSE) tile by tile.
No T x T matrix exists anywhere, and without atomics the gradients are deterministic.
Inputs are read in place through their strides (e.g. q, k, v as views of one qkv projection).

Tiles: on CUDA the three main kernels are autotuned (`triton.autotune`) over a few candidate tiles
each, pruned per launch to those that fit the GPU (see "tiles" below), so the first run on a new GPU
picks its own. Tuning cost is bounded: a new key (kernel, head dim, dtype, Tq and Tk buckets) compiles
the surviving candidates not compiled yet (at most 5 per kernel and dtype; about 1.3 s of CPU each on
this project's CPU machine, then in Triton's disk cache) and times each for TUNE_WARMUP_MS +
TUNE_REP_MS = 25 ms. A training run tunes each kernel once per dtype and head dim; decoding retunes the
forward (3 candidates) each time the cache length passes a power of two. On the interpreter the tiles
are fixed and small: autotuning is bypassed there.
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F

from gpt2_kernels.dispatch import INTERPRETER, cdiv, jit, resolve_backend, tl, triton

TRITON_HEAD_DIMS = (16, 32, 64, 128)
TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
LOG2_E = 1.4426950408889634  # scores are kept in base 2: exp(x) = exp2(x * log2(e))


# ---------------------------------------------------------------------------------------------- tiles
# Each kernel is autotuned on CUDA over a few candidate tiles (BLOCK_M query rows, BLOCK_N key rows,
# num_warps, num_stages), pruned per launch to those that fit the device (see _fits) and timed once
# per tuning key: head dim, dtype (and so PRECISION), and buckets of Tq and Tk (next power of two,
# 16..16384), which separate short-query decoding (Tq <= 16) from full sequences, the causal offset
# Tk - Tq, and long from short sequences. The candidates are the ones that compiled for sm_90 without
# register spills (ptxas; see tests/gpt2_kernels/test_cuda_compile.py), following the shapes of Triton's
# fused-attention tutorial: wide query tiles forward and for dQ, wide key tiles for dK/dV; fp32 runs
# its dots on the FMA units with every operand in registers, hence its small tiles.
_CANDIDATES = {
    ("fwd", 16): [(128, 64, 8, 3), (128, 32, 4, 3), (64, 64, 4, 3), (128, 32, 8, 2), (64, 64, 8, 2)],
    ("fwd", 32): [(32, 64, 8, 2), (16, 64, 8, 2), (32, 16, 8, 2), (16, 16, 4, 2)],
    # Decoding, a few queries against a long KV cache: 16-row query tiles waste less, wide key tiles
    # make fewer steps through the cache.
    ("decode", 16): [(16, 64, 4, 3), (16, 128, 4, 3), (16, 256, 8, 2)],
    ("decode", 32): [(16, 64, 8, 2), (16, 16, 4, 2)],
    ("dkdv", 16): [(32, 128, 8, 2), (64, 64, 8, 3), (32, 64, 4, 3), (32, 64, 8, 2), (64, 32, 8, 2)],
    ("dkdv", 32): [(16, 32, 8, 2), (16, 32, 8, 1), (16, 16, 4, 2)],
    ("dq", 16): [(128, 32, 8, 3), (64, 64, 8, 3), (64, 32, 4, 3), (64, 32, 8, 2)],
    ("dq", 32): [(32, 32, 8, 2), (32, 16, 8, 2), (16, 16, 4, 2)],
}
DECODE_MAX_TQ = 16
# Live values per thread (fp32 words) a tile may need, out of the 255 registers a thread can have:
# the rest holds addresses, offsets and loop state. Calibrated with ptxas on sm_90 (see _footprint).
REGISTER_BUDGET = 160
H100_SHARED_MEMORY = 227 * 1024  # bytes per block, the limit the candidates are checked against
# Autotuning times each candidate with Triton's do_bench for this long (ms): a few dozen launches.
TUNE_WARMUP_MS, TUNE_REP_MS = 5, 20
# On the CPU interpreter: fixed 32 x 32 tiles, small enough that the tests' short sequences cross
# tile edges and exercise the skipped, diagonal and full tiles (autotuning would only cost time there).
_INTERPRETER_TILES = (32, 32, 4, 1)


def _footprint(kernel: str, block_m: int, block_n: int, stages: int, head_dim: int, elem: int) -> tuple[int, int]:
    """(fp32 words of live tiles, shared-memory bytes): an upper-bound model of one program.

    Registers: the fp32 accumulators and score tiles, plus the loaded input tiles and the 16-bit
    copy of P (elem bytes each, counted in 4-byte words). Shared memory: the tiles staged through it,
    the streamed ones once per pipeline stage, one fp32 score tile for layout conversions, and the
    fp32 LSE/delta rows of the backward.
    """
    m, n, d = block_m, block_n, head_dim
    if kernel in ("fwd", "decode"):  # acc (m, d), scores (m, n); loads q (m, d), k and v (n, d)
        words = m * d + m * n + (m * d + 2 * n * d + m * n) * elem / 4
        shared = elem * d * (m + 2 * n * stages) + 4 * m * n
    elif kernel == "dkdv":  # dk, dv (n, d), p/dp (n, m); loads k, v (n, d), streams q, dO (m, d)
        words = 2 * n * d + 2 * n * m + (2 * n * d + 2 * m * d + n * m) * elem / 4
        shared = elem * d * (2 * n + 2 * m * stages) + 4 * m * n + 8 * m * stages
    else:  # dq: dq (m, d), p/dp (m, n); loads q, dO (m, d), streams k, v (n, d)
        words = m * d + 2 * m * n + (2 * m * d + 2 * n * d + m * n) * elem / 4
        shared = elem * d * (2 * m + 2 * n * stages) + 4 * m * n + 8 * m
    return int(words), int(shared)


def _fits(kernel: str, tile: tuple[int, int, int, int], head_dim: int, elem: int, max_shared: int) -> bool:
    block_m, block_n, warps, stages = tile
    words, shared = _footprint(kernel, block_m, block_n, stages, head_dim, elem)
    return words / (32 * warps) <= REGISTER_BUDGET and shared <= max_shared


def _tile_space(kernel: str, head_dim: int, dtype: torch.dtype, Tq: int = 1024,
                max_shared: int = H100_SHARED_MEMORY) -> list[tuple[int, int, int, int]]:
    """The candidate tiles of `kernel` ("fwd", "dkdv", "dq") that fit this head dim and dtype."""
    name = "decode" if kernel == "fwd" and Tq <= DECODE_MAX_TQ else kernel
    candidates = _CANDIDATES[(name, 32 if dtype == torch.float32 else 16)]
    elem = torch.empty((), dtype=dtype).element_size()
    # Never empty: the smallest candidate (listed last) always runs, if slowly, with head dim <= 128.
    return [t for t in candidates if _fits(name, t, head_dim, elem, max_shared)] or candidates[-1:]


def _tuning_buckets(Tq: int, Tk: int) -> tuple[int, int]:
    """Tq and Tk rounded up to powers of two in 16..16384: the tuning key's sequence part. Always a
    multiple of 16, so Triton specialises the (otherwise unused) kernel arguments only once."""
    return tuple(min(max(1 << (t - 1).bit_length(), 16), 16384) for t in (Tq, Tk))


@jit
def _attn_fwd_tile(acc, m_i, l_i, q, k_base, v_base, sk_t, sk_d, sv_t, sv_d, start_n, offs_m, offs_d,
                   Tk, offset, qk_scale, MASKED: tl.constexpr, BLOCK_N: tl.constexpr,
                   PRECISION: tl.constexpr):
    """One key tile of the online softmax. Scores are in base 2 (qk_scale includes log2(e))."""
    offs_n = start_n + tl.arange(0, BLOCK_N)
    in_bounds = (offs_n < Tk)[:, None]
    k = tl.load(k_base + offs_n[:, None] * sk_t + offs_d[None, :] * sk_d, mask=in_bounds, other=0.0)
    v = tl.load(v_base + offs_n[:, None] * sv_t + offs_d[None, :] * sv_d, mask=in_bounds, other=0.0)
    s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
    if MASKED:  # key n is visible from query m iff n <= Tk - Tq + m (this also hides n >= Tk)
        s = tl.where(offs_n[None, :] <= offset + offs_m[:, None], s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    p = tl.math.exp2(s - m_new[:, None])
    alpha = tl.math.exp2(m_i - m_new)
    l_i = l_i * alpha + tl.sum(p, axis=1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
    return acc, m_new, l_i


@jit
def _attn_fwd_kernel(Q, K, V, O, LSE,
                     sq_b, sq_h, sq_t, sq_d, sk_b, sk_h, sk_t, sk_d,
                     sv_b, sv_h, sv_t, sv_d, so_b, so_h, so_t, so_d,
                     H, Tq, Tk, qk_scale, tq_bucket, tk_bucket,
                     HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                     PRECISION: tl.constexpr):
    start_m = tl.program_id(0) * BLOCK_M
    bh = tl.program_id(1).to(tl.int64)
    b, h = bh // H, bh % H
    offset = Tk - Tq
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    row_ok = (offs_m < Tq)[:, None]
    q = tl.load(Q + b * sq_b + h * sq_h + offs_m[:, None] * sq_t + offs_d[None, :] * sq_d, mask=row_ok, other=0.0)
    k_base = K + b * sk_b + h * sk_h
    v_base = V + b * sv_b + h * sv_h
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    # Key tiles [0, full_end) are visible to every row of this query tile: no mask. Tiles from there
    # to the last key the tile's last row sees straddle the diagonal; tiles past it are skipped.
    full_end = (offset + start_m + 1) // BLOCK_N * BLOCK_N
    hi = offset + tl.minimum(start_m + BLOCK_M, Tq)
    for start_n in range(0, full_end, BLOCK_N):
        acc, m_i, l_i = _attn_fwd_tile(acc, m_i, l_i, q, k_base, v_base, sk_t, sk_d, sv_t, sv_d, start_n,
                                       offs_m, offs_d, Tk, offset, qk_scale, False, BLOCK_N, PRECISION)
    for start_n in range(full_end, hi, BLOCK_N):
        acc, m_i, l_i = _attn_fwd_tile(acc, m_i, l_i, q, k_base, v_base, sk_t, sk_d, sv_t, sv_d, start_n,
                                       offs_m, offs_d, Tk, offset, qk_scale, True, BLOCK_N, PRECISION)
    acc = acc / l_i[:, None]
    tl.store(O + b * so_b + h * so_h + offs_m[:, None] * so_t + offs_d[None, :] * so_d,
             acc.to(O.dtype.element_ty), mask=row_ok)
    tl.store(LSE + bh * Tq + offs_m, m_i + tl.math.log2(l_i), mask=offs_m < Tq)


@jit
def _attn_bwd_delta_kernel(O, DO, DELTA, n_rows, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr):
    """delta_i = sum_d dO_id * O_id, the softmax backward's row term (O, dO contiguous)."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs = rows[:, None] * HEAD_DIM + tl.arange(0, HEAD_DIM)[None, :]
    ok = (rows < n_rows)[:, None]
    o = tl.load(O + offs, mask=ok, other=0.0).to(tl.float32)
    do = tl.load(DO + offs, mask=ok, other=0.0).to(tl.float32)
    tl.store(DELTA + rows, tl.sum(o * do, axis=1), mask=rows < n_rows)


@jit
def _attn_bwd_dkdv_tile(dk, dv, k, v, q_base, do_base, lse_base, delta_base, sq_t, sq_d, sdo_t, sdo_d,
                        start_m, offs_n, offs_d, Tq, offset, qk_scale, MASKED: tl.constexpr,
                        BLOCK_M: tl.constexpr, PRECISION: tl.constexpr):
    """Add one query tile's contribution to a key tile's dK, dV (worked transposed: keys x queries)."""
    offs_m = start_m + tl.arange(0, BLOCK_M)
    row_ok = offs_m < Tq
    # Padding rows load q = dO = 0 and lse = delta = 0, so they add exactly zero.
    q = tl.load(q_base + offs_m[:, None] * sq_t + offs_d[None, :] * sq_d, mask=row_ok[:, None], other=0.0)
    do = tl.load(do_base + offs_m[:, None] * sdo_t + offs_d[None, :] * sdo_d, mask=row_ok[:, None], other=0.0)
    lse = tl.load(lse_base + offs_m, mask=row_ok, other=0.0)
    delta = tl.load(delta_base + offs_m, mask=row_ok, other=0.0)
    p_t = tl.math.exp2(tl.dot(k, tl.trans(q), input_precision=PRECISION) * qk_scale - lse[None, :])
    if MASKED:
        p_t = tl.where(offs_n[:, None] <= offset + offs_m[None, :], p_t, 0.0)
    dv += tl.dot(p_t.to(do.dtype), do, input_precision=PRECISION)
    dp_t = tl.dot(v, tl.trans(do), input_precision=PRECISION)
    ds_t = p_t * (dp_t - delta[None, :])
    dk += tl.dot(ds_t.to(q.dtype), q, input_precision=PRECISION)
    return dk, dv


@jit
def _attn_bwd_dkdv_kernel(Q, K, V, DO, DK, DV, LSE, DELTA,
                          sq_b, sq_h, sq_t, sq_d, sk_b, sk_h, sk_t, sk_d, sv_b, sv_h, sv_t, sv_d,
                          sdo_b, sdo_h, sdo_t, sdo_d, sdk_b, sdk_h, sdk_t, sdk_d,
                          H, Tq, Tk, qk_scale, scale, tq_bucket, tk_bucket,
                          HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                          PRECISION: tl.constexpr):
    start_n = tl.program_id(0) * BLOCK_N
    bh = tl.program_id(1).to(tl.int64)
    b, h = bh // H, bh % H
    offset = Tk - Tq
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    key_ok = (offs_n < Tk)[:, None]
    k = tl.load(K + b * sk_b + h * sk_h + offs_n[:, None] * sk_t + offs_d[None, :] * sk_d, mask=key_ok, other=0.0)
    v = tl.load(V + b * sv_b + h * sv_h + offs_n[:, None] * sv_t + offs_d[None, :] * sv_d, mask=key_ok, other=0.0)
    q_base = Q + b * sq_b + h * sq_h
    do_base = DO + b * sdo_b + h * sdo_h
    lse_base = LSE + bh * Tq
    delta_base = DELTA + bh * Tq
    dk = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    # Query m sees key n iff m >= n - offset: tiles before `lo` see none of these keys (skipped),
    # tiles from `full_start` on see all of them, the ones between straddle the diagonal.
    lo = tl.maximum(start_n - offset, 0) // BLOCK_M * BLOCK_M
    full_start = tl.minimum((tl.maximum(start_n + BLOCK_N - 1 - offset, 0) + BLOCK_M - 1) // BLOCK_M * BLOCK_M,
                            (Tq + BLOCK_M - 1) // BLOCK_M * BLOCK_M)
    for start_m in range(lo, full_start, BLOCK_M):
        dk, dv = _attn_bwd_dkdv_tile(dk, dv, k, v, q_base, do_base, lse_base, delta_base, sq_t, sq_d, sdo_t,
                                     sdo_d, start_m, offs_n, offs_d, Tq, offset, qk_scale, True, BLOCK_M,
                                     PRECISION)
    for start_m in range(full_start, Tq, BLOCK_M):
        dk, dv = _attn_bwd_dkdv_tile(dk, dv, k, v, q_base, do_base, lse_base, delta_base, sq_t, sq_d, sdo_t,
                                     sdo_d, start_m, offs_n, offs_d, Tq, offset, qk_scale, False, BLOCK_M,
                                     PRECISION)
    out = b * sdk_b + h * sdk_h + offs_n[:, None] * sdk_t + offs_d[None, :] * sdk_d
    tl.store(DK + out, (dk * scale).to(DK.dtype.element_ty), mask=key_ok)
    tl.store(DV + out, dv.to(DV.dtype.element_ty), mask=key_ok)


@jit
def _attn_bwd_dq_tile(dq, q, do, lse, delta, k_base, v_base, sk_t, sk_d, sv_t, sv_d, start_n, offs_m, offs_d,
                      Tk, offset, qk_scale, MASKED: tl.constexpr, BLOCK_N: tl.constexpr,
                      PRECISION: tl.constexpr):
    offs_n = start_n + tl.arange(0, BLOCK_N)
    in_bounds = (offs_n < Tk)[:, None]
    k = tl.load(k_base + offs_n[:, None] * sk_t + offs_d[None, :] * sk_d, mask=in_bounds, other=0.0)
    v = tl.load(v_base + offs_n[:, None] * sv_t + offs_d[None, :] * sv_d, mask=in_bounds, other=0.0)
    p = tl.math.exp2(tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale - lse[:, None])
    if MASKED:
        p = tl.where(offs_n[None, :] <= offset + offs_m[:, None], p, 0.0)
    dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
    ds = p * (dp - delta[:, None])
    return dq + tl.dot(ds.to(k.dtype), k, input_precision=PRECISION)


@jit
def _attn_bwd_dq_kernel(Q, K, V, DO, DQ, LSE, DELTA,
                        sq_b, sq_h, sq_t, sq_d, sk_b, sk_h, sk_t, sk_d, sv_b, sv_h, sv_t, sv_d,
                        sdo_b, sdo_h, sdo_t, sdo_d, sdq_b, sdq_h, sdq_t, sdq_d,
                        H, Tq, Tk, qk_scale, scale, tq_bucket, tk_bucket,
                        HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                        PRECISION: tl.constexpr):
    start_m = tl.program_id(0) * BLOCK_M
    bh = tl.program_id(1).to(tl.int64)
    b, h = bh // H, bh % H
    offset = Tk - Tq
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    row_ok = offs_m < Tq
    q = tl.load(Q + b * sq_b + h * sq_h + offs_m[:, None] * sq_t + offs_d[None, :] * sq_d,
                mask=row_ok[:, None], other=0.0)
    do = tl.load(DO + b * sdo_b + h * sdo_h + offs_m[:, None] * sdo_t + offs_d[None, :] * sdo_d,
                 mask=row_ok[:, None], other=0.0)
    lse = tl.load(LSE + bh * Tq + offs_m, mask=row_ok, other=0.0)
    delta = tl.load(DELTA + bh * Tq + offs_m, mask=row_ok, other=0.0)
    k_base = K + b * sk_b + h * sk_h
    v_base = V + b * sv_b + h * sv_h
    dq = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    full_end = (offset + start_m + 1) // BLOCK_N * BLOCK_N  # same tile split as the forward
    hi = offset + tl.minimum(start_m + BLOCK_M, Tq)
    for start_n in range(0, full_end, BLOCK_N):
        dq = _attn_bwd_dq_tile(dq, q, do, lse, delta, k_base, v_base, sk_t, sk_d, sv_t, sv_d, start_n, offs_m,
                               offs_d, Tk, offset, qk_scale, False, BLOCK_N, PRECISION)
    for start_n in range(full_end, hi, BLOCK_N):
        dq = _attn_bwd_dq_tile(dq, q, do, lse, delta, k_base, v_base, sk_t, sk_d, sv_t, sv_d, start_n, offs_m,
                               offs_d, Tk, offset, qk_scale, True, BLOCK_N, PRECISION)
    tl.store(DQ + b * sdq_b + h * sdq_h + offs_m[:, None] * sdq_t + offs_d[None, :] * sdq_d,
             (dq * scale).to(DQ.dtype.element_ty), mask=row_ok[:, None])


def _max_shared(device: torch.device) -> int:
    """Shared memory a block may use on this GPU (bytes), as Triton checks it."""
    return triton.runtime.driver.active.utils.get_device_properties(device.index)["max_shared_mem"]


def _prune(kernel: str, configs, named_args, **kwargs):
    """early_config_prune: the configs in _tile_space for this launch's head dim, dtype, Tq and GPU."""
    q = named_args["Q"]
    space = set(_tile_space(kernel, kwargs["HEAD_DIM"], q.dtype, named_args["Tq"], _max_shared(q.device)))
    return [c for c in configs if (c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages) in space]


def _bench(kernel_call, quantiles):
    import triton.testing

    return triton.testing.do_bench(kernel_call, warmup=TUNE_WARMUP_MS, rep=TUNE_REP_MS, quantiles=quantiles)


def _autotuned(kernel_fn, kernel: str):
    """kernel_fn wrapped in triton.autotune over every candidate of `kernel` (pruned per launch).

    Every program stores its outputs exactly once and reads nothing it writes, so timing a config
    (which launches it many times on the real arguments) leaves correct results behind: no
    reset_to_zero / restore_value needed."""
    tiles = dict.fromkeys(t for (name, _), ts in _CANDIDATES.items() if name == kernel or
                          (kernel == "fwd" and name == "decode") for t in ts)
    configs = [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s) for m, n, w, s in tiles]
    return triton.autotune(configs, key=["HEAD_DIM", "PRECISION", "tq_bucket", "tk_bucket"],
                           prune_configs_by={"early_config_prune": functools.partial(_prune, kernel)},
                           do_bench=_bench)(kernel_fn)


_KERNELS = {"fwd": _attn_fwd_kernel, "dkdv": _attn_bwd_dkdv_kernel, "dq": _attn_bwd_dq_kernel}
# Empty on the interpreter (fixed tiles there) and without Triton (where the kernels never run).
_TUNED = {k: _autotuned(fn, k) for k, fn in _KERNELS.items()} if triton is not None and not INTERPRETER else {}


def _launch(kernel: str, grid, *args, **constexprs) -> None:
    """Launch one of _KERNELS: autotuned on CUDA, with the fixed interpreter tiles otherwise."""
    if kernel in _TUNED:
        _TUNED[kernel][grid](*args, **constexprs)
        return
    block_m, block_n, warps, stages = _INTERPRETER_TILES
    _KERNELS[kernel][grid({"BLOCK_M": block_m, "BLOCK_N": block_n})](
        *args, BLOCK_M=block_m, BLOCK_N=block_n, num_warps=warps, num_stages=stages, **constexprs)


class _TritonCausalAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, scale):
        B, H, Tq, D = q.shape
        Tk = k.shape[2]
        precision = "ieee" if q.dtype == torch.float32 else "tf32"  # fp32 stays fp32 (no TF32 rounding)
        qk_scale = scale * LOG2_E
        o = torch.empty(B, H, Tq, D, dtype=q.dtype, device=q.device)
        lse = torch.empty(B, H, Tq, dtype=torch.float32, device=q.device)
        _launch("fwd", lambda meta: (cdiv(Tq, meta["BLOCK_M"]), B * H),
                q, k, v, o, lse, *q.stride(), *k.stride(), *v.stride(), *o.stride(), H, Tq, Tk, qk_scale,
                *_tuning_buckets(Tq, Tk), HEAD_DIM=D, PRECISION=precision)
        ctx.save_for_backward(q, k, v, o, lse)
        ctx.scale, ctx.precision = scale, precision
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse = ctx.saved_tensors
        B, H, Tq, D = q.shape
        Tk = k.shape[2]
        do = do.contiguous()
        delta = torch.empty_like(lse)
        _attn_bwd_delta_kernel[(cdiv(B * H * Tq, 64),)](o, do, delta, B * H * Tq, HEAD_DIM=D, BLOCK_M=64)
        dq = torch.empty(q.shape, dtype=q.dtype, device=q.device)
        dk = torch.empty(k.shape, dtype=k.dtype, device=k.device)
        dv = torch.empty(v.shape, dtype=v.dtype, device=v.device)
        common = dict(HEAD_DIM=D, PRECISION=ctx.precision)
        qk_scale, buckets = ctx.scale * LOG2_E, _tuning_buckets(Tq, Tk)
        _launch("dkdv", lambda meta: (cdiv(Tk, meta["BLOCK_N"]), B * H),
                q, k, v, do, dk, dv, lse, delta, *q.stride(), *k.stride(), *v.stride(), *do.stride(), *dk.stride(),
                H, Tq, Tk, qk_scale, ctx.scale, *buckets, **common)
        _launch("dq", lambda meta: (cdiv(Tq, meta["BLOCK_M"]), B * H),
                q, k, v, do, dq, lse, delta, *q.stride(), *k.stride(), *v.stride(), *do.stride(), *dq.stride(),
                H, Tq, Tk, qk_scale, ctx.scale, *buckets, **common)
        return dq, dk, dv, None


def _check_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"causal_attention: q, k, v must be 4-D (B, H, T, D), got shapes "
                         f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    B, H, Tq, D = q.shape
    if k.shape != v.shape or k.shape[:2] != (B, H) or k.shape[3] != D:
        raise ValueError(f"causal_attention: k and v must be (B, H, Tk, D) = ({B}, {H}, Tk, {D}) to match q, "
                         f"got {tuple(k.shape)} and {tuple(v.shape)}")
    if k.shape[2] < Tq:
        raise ValueError(f"causal_attention: needs Tk >= Tq (queries are the last Tq positions), "
                         f"got Tq={Tq}, Tk={k.shape[2]}")
    if not (q.dtype == k.dtype == v.dtype) or not (q.device == k.device == v.device):
        raise ValueError(f"causal_attention: q, k, v must share dtype and device, got "
                         f"{q.dtype}/{q.device}, {k.dtype}/{k.device}, {v.dtype}/{v.device}")


def _torch_causal_attention(q, k, v, scale):
    Tq, Tk = q.shape[2], k.shape[2]
    if Tq == Tk:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)
    if Tq == 1:  # one decoding step sees every key: no mask at all
        return F.scaled_dot_product_attention(q, k, v, scale=scale)
    # SDPA's is_causal aligns the mask to the top-left corner; with a KV cache the queries are the
    # last Tq positions, so build the bottom-right-aligned mask: key j visible iff j <= Tk - Tq + i.
    mask = torch.ones(Tq, Tk, dtype=torch.bool, device=q.device).tril(diagonal=Tk - Tq)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float | None = None,
                     backend: str = "auto") -> torch.Tensor:
    """softmax(q k^T * scale + causal offset mask) v -> (B, H, Tq, D); scale defaults to 1/sqrt(D)."""
    _check_inputs(q, k, v)
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1])
    if resolve_backend(backend, q) == "triton":
        if q.shape[-1] not in TRITON_HEAD_DIMS or 0 in q.shape or q.dtype not in TRITON_DTYPES:
            raise ValueError(f"causal_attention: the Triton kernel needs head dim in {TRITON_HEAD_DIMS}, non-empty "
                             f"float16/bfloat16/float32 inputs, got q {tuple(q.shape)} {q.dtype}; use backend='torch'")
        if q.dtype == torch.bfloat16 and not q.is_cuda:
            raise ValueError("causal_attention: the Triton interpreter computes bf16 matmuls wrongly (Triton 3.x); "
                             "use float16/float32 on the CPU, or backend='torch'")
        return _TritonCausalAttention.apply(q, k, v, scale)
    return _torch_causal_attention(q, k, v, scale)
