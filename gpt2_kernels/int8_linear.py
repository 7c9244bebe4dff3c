"""Weight-only int8 linear layer: Triton kernels for CUDA, PyTorch fallback, and the quantizer.

    int8_linear(x, weight_int8, scale, bias) = x @ (weight_int8 * scale[:, None]).T + bias

- ``weight_int8`` is (out, in) int8, symmetric (no zero point), values in [-127, 127];
- ``scale`` is (out,) **float32**, one per output channel, whatever x's dtype. A bf16 scale would
  round every weight of its row by up to 2^-9 relative, the same size as the int8 rounding itself
  (1/254 of the row's absmax), for a saving of 2 bytes per row (0.3% of the int8 bytes at in=768);
- x is (..., in) float32, float16 or bfloat16; the output has x's dtype and shape (..., out); the
  bias (out,), any float dtype, is added in fp32.

The per-channel scale is constant along the reduction, so the kernels dot x with the raw int8
values converted in registers (exact in every activation dtype: bf16 holds integers up to 256) and
multiply the fp32 sum by the scale once per output, instead of dequantising each weight.

Triton: one program per (BLOCK_M rows, BLOCK_N outputs, K split) tile walks its share of the
reduction in BLOCK_K steps, fp32 accumulation in ``tl.dot`` (fp32 inputs in full "ieee"
precision). Prefill (M > DECODE_MAX_M rows) tiles are wide enough to reuse each weight tile across
many rows, one program per output tile, no split. Decoding (1..16 rows) is a matrix-vector product
bounded by reading the weights, and one program per output tile would leave most of the GPU idle
(768 outputs / 64 = 12 programs), so the reduction is split SPLIT_K ways: each split writes fp32
partial sums and a second kernel adds them in a fixed order (deterministic, no atomics), applies
scale and bias, and casts.

PyTorch (CPUs, and backend="torch"): eagerly on a CPU, up to ``cpu_linear.MAX_ROWS`` rows (decoding,
speculative verification) go through ``gpt2_kernels.cpu_linear``, a C kernel (AVX2 or AVX-512) that streams the
int8 weights once for all rows and converts them in registers, with no compiling: the fast CPU
decoding path. More rows (a prefill), or where that kernel cannot run: F.linear on the weight
dequantised to x's dtype (a full copy per call; for a real matrix product MKL's GEMM on it is the
fastest way, for a few rows it is slower than fp32). Under torch.compile on the CPU with at most
CPU_STREAM_MAX_ROWS rows, the product is written as multiply + sum, which inductor turns into one
loop that streams the int8 weights.

``quantize_int8(weight)`` makes (weight_int8, scale): scale = absmax of the row / 127, values
rounded to nearest (ties to even). Each weight's error |w - q * scale| is at most half a step,
scale / 2 = absmax_row / 254, plus the fp32 rounding of w / scale (at most 127 * 2^-24 of a step):
scale * (1/2 + 2^-17) in all. An output's error is therefore at most about scale[n] / 2 * sum_k |x_k|.
An all-zero row gets scale 0 and zeros.
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F

from gpt2_kernels import cpu_linear
from gpt2_kernels.dispatch import cdiv, jit, resolve_backend, tl

QMAX = 127  # symmetric int8: -128 is never used, so negating a weight never overflows
ACTIVATION_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
DECODE_MAX_M = 16  # up to this many rows: decoding tiles (tl.dot's smallest M is 16)

# (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages), keyed on decoding vs prefill and 16-bit vs fp32
# activations. Set blind (no GPU has run them yet): each compiles for sm_90 without register spills
# and within shared memory (tests/gpt2_kernels/test_int8_linear.py checks both with ptxas); re-measure on
# a GPU. fp32 activations multiply on the FMA units in full precision, which costs registers: a
# 64 x 64 x 32 fp32 tile spills with 4 warps and not with 8.
_CUDA_TILES = {
    ("decode", True): (16, 64, 128, 4, 4),
    ("decode", False): (16, 64, 32, 4, 3),
    ("prefill", True): (128, 128, 64, 8, 3),
    ("prefill", False): (64, 64, 32, 8, 2),
}
# Decoding splits the reduction until about this many programs per SM are running.
DECODE_PROGRAMS_PER_SM = 2
# On the CPU interpreter: tiles small enough that the tests' odd shapes cross their edges, and a
# 2-way split for decoding so the partial-sum path runs too.
_INTERPRETER_TILES = {"decode": (16, 32, 32, 4, 1), "prefill": (32, 32, 32, 4, 1)}
INTERPRETER_SPLIT_K = 2
EPILOGUE_BLOCK_N = 128  # outputs per program when adding the split-K partial sums
CPU_STREAM_MAX_ROWS = 4  # compiled PyTorch path on the CPU: up to this many rows stream the int8 weights


@jit
def _int8_linear_kernel(x_ptr, w_ptr, scale_ptr, bias_ptr, out_ptr, partial_ptr,
                        M, N, K, k_per_split, sx_m, sx_k, sw_n, sw_k, so_m, so_n,
                        HAS_BIAS: tl.constexpr, SPLIT_K: tl.constexpr, BLOCK_M: tl.constexpr,
                        BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PRECISION: tl.constexpr):
    """x (M, K) float, w (N, K) int8 -> out (M, N) = (x @ w.T) * scale + bias when SPLIT_K == 1, else
    partial[split] (SPLIT_K, M, N) fp32 = x[:, ks] @ w[:, ks].T over this split's ks."""
    offs_m = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(1).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    split = tl.program_id(2)
    m_ok = offs_m < M
    n_ok = offs_n < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    # k_per_split is a multiple of BLOCK_K, so only the last tile of the last split crosses K.
    k_lo = split * k_per_split
    for k0 in range(k_lo, tl.minimum(k_lo + k_per_split, K), BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_ok = offs_k < K
        x = tl.load(x_ptr + offs_m[:, None] * sx_m + offs_k[None, :] * sx_k,
                    mask=m_ok[:, None] & k_ok[None, :], other=0.0)  # (BLOCK_M, BLOCK_K)
        w = tl.load(w_ptr + offs_n[:, None] * sw_n + offs_k[None, :] * sw_k,
                    mask=n_ok[:, None] & k_ok[None, :], other=0)  # (BLOCK_N, BLOCK_K) int8
        acc = tl.dot(x, tl.trans(w.to(x.dtype)), acc, input_precision=PRECISION)
    if SPLIT_K == 1:
        y = acc * tl.load(scale_ptr + offs_n, mask=n_ok, other=0.0)[None, :]
        if HAS_BIAS:
            y += tl.load(bias_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
        tl.store(out_ptr + offs_m[:, None] * so_m + offs_n[None, :] * so_n, y.to(out_ptr.dtype.element_ty),
                 mask=m_ok[:, None] & n_ok[None, :])
    else:
        tl.store(partial_ptr + (split * M + offs_m[:, None]) * N + offs_n[None, :], acc,
                 mask=m_ok[:, None] & n_ok[None, :])


@jit
def _int8_splitk_epilogue_kernel(partial_ptr, scale_ptr, bias_ptr, out_ptr, M, N, so_m, so_n,
                                 HAS_BIAS: tl.constexpr, SPLIT_K: tl.constexpr, BLOCK_N: tl.constexpr):
    """out[m, n] = (sum over splits of partial[split, m, n]) * scale[n] + bias[n], one row per program;
    the splits are added in order, so the result does not depend on which program finished first."""
    m = tl.program_id(0).to(tl.int64)
    offs_n = tl.program_id(1).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < N
    acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for split in range(SPLIT_K):
        acc += tl.load(partial_ptr + (split * M + m) * N + offs_n, mask=n_ok, other=0.0)
    y = acc * tl.load(scale_ptr + offs_n, mask=n_ok, other=0.0)
    if HAS_BIAS:
        y += tl.load(bias_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)
    tl.store(out_ptr + m * so_m + offs_n * so_n, y.to(out_ptr.dtype.element_ty), mask=n_ok)


@functools.cache
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _plan(M: int, N: int, K: int, dtype: torch.dtype, device: torch.device) -> tuple[tuple[int, ...], int]:
    """(BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages) and the number of K splits for this launch."""
    kind = "decode" if M <= DECODE_MAX_M else "prefill"
    if device.type != "cuda":
        tiles = _INTERPRETER_TILES[kind]
        wanted = INTERPRETER_SPLIT_K if kind == "decode" else 1
    else:
        tiles = _CUDA_TILES[kind, dtype != torch.float32]
        index = device.index if device.index is not None else torch.cuda.current_device()
        programs = cdiv(M, tiles[0]) * cdiv(N, tiles[1])
        wanted = cdiv(DECODE_PROGRAMS_PER_SM * _sm_count(index), programs) if kind == "decode" else 1
    return tiles, max(1, min(wanted, cdiv(K, tiles[2])))  # never a split without a K tile


def _triton_int8_linear(x2, weight_int8, scale, bias, out):
    M, K = x2.shape
    N = weight_int8.shape[0]
    (block_m, block_n, block_k, warps, stages), split_k = _plan(M, N, K, x2.dtype, x2.device)
    k_per_split = cdiv(max(1, cdiv(K, block_k)), split_k) * block_k
    split_k = max(1, cdiv(K, k_per_split))  # rounding k_per_split up to whole tiles can empty a split
    partial = torch.empty(split_k, M, N, dtype=torch.float32, device=x2.device) if split_k > 1 else None
    precision = "ieee" if x2.dtype == torch.float32 else "tf32"  # fp32 stays fp32 (no TF32 rounding)
    _int8_linear_kernel[(cdiv(M, block_m), cdiv(N, block_n), split_k)](
        x2, weight_int8, scale, bias, out, partial, M, N, K, k_per_split, *x2.stride(), *weight_int8.stride(),
        *out.stride(), HAS_BIAS=bias is not None, SPLIT_K=split_k, BLOCK_M=block_m, BLOCK_N=block_n,
        BLOCK_K=block_k, PRECISION=precision, num_warps=warps, num_stages=stages)
    if split_k > 1:
        _int8_splitk_epilogue_kernel[(M, cdiv(N, EPILOGUE_BLOCK_N))](
            partial, scale, bias, out, M, N, *out.stride(), HAS_BIAS=bias is not None, SPLIT_K=split_k,
            BLOCK_N=EPILOGUE_BLOCK_N, num_warps=4)
    return out


# An identity that inductor cannot see through. Without it inductor inlines whatever pointwise op
# produced x (a LayerNorm, typically) into the streaming loop below and recomputes it once per weight
# row, which made a compiled decode step compute-bound (measured while writing this).
_LIB = torch.library.Library("gpt2_kernels_int8_linear", "DEF")
_LIB.define("materialize(Tensor x) -> Tensor")


@torch.library.impl(_LIB, "materialize", "CompositeExplicitAutograd")
def _materialize(x):
    return x.clone()


@torch.library.register_fake("gpt2_kernels_int8_linear::materialize")
def _materialize_fake(x):
    return torch.empty_like(x)


def materialize(x: torch.Tensor) -> torch.Tensor:
    """``x`` itself, computed once: an identity torch.compile cannot see through. Put it between a
    pointwise op and a compiled loop that reads its output many times (a mat-vec streaming weights)."""
    return torch.ops.gpt2_kernels_int8_linear.materialize(x)


def _torch_int8_linear(x, weight_int8, scale, bias):
    rows = math.prod(x.shape[:-1])
    if torch.compiler.is_compiling() and not x.is_cuda and rows <= CPU_STREAM_MAX_ROWS:
        # Compiled on the CPU, multiply + sum becomes one inductor loop per output row that reads the
        # int8 weights once and converts them in registers. It reads the weights once per row of x, so
        # only for a few rows.
        x32 = materialize(x).float()
        y = (x32[..., None, :] * weight_int8.float()).sum(-1) * scale
    elif (not torch.compiler.is_compiling() and x.device.type == "cpu" and rows <= cpu_linear.MAX_ROWS
          and cpu_linear.available()):
        # Eagerly on the CPU, few rows (decoding): the C kernel streams the int8 weights once for all rows.
        x2 = x.reshape(rows, x.shape[-1]).float()
        if x2.stride(-1) != 1:
            x2 = x2.contiguous()
        y = cpu_linear.linear(x2, weight_int8.contiguous(), scale.contiguous(),
                              None if bias is None else bias.float().contiguous())
        return y.view(*x.shape[:-1], y.shape[-1]).to(x.dtype)
    else:
        # Dequantise to x's dtype (int8 -> bf16/fp16 is exact) and scale the result. This writes a
        # full copy of the weight per call: for a real matrix product (a prefill) MKL's GEMM on it is
        # still the fastest way; for a few rows it is slower than fp32.
        y = F.linear(x, weight_int8.to(x.dtype)) * scale
    if bias is not None:
        y = y + bias
    return y.to(x.dtype)


def _check_inputs(x, weight_int8, scale, bias) -> None:
    if weight_int8.dim() != 2 or weight_int8.dtype != torch.int8:
        raise ValueError(f"int8_linear: weight_int8 must be a 2-D (out, in) int8 tensor, got "
                         f"{tuple(weight_int8.shape)} {weight_int8.dtype}")
    N, K = weight_int8.shape
    if x.dtype not in ACTIVATION_DTYPES or x.dim() < 1 or x.shape[-1] != K:
        raise ValueError(f"int8_linear: x must be (..., {K}) float32/float16/bfloat16 to match weight_int8 "
                         f"{tuple(weight_int8.shape)}, got {tuple(x.shape)} {x.dtype}")
    if scale.shape != (N,) or scale.dtype != torch.float32:
        raise ValueError(f"int8_linear: scale must be ({N},) float32 (one per output channel, kept in fp32 "
                         f"whatever x's dtype), got {tuple(scale.shape)} {scale.dtype}")
    if bias is not None and (bias.shape != (N,) or not bias.dtype.is_floating_point):
        raise ValueError(f"int8_linear: bias must be a ({N},) float tensor, got {tuple(bias.shape)} {bias.dtype}")
    devices = {t.device for t in (x, weight_int8, scale, bias) if t is not None}
    if len(devices) > 1:
        raise ValueError(f"int8_linear: x, weight_int8, scale and bias must be on one device, got "
                         f"{', '.join(sorted(map(str, devices)))}")


def int8_linear(x: torch.Tensor, weight_int8: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None = None,
                *, backend: str = "auto") -> torch.Tensor:
    """x @ (weight_int8 * scale[:, None]).T + bias in x's dtype (see the module docstring); inference only."""
    _check_inputs(x, weight_int8, scale, bias)
    if resolve_backend(backend, x) == "torch":
        return _torch_int8_linear(x, weight_int8, scale, bias)
    if x.dtype == torch.bfloat16 and not x.is_cuda:
        raise ValueError("int8_linear: the Triton interpreter computes bf16 matmuls wrongly (Triton 3.x); "
                         "use float16/float32 on the CPU, or backend='torch'")
    N, K = weight_int8.shape
    x2 = x.reshape(math.prod(x.shape[:-1]), K)  # a view whenever the batch dims allow it; the kernel reads through strides
    out = torch.empty(x2.shape[0], N, dtype=x.dtype, device=x.device)
    if out.numel():
        _triton_int8_linear(x2, weight_int8, scale.contiguous(), None if bias is None else bias.contiguous(), out)
    return out.reshape(*x.shape[:-1], N)


@torch.no_grad()
def quantize_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(out, in) float weight -> (weight_int8 (out, in) int8, scale (out,) float32), symmetric per row:
    scale = absmax / 127, weight_int8 = round(weight / scale). See the module docstring for the bound."""
    if weight.dim() != 2 or not weight.dtype.is_floating_point:
        raise ValueError(f"quantize_int8: weight must be a 2-D (out, in) float tensor, got "
                         f"{tuple(weight.shape)} {weight.dtype}")
    w = weight.float()
    scale = w.abs().amax(dim=1) / QMAX if w.shape[1] else w.new_zeros(w.shape[0])
    if not torch.isfinite(scale).all():
        raise ValueError("quantize_int8: weight has inf or NaN entries")
    divisor = torch.where(scale > 0, scale, 1.0)  # an all-zero row: any divisor gives zeros
    weight_int8 = torch.round(w / divisor[:, None]).clamp_(-QMAX, QMAX).to(torch.int8)
    return weight_int8, scale
