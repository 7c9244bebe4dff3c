"""Triton kernels with PyTorch fallbacks for GPT-2's hot paths: causal attention, LayerNorm, GELU.

Every op takes `backend="auto"|"triton"|"torch"`: "auto" runs Triton on CUDA tensors when Triton is
importable, the PyTorch fallback otherwise; $KERNELS_BACKEND overrides "auto" globally (see dispatch).
"""

from kernels.attention import causal_attention
from kernels.dispatch import BACKENDS, ENV_VAR, backend_for_device, resolve_backend
from kernels.gelu import GELU, gelu
from kernels.layer_norm import LayerNorm, layer_norm

__all__ = ["BACKENDS", "ENV_VAR", "backend_for_device", "GELU", "LayerNorm", "causal_attention", "gelu", "layer_norm", "resolve_backend"]
