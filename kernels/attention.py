"""Causal attention: FlashAttention-2 style Triton kernels, PyTorch fallback.

Queries may be fewer than keys (decoding with a KV cache): q is (B, H, Tq, D), k and v are
(B, H, Tk, D) with Tk >= Tq, and query i sits at absolute position Tk - Tq + i, so it sees keys
0 .. Tk - Tq + i. Training is the case Tq == Tk.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from kernels.dispatch import resolve_backend


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
        raise NotImplementedError("causal_attention: the Triton kernel is being written; use backend='torch'")
    return _torch_causal_attention(q, k, v, scale)
