"""Triton kernels with PyTorch fallbacks for GPT-2's hot paths: causal attention, LayerNorm, GELU, the
output layer fused with its cross-entropy loss, and the weight-only int8 linear layer of quantized
generation (on a CPU, eagerly, a small C kernel: cpu_linear).

Every op takes `backend="auto"|"triton"|"torch"`: "auto" runs Triton on CUDA tensors when Triton is
importable, the PyTorch fallback otherwise; $GPT2_KERNELS_BACKEND overrides "auto" globally (see dispatch).
The two ops that can trade time for memory (`linear_cross_entropy`, `gelu_linear`) also take
`save_memory="auto"|"always"|"never"`: "auto" saves only where there is memory worth saving, by one rule
(memory_plan); $GPT2_KERNELS_SAVE_MEMORY overrides "auto" globally.

The import name is `gpt2_kernels`, not plain `kernels`, which is Hugging Face's hub-kernels package (a
dependency of transformers since 5.25): two packages of one import name cannot live in one environment.
"""

from gpt2_kernels.attention import causal_attention
from gpt2_kernels.cpu_linear import available as cpu_linear_available, unavailable_reason as cpu_linear_unavailable_reason
from gpt2_kernels.dispatch import BACKENDS, ENV_VAR, backend_for_device, backend_override, resolve_backend
from gpt2_kernels.gelu import GELU, gelu, gelu_linear
from gpt2_kernels.int8_linear import CPU_STREAM_MAX_ROWS, int8_linear, materialize, quantize_int8
from gpt2_kernels.layer_norm import LayerNorm, layer_norm
from gpt2_kernels.linear_cross_entropy import linear_cross_entropy
from gpt2_kernels.memory_plan import SAVE_MEMORY, SAVE_MEMORY_ENV_VAR, loss_chunk_rows, recompute_gelu

__all__ = ["BACKENDS", "CPU_STREAM_MAX_ROWS", "ENV_VAR", "GELU", "LayerNorm", "SAVE_MEMORY", "SAVE_MEMORY_ENV_VAR", "backend_for_device",
           "backend_override", "causal_attention", "cpu_linear_available", "cpu_linear_unavailable_reason", "gelu", "gelu_linear",
           "int8_linear", "layer_norm", "linear_cross_entropy", "loss_chunk_rows", "materialize", "quantize_int8", "recompute_gelu",
           "resolve_backend"]
