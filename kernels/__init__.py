"""Triton kernels with PyTorch fallbacks for GPT-2's hot paths: causal attention, LayerNorm, GELU, the
output layer fused with its cross-entropy loss, and the weight-only int8 linear layer of quantized
generation.

Every op takes `backend="auto"|"triton"|"torch"`: "auto" runs Triton on CUDA tensors when Triton is
importable, the PyTorch fallback otherwise; $KERNELS_BACKEND overrides "auto" globally (see dispatch).
"""

from kernels.attention import causal_attention
from kernels.dispatch import BACKENDS, ENV_VAR, backend_for_device, resolve_backend
from kernels.gelu import GELU, gelu, gelu_linear
from kernels.int8_linear import CPU_STREAM_MAX_ROWS, int8_linear, materialize, quantize_int8
from kernels.layer_norm import LayerNorm, layer_norm
from kernels.linear_cross_entropy import linear_cross_entropy

__all__ = ["BACKENDS", "CPU_STREAM_MAX_ROWS", "ENV_VAR", "GELU", "LayerNorm", "backend_for_device", "causal_attention", "gelu",
           "gelu_linear", "int8_linear", "layer_norm", "linear_cross_entropy", "materialize", "quantize_int8", "resolve_backend"]
