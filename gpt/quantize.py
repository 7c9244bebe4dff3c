"""Weight-only int8 quantization of a GPT for generation: ``quantize(model, "int8")``.

Every linear layer of the blocks (``attn.c_attn``, ``attn.c_proj``, ``mlp.c_fc``, ``mlp.c_proj``)
becomes an ``Int8Linear``: int8 weights with one fp32 scale per output channel (symmetric, absmax /
127; ``gpt2_kernels.quantize_int8``), computed by ``gpt2_kernels.int8_linear``, so activations stay in the
model's dtype (fp32 or bf16) and the product is accumulated in fp32. Embeddings, LayerNorms and
biases are left as they are.

The output head: GPT-2 ties it to the token embedding ``wte``, the largest matrix of a small model
(50257 x 768 is 31% of 124M's weights). With ``head=True`` (the default) the head gets an int8 copy
of that matrix while the embedding lookup keeps reading ``wte`` in full precision (one row per token);
with ``head=False`` the head stays ``wte`` itself. Measured (benches/README.md, Generation): decoding
124M reads ~124 MB of weights per token with the head quantized and ~240 MB without, so the head
decides most of the speed-up; on the demo model (``make demo``) quantizing the head doubles the
logits' relative error (0.16% -> 0.37%) and leaves the validation perplexity within 0.01% of fp32
either way.

Why only for generation: decoding a token reads every weight once, so bytes per weight set the speed.
On a CPU ``gpt2_kernels.int8_linear`` runs a few rows eagerly through a small C kernel
(``gpt2_kernels.cpu_linear``) that streams the int8 weights once for all rows: no compiling, 2-3x
fp32's decoding speed. Where that kernel cannot run (no C compiler, no AVX2) eager int8 dequantizes
a full weight copy per call and is slower than fp32, so gpt.generate compiles the decoding step of
an int8 model there by default (``gpt.sampling.compiles_by_default``).

A quantized model is changed in place and cannot be saved (the checkpoint format holds float
weights): quantize after loading. ``model.to(dtype)`` afterwards casts activations' parameters but
keeps the scales in fp32.
"""

from __future__ import annotations

import torch
import torch.nn as nn

import gpt2_kernels
from gpt.lora import merged_weight
from tokenizers_bpe.errors import SettingError

METHODS = ("int8",)
BLOCK_LINEARS = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")


class Int8Linear(nn.Module):
    """``y = x @ (weight_int8 * scale[:, None]).T + bias`` in x's dtype, for inference.

    ``weight_int8`` (out, in) int8, ``scale`` (out,) fp32 and ``bias`` are buffers (nothing here is
    trained). ``weight`` is the dequantized weight in the activation dtype, for code that reads a
    layer's weight (the model's fused loss reads ``lm_head.weight``)."""

    def __init__(self, weight_int8: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None, *,
                 dtype: torch.dtype, backend: str = "auto"):
        super().__init__()
        self.out_features, self.in_features = weight_int8.shape
        self.register_buffer("weight_int8", weight_int8)
        self.register_buffer("scale", scale)
        self.register_buffer("bias", bias)
        self.dtype, self.backend = dtype, backend

    @classmethod
    @torch.no_grad()
    def from_weight(cls, weight: torch.Tensor, bias: torch.Tensor | None = None, *, backend: str = "auto") -> "Int8Linear":
        weight_int8, scale = gpt2_kernels.quantize_int8(weight.detach())
        return cls(weight_int8, scale, None if bias is None else bias.detach().clone(), dtype=weight.dtype, backend=backend)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return gpt2_kernels.int8_linear(x, self.weight_int8, self.scale, self.bias, backend=self.backend)

    @property
    def weight(self) -> torch.Tensor:
        return (self.weight_int8.float() * self.scale[:, None]).to(self.dtype)

    def _apply(self, fn, recurse=True):
        # model.to(dtype) casts every floating-point buffer; the scales must stay fp32 (a bf16 scale
        # adds an error as large as the int8 rounding itself), so only their device follows.
        scale = self.scale
        super()._apply(fn, recurse)
        self.scale = scale.to(self.weight_int8.device)
        self.dtype = fn(torch.empty(0, dtype=self.dtype)).dtype
        return self

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, int8"


def _set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


@torch.no_grad()
def quantize(model: nn.Module, method: str = "int8", *, head: bool = True) -> nn.Module:
    """Quantize ``model`` (a gpt.GPT) in place for generation and return it; see the module docstring.
    ``head``: also give the output head int8 weights (the embedding lookup stays in full precision)."""
    if method not in METHODS:
        raise SettingError("quantize", f"{{quantize}} must be one of {', '.join(METHODS)}, got {method!r}")
    if getattr(model, "quantization", None) is not None:
        raise ValueError(f"the model is already quantized ({model.quantization['method']})")
    dtypes = {p.dtype for p in model.parameters()}
    if len(dtypes) != 1 or not next(iter(dtypes)).is_floating_point:
        raise ValueError(f"quantize needs a model with one float dtype, got {sorted(map(str, dtypes))}")
    backend = model.config.backend
    targets = [f"transformer.h.{i}.{name}" for i in range(model.config.n_layer) for name in BLOCK_LINEARS]
    if head:
        targets.append("lm_head")
    for name in targets:
        linear = model.get_submodule(name)
        _set_module(model, name, Int8Linear.from_weight(merged_weight(linear), linear.bias, backend=backend))
    model.quantization = {"method": method, "head": head}
    return model
