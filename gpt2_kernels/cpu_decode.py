"""Every transformer block of a decoding step on a CPU in one call (cpu_layer.c): LayerNorms, the
products (int8 or fp32, cpu_linear.c's kernel), one query's attention with its cache writes
(cpu_attention.c), GELU and the residual adds, for the step's rows.

    blocks = Blocks(layers, k_cache, v_cache, n_head=12, eps=1e-5)   # once per decoder
    blocks.run(x, length)                                             # x (B, C) fp32, in place

``layers`` are GPT-2 blocks described by attribute: ``ln_1`` and ``ln_2`` as (weight, bias or None),
``c_attn``, ``attn_proj``, ``c_fc``, ``mlp_proj`` each with ``weight`` (out, in) (all int8 with ``scale``
(out,) fp32, or all fp32 with ``scale`` None) and ``bias`` (out,) fp32 or None: gpt.decode's
inference weights. The caches are one (B, H, Lmax, D) fp32 tensor per block for keys and one for
values. Pointers to all of them are taken once, so the tensors are kept alive here and must not be
replaced (a decoder's are not).

Why: eagerly in PyTorch a block is ~25 operator calls of a few microseconds of dispatch each; for GPT-2
124M at batch 1 that was ~1.5 ms of a 6 ms int8 step (benches/README.md, Generation).
"""

from __future__ import annotations

import ctypes
from typing import Sequence

import torch

from gpt2_kernels import cpu_linear


class _Product(ctypes.Structure):
    _fields_ = [("weight", ctypes.c_void_p), ("scale", ctypes.c_void_p), ("bias", ctypes.c_void_p)]


class _Block(ctypes.Structure):
    _fields_ = [("ln_1_weight", ctypes.c_void_p), ("ln_1_bias", ctypes.c_void_p), ("c_attn", _Product), ("attn_proj", _Product),
                ("ln_2_weight", ctypes.c_void_p), ("ln_2_bias", ctypes.c_void_p), ("c_fc", _Product), ("mlp_proj", _Product),
                ("k_cache", ctypes.c_void_p), ("v_cache", ctypes.c_void_p), ("cache_strides", ctypes.c_int64 * 3)]


def _pointer(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


class Blocks:
    """The C description of a model's blocks and one decoder's caches (see the module docstring)."""

    def __init__(self, layers: Sequence, k_cache: Sequence[torch.Tensor], v_cache: Sequence[torch.Tensor], *,
                 n_head: int, eps: float):
        lib = cpu_linear._load()[0]
        if lib is None:
            raise RuntimeError(f"the CPU decoding kernels are unavailable: {cpu_linear.unavailable_reason()}")
        if not layers or len(layers) != len(k_cache) or len(layers) != len(v_cache):
            raise ValueError("cpu_decode.Blocks: one key cache and one value cache per block expected")
        C = layers[0].ln_1[0].shape[0]
        self.batch_size, self.n_head, self.eps, self.n_embd = k_cache[0].shape[0], n_head, float(eps), C
        self.int8 = layers[0].c_attn.scale is not None
        self._keep: list[torch.Tensor] = []  # every tensor a pointer was taken of
        blocks = (_Block * len(layers))()
        for blk, layer, keys, values in zip(blocks, layers, k_cache, v_cache):
            for name, (out_features, in_features) in (("c_attn", (3 * C, C)), ("attn_proj", (C, C)), ("c_fc", (4 * C, C)),
                                                      ("mlp_proj", (C, 4 * C))):
                lin = getattr(layer, name)
                self._check(lin.weight, torch.int8 if self.int8 else torch.float32, (out_features, in_features), name)
                if (lin.scale is not None) != self.int8:
                    raise ValueError("cpu_decode.Blocks: every product int8 with scales, or every product fp32 without")
                for t in (lin.scale, lin.bias):
                    if t is not None:
                        self._check(t, torch.float32, (out_features,), name)
                setattr(blk, name, _Product(lin.weight.data_ptr(), _pointer(lin.scale), _pointer(lin.bias)))
            for name in ("ln_1", "ln_2"):
                weight, bias = getattr(layer, name)
                for t in (weight, bias):
                    if t is not None:
                        self._check(t, torch.float32, (C,), name)
                setattr(blk, f"{name}_weight", weight.data_ptr())
                setattr(blk, f"{name}_bias", _pointer(bias))
            shape = keys.shape
            if not (keys.dtype == values.dtype == torch.float32 and keys.device.type == values.device.type == "cpu"
                    and shape == values.shape and keys.stride() == values.stride() and len(shape) == 4
                    and shape[0] == self.batch_size and shape[1] * shape[3] == C and shape[1] == n_head and keys.stride(3) == 1):
                raise ValueError(f"cpu_decode.Blocks: fp32 caches ({self.batch_size}, {n_head}, Lmax, {C // n_head}) expected")
            blk.k_cache, blk.v_cache = keys.data_ptr(), values.data_ptr()
            blk.cache_strides[:] = keys.stride()[:3]
            self._keep += [keys, values]
        self._blocks, self._lib, self.max_length = blocks, lib, k_cache[0].shape[2]
        self._work = torch.empty(9 * self.batch_size * C)

    def _check(self, t: torch.Tensor, dtype: torch.dtype, shape: tuple, name: str) -> None:
        if not (t.dtype == dtype and t.device.type == "cpu" and tuple(t.shape) == shape and t.is_contiguous()):
            raise ValueError(f"cpu_decode.Blocks: {name}: a contiguous {dtype} CPU tensor of shape {shape} expected, "
                             f"got {t.dtype} {tuple(t.shape)}")
        self._keep.append(t)

    def run(self, x: torch.Tensor, length: int) -> None:
        """Every block on ``x`` (B, C) fp32 contiguous, in place, at position ``length - 1``: its keys and
        values are written to the caches, and the attention reads the first ``length`` positions."""
        if not (x.dtype == torch.float32 and x.shape == (self.batch_size, self.n_embd) and x.is_contiguous()
                and 1 <= length <= self.max_length):
            raise ValueError(f"cpu_decode.Blocks.run: x ({self.batch_size}, {self.n_embd}) fp32 and a length in "
                             f"1..{self.max_length} expected")
        status = self._lib.decode_blocks(self._blocks, len(self._blocks), int(self.int8), x.data_ptr(), self.batch_size,
                                         self.n_embd, self.n_head, length, self.eps, self._work.data_ptr(),
                                         torch.get_num_threads())
        if status != 0:
            raise MemoryError(f"cpu_decode: no memory for {length} attention scores")
