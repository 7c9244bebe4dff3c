"""GELU, tanh approximation (GPT-2's): Triton forward/backward kernels, PyTorch fallback, module.

gelu(x) = 0.5 x (1 + tanh(u)),  u = sqrt(2/pi) (x + 0.044715 x^3)
gelu'(x) = 0.5 (1 + tanh(u)) + 0.5 x (1 - tanh(u)^2) sqrt(2/pi) (1 + 3 * 0.044715 x^2)

Elementwise over the flattened (contiguous) tensor; math in fp32 whatever the storage dtype.
The backward recomputes tanh from x instead of saving the output: one saved tensor, not two.
``gelu_linear`` takes that further for an MLP: the linear layer after the GELU can get its input
recomputed in the backward instead of saved. That costs a GELU forward per layer in the backward
(on a CPU 3-6% of an MLP's forward and backward, one thread) and saves one N x 4C activation per layer; it is
done where that activation is large (gpt2_kernels.memory_plan.recompute_gelu: one layer's GELU
output of at least 12 MiB, GPT-2 124M in fp32 from 1024 tokens on), not where there is nothing to save.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from gpt2_kernels.dispatch import cdiv, constexpr, jit, resolve_backend, tl
from gpt2_kernels.memory_plan import recompute_gelu

BLOCK_SIZE = 1024  # elements per program: 4 warps x 32 threads x 8 elements
SQRT_2_OVER_PI = constexpr(math.sqrt(2.0 / math.pi))  # the constants of u (module docstring)
CUBIC = constexpr(0.044715)


@jit
def _tanh(u):
    # tl has sigmoid but no tanh on every backend: tanh(u) = 2 sigmoid(2u) - 1. tanh(+-10) is +-1 in
    # fp32 already; the clamp keeps sigmoid's exp finite (no overflow warnings in the interpreter).
    return 2.0 * tl.sigmoid(2.0 * tl.minimum(tl.maximum(u, -10.0), 10.0)) - 1.0


@jit
def _gelu_u(x):
    return SQRT_2_OVER_PI * (x + CUBIC * x * x * x)


@jit
def _gelu_fwd_kernel(x_ptr, y_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    t = _tanh(_gelu_u(x))
    tl.store(y_ptr + offs, (0.5 * x * (1.0 + t)).to(y_ptr.dtype.element_ty), mask=mask)


@jit
def _gelu_bwd_kernel(x_ptr, dy_ptr, dx_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    dy = tl.load(dy_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    t = _tanh(_gelu_u(x))
    dudx = SQRT_2_OVER_PI * (1.0 + 3.0 * CUBIC * x * x)
    dgelu = 0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * dudx
    tl.store(dx_ptr + offs, (dy * dgelu).to(dx_ptr.dtype.element_ty), mask=mask)


def _launch(kernel, out: torch.Tensor, *inputs: torch.Tensor) -> torch.Tensor:
    n = out.numel()
    if n:
        kernel[(cdiv(n, BLOCK_SIZE),)](*inputs, out, n, BLOCK=BLOCK_SIZE, num_warps=4)
    return out


class _TritonGELU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        x = x.contiguous()
        ctx.save_for_backward(x)
        return _launch(_gelu_fwd_kernel, torch.empty_like(x), x)

    @staticmethod
    def backward(ctx, dy):
        (x,) = ctx.saved_tensors
        return _launch(_gelu_bwd_kernel, torch.empty_like(x), x, dy.contiguous())


def gelu(x: torch.Tensor, *, backend: str = "auto") -> torch.Tensor:
    """Tanh-approximated GELU of a tensor of any shape; differentiable."""
    if resolve_backend(backend, x) == "triton":
        return _TritonGELU.apply(x)
    return F.gelu(x, approximate="tanh")


def _gelu_grad(x: torch.Tensor, dy: torch.Tensor, backend: str) -> torch.Tensor:
    if resolve_backend(backend, x) == "triton":
        return _launch(_gelu_bwd_kernel, torch.empty_like(x), x.contiguous(), dy.contiguous())
    return torch.ops.aten.gelu_backward(dy, x, approximate="tanh")


class _GELULinear(torch.autograd.Function):
    """linear(gelu(x)) that keeps x only: the GELU's output, as big as x, is recomputed in the backward
    instead of being saved for the linear layer's weight gradient."""

    @staticmethod
    def forward(ctx, x, weight, bias, backend):
        ctx.save_for_backward(x, weight)
        ctx.backend, ctx.has_bias = backend, bias is not None
        return F.linear(gelu(x, backend=backend).to(weight.dtype), weight, bias)

    @staticmethod
    def backward(ctx, dy):
        x, weight = ctx.saved_tensors
        h = gelu(x, backend=ctx.backend).to(weight.dtype)  # recomputed: elementwise, cheap next to the matmuls
        dy2 = dy.reshape(-1, dy.shape[-1])
        grad_weight = dy2.t() @ h.reshape(-1, h.shape[-1])
        grad_bias = dy2.sum(0) if ctx.has_bias else None
        grad_x = _gelu_grad(x, (dy @ weight).to(x.dtype), ctx.backend)
        return grad_x, grad_weight, grad_bias, None


def gelu_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, *,
                backend: str = "auto", save_memory: str = "auto") -> torch.Tensor:
    """``F.linear(gelu(x), weight, bias)`` (an MLP's activation and output layer), differentiable.
    Where gpt2_kernels.memory_plan says the memory is worth saving (``save_memory`` "auto": a large
    GELU output; "always"; "never"; $GPT2_KERNELS_SAVE_MEMORY overrides "auto"), it saves for the
    backward only ``x``, recomputing the GELU's output there: in a GPT-2 MLP that halves the activation
    memory the two layers keep. Under autocast it computes as the two ops would: the GELU in x's
    dtype, the linear layer in the autocast dtype."""
    if not recompute_gelu(x.numel(), x.dtype, save_memory=save_memory):
        return F.linear(gelu(x, backend=backend), weight, bias)
    if torch.is_autocast_enabled(x.device.type):
        dtype = torch.get_autocast_dtype(x.device.type)
        weight, bias = weight.to(dtype), None if bias is None else bias.to(dtype)  # differentiable casts
        with torch.autocast(x.device.type, enabled=False):
            return _GELULinear.apply(x, weight, bias, backend)
    return _GELULinear.apply(x, weight, bias, backend)


class GELU(nn.Module):
    """nn.GELU(approximate="tanh") that dispatches to the Triton kernel."""

    def __init__(self, backend: str = "auto"):
        super().__init__()
        self.backend = backend

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return gelu(x, backend=self.backend)

    def extra_repr(self) -> str:
        return f"backend={self.backend!r}"
