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
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from kernels.dispatch import cdiv, jit, resolve_backend, tl

TRITON_HEAD_DIMS = (16, 32, 64, 128)
TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
LOG2_E = 1.4426950408889634  # scores are kept in base 2: exp(x) = exp2(x * log2(e))


# Tile sizes per kernel: (BLOCK_M query rows, BLOCK_N key rows, num_warps, num_stages), keyed on
# 16-bit vs fp32 inputs and head dim <= 64 vs 128. The shapes follow Triton's fused-attention
# tutorial (wide query tiles forward and for dQ, wide key tiles for dK/dV); warps and stages are
# set so that every kernel compiles for sm_90 (H100) without register spills (checked with ptxas
# on the PTX, no GPU needed); fp32 runs its dots in full precision on the FMA units, which costs
# registers, hence the small tiles. Speeds have not been tuned on a GPU yet: re-measure with
# benches/bench_attention.py and edit this table.
_CUDA_TILES = {
    (True, 64): {"fwd": (128, 64, 8, 3), "dkdv": (32, 128, 8, 4), "dq": (128, 32, 8, 4)},
    (True, 128): {"fwd": (64, 64, 8, 2), "dkdv": (32, 64, 8, 2), "dq": (64, 32, 8, 2)},
    (False, 64): {"fwd": (32, 32, 4, 2), "dkdv": (32, 32, 8, 2), "dq": (32, 32, 4, 2)},
    (False, 128): {"fwd": (16, 32, 8, 1), "dkdv": (16, 32, 8, 1), "dq": (32, 32, 8, 2)},
}
# Decoding (a few queries against a long KV cache): 16-row query tiles waste less of each tile, and
# wider key tiles make fewer steps through the cache. 16-bit only; fp32 tiles are small already.
_CUDA_DECODE_FWD = {64: (16, 128, 4, 3), 128: (16, 64, 4, 3)}
DECODE_MAX_TQ = 16
# On the CPU interpreter: 32 x 32 tiles, small enough that the tests' short sequences cross tile
# edges and exercise the skipped, diagonal and full tiles.
_INTERPRETER_TILES = {"fwd": (32, 32, 4, 1), "dkdv": (32, 32, 4, 1), "dq": (32, 32, 4, 1)}


def _tiles(head_dim: int, dtype: torch.dtype, device: torch.device, Tq: int) -> dict[str, tuple[int, int, int, int]]:
    if device.type != "cuda":
        return _INTERPRETER_TILES
    size = 64 if head_dim <= 64 else 128
    tiles = _CUDA_TILES[(dtype != torch.float32, size)]
    if dtype != torch.float32 and Tq <= DECODE_MAX_TQ:
        tiles = {**tiles, "fwd": _CUDA_DECODE_FWD[size]}
    return tiles


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
                     H, Tq, Tk, qk_scale,
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
                          H, Tq, Tk, qk_scale, scale,
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
                        H, Tq, Tk, qk_scale, scale,
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


class _TritonCausalAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, scale):
        B, H, Tq, D = q.shape
        Tk = k.shape[2]
        tiles = _tiles(D, q.dtype, q.device, Tq)
        precision = "ieee" if q.dtype == torch.float32 else "tf32"  # fp32 stays fp32 (no TF32 rounding)
        qk_scale = scale * LOG2_E
        o = torch.empty(B, H, Tq, D, dtype=q.dtype, device=q.device)
        lse = torch.empty(B, H, Tq, dtype=torch.float32, device=q.device)
        block_m, block_n, warps, stages = tiles["fwd"]
        _attn_fwd_kernel[(cdiv(Tq, block_m), B * H)](
            q, k, v, o, lse, *q.stride(), *k.stride(), *v.stride(), *o.stride(), H, Tq, Tk, qk_scale,
            HEAD_DIM=D, BLOCK_M=block_m, BLOCK_N=block_n, PRECISION=precision, num_warps=warps, num_stages=stages)
        ctx.save_for_backward(q, k, v, o, lse)
        ctx.scale, ctx.tiles, ctx.precision = scale, tiles, precision
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
        qk_scale = ctx.scale * LOG2_E
        block_m, block_n, warps, stages = ctx.tiles["dkdv"]
        _attn_bwd_dkdv_kernel[(cdiv(Tk, block_n), B * H)](
            q, k, v, do, dk, dv, lse, delta, *q.stride(), *k.stride(), *v.stride(), *do.stride(), *dk.stride(),
            H, Tq, Tk, qk_scale, ctx.scale, BLOCK_M=block_m, BLOCK_N=block_n, num_warps=warps,
            num_stages=stages, **common)
        block_m, block_n, warps, stages = ctx.tiles["dq"]
        _attn_bwd_dq_kernel[(cdiv(Tq, block_m), B * H)](
            q, k, v, do, dq, lse, delta, *q.stride(), *k.stride(), *v.stride(), *do.stride(), *dq.stride(),
            H, Tq, Tk, qk_scale, ctx.scale, BLOCK_M=block_m, BLOCK_N=block_n, num_warps=warps,
            num_stages=stages, **common)
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
