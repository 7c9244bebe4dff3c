"""LayerNorm over the last dimension: Triton forward/backward kernels, PyTorch fallback, module.

Forward: one program per row, the whole row in registers (N <= 8192), fp32 statistics; saves the
per-row mean and rstd so the backward never recomputes them.
Backward, with xhat = (x - mean) * rstd and g = dy * w:
    dx = rstd * (g - mean(g) - xhat * mean(g * xhat))
dweight = sum_rows(dy * xhat) and dbias = sum_rows(dy) are reduced in two stages, as in Triton's
layer-norm tutorial but without its locks: each of G programs walks rows pid, pid + G, ... and
writes one fp32 partial row, then a second kernel sums the G partials per column. Deterministic.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from gpt2_kernels.dispatch import cdiv, jit, resolve_backend, tl, triton

MAX_N = 8192  # the row lives in one program's registers
DWDB_BLOCK_N = 128  # columns per program in the partial-sum reduction


@jit
def _ln_fwd_kernel(x_ptr, w_ptr, b_ptr, y_ptr, mean_ptr, rstd_ptr, N, eps,
                   HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_N)
    mask = cols < N
    x = tl.load(x_ptr + row * N + cols, mask=mask, other=0.0).to(tl.float32)
    mean = tl.sum(x, axis=0) / N
    xc = tl.where(mask, x - mean, 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(xc * xc, axis=0) / N + eps)
    y = xc * rstd
    if HAS_WEIGHT:
        y = y * tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_BIAS:
        y = y + tl.load(b_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(y_ptr + row * N + cols, y.to(y_ptr.dtype.element_ty), mask=mask)
    tl.store(mean_ptr + row, mean)
    tl.store(rstd_ptr + row, rstd)


@jit
def _ln_bwd_dx_kernel(x_ptr, w_ptr, dy_ptr, mean_ptr, rstd_ptr, dx_ptr, dw_partial_ptr, db_partial_ptr,
                      M, N, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)  # makes the row loop's offsets int64 too
    n_programs = tl.num_programs(0)
    cols = tl.arange(0, BLOCK_N)
    mask = cols < N
    if HAS_WEIGHT:
        w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    dw = tl.zeros((BLOCK_N,), dtype=tl.float32)
    db = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for row in range(pid, M, n_programs):
        offs = row * N + cols
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(dy_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        mean = tl.load(mean_ptr + row)
        rstd = tl.load(rstd_ptr + row)
        xhat = tl.where(mask, (x - mean) * rstd, 0.0)
        g = dy * w if HAS_WEIGHT else dy
        dx = rstd * (g - tl.sum(g, axis=0) / N - xhat * (tl.sum(g * xhat, axis=0) / N))
        tl.store(dx_ptr + offs, dx.to(dx_ptr.dtype.element_ty), mask=mask)
        if HAS_WEIGHT:
            dw += dy * xhat
        if HAS_BIAS:
            db += dy
    if HAS_WEIGHT:
        tl.store(dw_partial_ptr + pid * N + cols, dw, mask=mask)
    if HAS_BIAS:
        tl.store(db_partial_ptr + pid * N + cols, db, mask=mask)


@jit
def _sum_partials_kernel(partial_ptr, out_ptr, G, N, BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr):
    """out[n] = sum over g of partial[g, n]: the second stage of the dweight/dbias reduction."""
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = tl.zeros((BLOCK_G, BLOCK_N), dtype=tl.float32)
    for g0 in range(0, G, BLOCK_G):
        rows = g0 + tl.arange(0, BLOCK_G)
        mask = (rows[:, None] < G) & (cols[None, :] < N)
        acc += tl.load(partial_ptr + rows[:, None] * N + cols[None, :], mask=mask, other=0.0)
    tl.store(out_ptr + cols, tl.sum(acc, axis=0).to(out_ptr.dtype.element_ty), mask=cols < N)


def _num_warps(block_n: int) -> int:
    # 8 elements per thread up to 2048 columns; 16 warps for the longest rows keep the backward's
    # fp32 dweight/dbias accumulators in registers (nearly: N = 8192 still spills a little on sm_90).
    return min(max(block_n // 256, 1), 16)


def _num_partials(x: torch.Tensor, rows: int) -> int:
    # Enough programs to fill the GPU a few times over; few on the CPU interpreter, where each
    # program is a Python loop over its rows anyway.
    if x.is_cuda:
        return max(1, min(rows, 4 * torch.cuda.get_device_properties(x.device).multi_processor_count))
    return max(1, min(rows, 4))


def _reduce_partials(partial: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    G, N = partial.shape
    out = torch.empty(N, dtype=dtype, device=partial.device)
    _sum_partials_kernel[(cdiv(N, DWDB_BLOCK_N),)](partial, out, G, N, BLOCK_G=32, BLOCK_N=DWDB_BLOCK_N)
    return out


class _TritonLayerNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, eps):
        shape = x.shape
        N = shape[-1]
        x2 = x.contiguous().view(-1, N)
        M = x2.shape[0]
        block_n = triton.next_power_of_2(N)
        y = torch.empty_like(x2)
        mean = torch.empty(M, dtype=torch.float32, device=x.device)
        rstd = torch.empty(M, dtype=torch.float32, device=x.device)
        if M:
            _ln_fwd_kernel[(M,)](x2, weight, bias, y, mean, rstd, N, eps,
                                 HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None,
                                 BLOCK_N=block_n, num_warps=_num_warps(block_n))
        ctx.save_for_backward(x2, weight, mean, rstd)
        ctx.has_bias = bias is not None  # bias is not needed by the backward, only whether it exists
        ctx.bias_dtype = bias.dtype if bias is not None else None
        ctx.shape = shape
        return y.view(shape)

    @staticmethod
    def backward(ctx, dy):
        x2, weight, mean, rstd = ctx.saved_tensors
        M, N = x2.shape
        has_weight = weight is not None
        block_n = triton.next_power_of_2(N)
        G = _num_partials(x2, M)
        dy2 = dy.contiguous().view(M, N)
        dx = torch.empty_like(x2)
        # Every program writes its whole partial row (zeros if it had no rows), so no memset.
        dw_partial = torch.empty(G, N, dtype=torch.float32, device=x2.device) if has_weight else None
        db_partial = torch.empty(G, N, dtype=torch.float32, device=x2.device) if ctx.has_bias else None
        _ln_bwd_dx_kernel[(G,)](x2, weight, dy2, mean, rstd, dx, dw_partial, db_partial, M, N,
                                HAS_WEIGHT=has_weight, HAS_BIAS=ctx.has_bias,
                                BLOCK_N=block_n, num_warps=_num_warps(block_n))
        dw = _reduce_partials(dw_partial, weight.dtype) if has_weight else None
        db = _reduce_partials(db_partial, ctx.bias_dtype) if ctx.has_bias else None
        return dx.view(ctx.shape), dw, db, None


def layer_norm(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None = None,
               eps: float = 1e-5, *, backend: str = "auto") -> torch.Tensor:
    """LayerNorm over the last dimension of `x` (any leading shape); weight and bias optional."""
    N = x.shape[-1] if x.dim() else 0
    for name, p in (("weight", weight), ("bias", bias)):
        if p is not None and p.shape != (N,):
            raise ValueError(f"layer_norm: {name} has shape {tuple(p.shape)}, expected ({N},) "
                             f"to match the last dimension of x {tuple(x.shape)}")
    if resolve_backend(backend, x) == "triton":
        if not 0 < N <= MAX_N:
            raise ValueError(f"layer_norm: the Triton kernel handles rows of 1..{MAX_N} elements, got {N}; "
                             "use backend='torch'")
        return _TritonLayerNorm.apply(x, weight, bias, eps)
    return F.layer_norm(x, (N,), weight, bias, eps)


class LayerNorm(nn.Module):
    """nn.LayerNorm over the last dimension with an optional bias, dispatching to the Triton kernel."""

    def __init__(self, n: int, eps: float = 1e-5, bias: bool = True, backend: str = "auto"):
        super().__init__()
        self.n, self.eps, self.backend = n, eps, backend
        self.weight = nn.Parameter(torch.ones(n))
        self.bias = nn.Parameter(torch.zeros(n)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return layer_norm(x, self.weight, self.bias, self.eps, backend=self.backend)

    def extra_repr(self) -> str:
        return f"{self.n}, eps={self.eps}, bias={self.bias is not None}, backend={self.backend!r}"
