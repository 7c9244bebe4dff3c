"""The decoding fast path behind gpt.generate: weights laid out for inference, a static KV cache, and
a one-token step that torch.compile can turn into a few loops that stream the weights.

Decoding one token at batch 1 reads every weight once and does little else, so its speed is memory
bandwidth over weight bytes (benches/README.md, Generation, has the measurements behind each choice):

- **Inference weights** (``InferenceWeights``, built once per model and layout and reused while its
  parameters are unchanged; never part of the model's state dict, so checkpoints and training are
  untouched; one more copy of the weights in memory, 495 MB for 124M in fp32). On the CPU the weights
  a step streams are copied, in the order it reads them, into one arena of transparent huge pages
  (gpt.arena: one core reads ~30% faster from them), laid out for the kernel that reads them: eager
  fp32 multiplies a row by an (in, out) copy with ``addmm`` (MKL streams it at ~15-18 GB/s, against
  ~9-13 GB/s for ``F.linear`` on nn.Linear's (out, in)); the compiled step keeps (out, in) and writes
  each mat-vec as ``(x[:, None, :] * W).sum(-1)``, which inductor turns into one loop per output row
  over W read once (~20-26 GB/s). Eager bf16 uses oneDNN's prepacked weights (~1.4x ``F.linear``,
  the same results; oneDNN keeps them in its own memory). Speculative decoding's verification of a
  few tokens at once reads another oneDNN copy packed for 16 rows (``verify_layout``). On CUDA the
  parameters are used as they are. Int8 layers (gpt.quantize) go through ``gpt2_kernels.int8_linear``
  (on a CPU, eagerly, its C kernel: the int8 weights streamed once per step for all rows).
- **A static KV cache**: one (B, H, n_ctx + 1, D) tensor per layer for keys and one for values, written
  in place at each step's position. One tensor per layer, not one for all layers: compiled, writing
  into a slice of a graph input made inductor copy the whole cache twice per step. The attention of a
  step reads the first L positions (a view), so a cache sized for the whole context costs nothing per
  step, and memory is only touched where it is written.
- **The compiled step** (``compile=True``): the whole one-token forward is one graph; the current
  length L is a dynamic size, so one compilation serves every position, prompt and call with the
  same batch size and model shapes. Every input of a streamed mat-vec goes through an opaque identity
  op (``gpt2_kernels.materialize``), or inductor would inline the LayerNorm or GELU that produced it into
  the mat-vec loop and recompute it once per weight row. The one-query attention is written out
  (scores, softmax, weighted sum: fused by inductor); SDPA's call per layer cost 3-6 ms more per step.
  The prefill is compiled separately, dynamic in the prompt length: one graph for every prompt.
  Compiled code is specialised to the thread count at its compilation (inductor), and inputs are
  normalised (standard strides, inference tensors) so that no call recompiles by accident.
- Eagerly the model's kernels are used (``gpt2_kernels.layer_norm``, ``gelu``, ``causal_attention`` with
  the model's backend), so a Triton model runs its Triton kernels; in fp32 on a CPU where the C kernels
  run, a step's one-query attention (with its cache writes) is ``cpu_linear.attend_one``: PyTorch's
  attention call costs ~50 us per layer of dispatch for ~1 us of arithmetic.

``Decoder`` holds one generate() call's state: the inference weights, the cache, and the tokens it
holds (for the sliding window). No tensor grows or is re-allocated per token: the cache, the token
buffer and the positions are allocated once per call, and a step allocates only its own outputs.
"""

from __future__ import annotations

import math
import weakref
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

import gpt2_kernels
from gpt2_kernels import cpu_decode, cpu_linear
from gpt.arena import Arena
from gpt.model import apply_rotary, rotary_cos_sin
from gpt.lora import merged_weight
from gpt.quantize import Int8Linear

# Compiled on the CPU, a batch of up to this many rows streams the weights once per row (multiply +
# sum); more rows use a matrix product, which reads them once for all rows (as gpt2_kernels.int8_linear).
STREAM_MAX_ROWS = gpt2_kernels.CPU_STREAM_MAX_ROWS


class Linear(NamedTuple):
    weight: torch.Tensor  # (in, out) for the "transposed" layout, oneDNN's for "packed", else (out, in); int8 with a scale
    scale: torch.Tensor | None  # int8 weights: (out,) fp32 per-channel scales
    bias: torch.Tensor | None
    plain: torch.Tensor | None = None  # "packed": the (out, in) weight, for the prefill's matrix products


class Layer(NamedTuple):
    ln_1: tuple[torch.Tensor, torch.Tensor | None]
    c_attn: Linear
    attn_proj: Linear
    ln_2: tuple[torch.Tensor, torch.Tensor | None]
    c_fc: Linear
    mlp_proj: Linear


class Spec(NamedTuple):
    """What the step functions need to know besides tensors (constants to torch.compile)."""

    n_head: int
    eps: float
    rope: bool
    layout: str  # "kernel", "transposed", "rows", "packed" or "linear": see the module docstring
    backend: str  # the model's kernels backend, for eager steps
    compiled: bool
    int8_kernel: bool = False  # eager on a CPU where gpt2_kernels.cpu_linear runs: int8 layers call it directly
    cpu_attention: bool = False  # eager fp32 on a CPU where cpu_linear runs: a step's attention is its attend_one
    cpu_blocks: bool = False  # ... and, with learned positions, every block of a step is one gpt2_kernels.cpu_decode call


class InferenceWeights(NamedTuple):
    spec: Spec
    wte: torch.Tensor  # (V, C): the embedding lookup (one row per token)
    wpe: torch.Tensor | None
    layers: tuple[Layer, ...]
    ln_f: tuple[torch.Tensor, torch.Tensor | None]
    head: Linear


def _onednn_packing(dtype: torch.dtype) -> bool:
    """oneDNN can prepack weights of ``dtype`` on this CPU (bf16 needs AVX-512 or AVX-NE-CONVERT: on a
    CPU with AVX2 alone the reorder raises)."""
    if not (torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")):
        return False
    return dtype != torch.bfloat16 or torch.ops.mkldnn._is_mkldnn_bf16_supported()


def c_kernels(device: torch.device, dtype: torch.dtype, compiled: bool, backend: str) -> bool:
    """An eager fp32 step on a CPU, with the model's kernels in PyTorch, runs gpt2_kernels' C kernels
    (``cpu_linear``) where they run."""
    return (not compiled and device.type == "cpu" and dtype == torch.float32 and backend == "torch"
            and cpu_linear.available())


def layout_for(device: torch.device, dtype: torch.dtype, compiled: bool, backend: str = "torch") -> str:
    """The layout of a decoding step's weights (see the module docstring); ``backend`` is the model's
    kernels backend as resolved for these weights."""
    if device.type != "cpu":
        return "linear"
    if compiled:
        return "rows"
    if dtype == torch.float32:
        return "kernel" if c_kernels(device, dtype, compiled, backend) else "transposed"
    # bf16 eagerly: oneDNN's prepacked weights stream at ~1.4x F.linear's speed (the inductor's own
    # choice for frozen bf16 linears), with the same results as F.linear.
    return "packed" if dtype == torch.bfloat16 and _onednn_packing(dtype) else "linear"


def verify_layout(device: torch.device, dtype: torch.dtype) -> str | None:
    """The layout of the weights that check a draft's tokens (a few rows at once), or None for the
    step's own. On a CPU MKL multiplies 2-16 rows by a weight it packs on every call at 5-7 GB/s,
    less than half of what it reaches on one row; oneDNN's weights packed once for 16 rows take 5 rows
    at ~11 GB/s. They are one more copy of the weights, made for speculative decoding only."""
    return "verify" if device.type == "cpu" and dtype in (torch.float32, torch.bfloat16) and _onednn_packing(dtype) else None


PACKED_ROWS = {"packed": 1, "verify": 16}  # oneDNN's batch-size hint of each packed layout
VERIFY_MAX_ROWS = 16  # more rows (a prefill) are a real matrix product: MKL on the plain weight


def _linear_of(module: nn.Module, layout: str) -> Linear:
    if isinstance(module, Int8Linear):
        return Linear(module.weight_int8.detach().contiguous(), module.scale.detach().contiguous(), module.bias)
    weight = merged_weight(module).detach()
    bias = None if module.bias is None else module.bias.detach()
    if layout in PACKED_ROWS:
        return Linear(torch.ops.mkldnn._reorder_linear_weight(weight, PACKED_ROWS[layout]), None, bias, weight)
    return Linear(weight.t().contiguous() if layout == "transposed" else weight.contiguous() if layout == "kernel" else weight,
                  None, bias)


def _norm_of(module: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    return module.weight.detach(), None if module.bias is None else module.bias.detach()


@torch.inference_mode()  # inference tensors, however it is called: dynamo guards on the difference
def build_inference_weights(model: nn.Module, compiled: bool, layout: str | None = None) -> tuple[InferenceWeights, Arena | None]:
    """The weights of ``model`` (a gpt.GPT, maybe quantized or with LoRA adapters) laid out for
    decoding (``layout``, by default the step's: ``layout_for``), and the huge-page arena holding the
    streamed ones (on the CPU; else None)."""
    config = model.config
    wte = model.transformer.wte.weight.detach()
    backend = gpt2_kernels.resolve_backend(config.backend, wte)
    layout = layout or layout_for(wte.device, wte.dtype, compiled, backend)
    int8_kernel = (not compiled and wte.device.type == "cpu" and getattr(model, "quantization", None) is not None
                   and backend == "torch" and cpu_linear.available())
    layers = [Layer(_norm_of(b.ln_1), _linear_of(b.attn.c_attn, layout), _linear_of(b.attn.c_proj, layout),
                    _norm_of(b.ln_2), _linear_of(b.mlp.c_fc, layout), _linear_of(b.mlp.c_proj, layout))
              for b in model.transformer.h]
    c_step = c_kernels(wte.device, wte.dtype, compiled, backend)
    scales = {lin.scale is None for layer in layers for lin in (layer.c_attn, layer.attn_proj, layer.c_fc, layer.mlp_proj)}
    # the blocks in C: products all fp32 in the kernel's layout, or all int8
    blocks = c_step and config.pos_embedding != "rope" and (scales == {False} or (scales == {True} and layout == "kernel"))
    spec = Spec(config.n_head, float(config.layer_norm_eps), config.pos_embedding == "rope", layout, config.backend, compiled,
                int8_kernel, c_step, blocks)
    head = _linear_of(model.lm_head, layout)
    arena = None
    if wte.device.type == "cpu" and layout not in PACKED_ROWS:  # oneDNN keeps packed weights in its own memory
        # The streamed matrices, in the order a step reads them, into one huge-page arena.
        streamed = [lin for layer in layers for lin in (layer.c_attn, layer.attn_proj, layer.c_fc, layer.mlp_proj)] + [head]
        arena, moved = Arena.holding([lin.weight for lin in streamed])
        moved_linears = [lin._replace(weight=w) for lin, w in zip(streamed, moved)]
        layers = [layer._replace(c_attn=moved_linears[4 * i], attn_proj=moved_linears[4 * i + 1], c_fc=moved_linears[4 * i + 2],
                                 mlp_proj=moved_linears[4 * i + 3]) for i, layer in enumerate(layers)]
        head = moved_linears[-1]
    wpe = model.transformer.wpe.weight.detach() if "wpe" in model.transformer else None
    return InferenceWeights(spec, wte, wpe, tuple(layers), _norm_of(model.transformer.ln_f), head), arena


# The inference weights of a model stay with it (weakly: they go when the model goes), one set per
# layout asked for (eager, compiled), while its tensors are the same ones, unchanged: a cast, a load or
# an optimizer step changes the key, and the stale copies are freed.
_CACHE: "weakref.WeakKeyDictionary[nn.Module, dict]" = weakref.WeakKeyDictionary()


def _tensors_key(model: nn.Module) -> tuple:
    return tuple((id(t), t.data_ptr(), t._version, t.dtype, t.device) for t in (*model.parameters(), *model.buffers()))


def inference_weights(model: nn.Module, compiled: bool, layout: str | None = None) -> tuple[InferenceWeights, Arena | None]:
    """``build_inference_weights``, cached with the model (generate() does not cache them for a model
    that was in training mode: its weights change between calls, so it gets a copy freed after the call)."""
    key = _tensors_key(model)
    entry = _CACHE.get(model)
    if entry is None or entry["key"] != key:
        _CACHE.pop(model, None)  # free the stale copies before making new ones
        entry = _CACHE[model] = {"key": key}
    if (compiled, layout) not in entry:
        entry[compiled, layout] = build_inference_weights(model, compiled, layout)
    return entry[compiled, layout]


# ---------------------------------------------------------------------------------------------- the math


def _norm(x: torch.Tensor, wb, spec: Spec) -> torch.Tensor:
    if spec.compiled:
        return F.layer_norm(x, (x.shape[-1],), wb[0], wb[1], spec.eps)
    return gpt2_kernels.layer_norm(x, wb[0], wb[1], spec.eps, backend=spec.backend)


def _gelu(x: torch.Tensor, spec: Spec) -> torch.Tensor:
    return F.gelu(x, approximate="tanh") if spec.compiled else gpt2_kernels.gelu(x, backend=spec.backend)


def _matmul(x: torch.Tensor, lin: Linear, spec: Spec) -> torch.Tensor:
    """x (..., in) -> (..., out) in x's dtype, for any number of rows."""
    if lin.scale is not None:
        if (spec.int8_kernel and x.dtype == torch.float32 and x.numel() <= cpu_linear.MAX_ROWS * x.shape[-1]
                and (lin.bias is None or lin.bias.dtype == torch.float32)):
            # int8_linear's own path, without its per-call checks (~25 us each, 49 calls a step): these
            # weights were made for it (contiguous int8, fp32 scales)
            x2 = x.reshape(-1, x.shape[-1])
            y = cpu_linear.linear(x2 if x2.stride(-1) == 1 else x2.contiguous(), lin.weight, lin.scale, lin.bias)
            return y.view(*x.shape[:-1], y.shape[-1])
        return gpt2_kernels.int8_linear(x, lin.weight, lin.scale, lin.bias, backend="torch" if spec.compiled else spec.backend)
    if spec.layout == "transposed":
        x2 = x.reshape(-1, x.shape[-1])
        y = x2 @ lin.weight if lin.bias is None else torch.addmm(lin.bias, x2, lin.weight)
        return y.view(*x.shape[:-1], y.shape[-1])
    if lin.plain is not None:
        if x.numel() <= VERIFY_MAX_ROWS * x.shape[-1]:
            return torch.ops.mkldnn._linear_pointwise(x, lin.weight, lin.bias, "none", [], "")
        return F.linear(x, lin.plain, lin.bias)
    return F.linear(x, lin.weight, lin.bias)


def _matvec(x: torch.Tensor, lin: Linear, spec: Spec) -> torch.Tensor:
    """x (B, in) -> (B, out): a decoding step's product (see the module docstring for the layouts)."""
    if spec.layout == "kernel" and lin.scale is None and x.shape[0] <= cpu_linear.F32_MAX_ROWS:
        return cpu_linear.linear(x if x.stride(-1) == 1 else x.contiguous(), lin.weight, None, lin.bias)
    if spec.layout == "rows" and lin.scale is None and x.shape[0] <= STREAM_MAX_ROWS:
        x32 = gpt2_kernels.materialize(x).float()
        y = (x32[:, None, :] * lin.weight.float()).sum(-1)
        return (y if lin.bias is None else y + lin.bias.float()).to(x.dtype)
    return _matmul(x, lin, spec)


def _attend_one(q, keys, values, spec: Spec) -> torch.Tensor:
    """One query per row against L cached positions: q (B, H, 1, D), keys/values (B, H, L, D)."""
    if not spec.compiled:
        return gpt2_kernels.causal_attention(q, keys, values, backend=spec.backend)
    scale = 1.0 / math.sqrt(q.shape[-1])
    scores = (q.float() * keys.float()).sum(-1) * scale  # (B, H, L)
    p = torch.softmax(scores, dim=-1)
    return (p[..., None] * values.float()).sum(-2, keepdim=True).to(q.dtype)  # (B, H, 1, D)


def step_logits(w: InferenceWeights, k_cache: list[torch.Tensor], v_cache: list[torch.Tensor], token: torch.Tensor,
                positions: torch.Tensor) -> torch.Tensor:
    """One token per row: ``token`` (B,) at position L - 1, where ``positions`` is arange(L); its keys
    and values are written to the cache; returns (B, V) fp32 logits."""
    spec = w.spec
    B, L = token.shape[0], positions.shape[0]
    C = w.wte.shape[1]
    H, D = spec.n_head, C // spec.n_head
    pos = positions[L - 1:]  # (1,)
    x = F.embedding(token, w.wte)
    if w.wpe is not None:
        x = x + F.embedding(pos, w.wpe)
    rotary = rotary_cos_sin(pos, D) if spec.rope else None
    for i, layer in enumerate(w.layers):
        q, k, v = _matvec(_norm(x, layer.ln_1, spec), layer.c_attn, spec).view(B, 3, H, 1, D).unbind(1)
        if rotary is not None:
            q, k = apply_rotary(q, *rotary), apply_rotary(k, *rotary)
        if spec.cpu_attention:
            q, k, v = (t.squeeze(2) for t in (q, k, v))
            if not cpu_linear.same_layout(q, k, v):
                q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
            y = cpu_linear.attend_one(q, k, v, k_cache[i], v_cache[i], L)
        else:
            k_cache[i].index_copy_(2, pos, k)
            v_cache[i].index_copy_(2, pos, v)
            y = _attend_one(q, k_cache[i][:, :, :L], v_cache[i][:, :, :L], spec)
        x = x + _matvec(y.reshape(B, C), layer.attn_proj, spec)
        x = x + _matvec(_gelu(_matvec(_norm(x, layer.ln_2, spec), layer.c_fc, spec), spec), layer.mlp_proj, spec)
    return _matvec(_norm(x, w.ln_f, spec), w.head, spec).float()


def step_logits_c(w: InferenceWeights, blocks: cpu_decode.Blocks, token: torch.Tensor, length: int) -> torch.Tensor:
    """``step_logits`` with every block in one C call (``spec.cpu_blocks``): (B, V) fp32 logits."""
    x = F.embedding(token, w.wte) + w.wpe[length - 1]  # a new (B, C) tensor, which the blocks update in place
    blocks.run(x, length)
    return _matvec(_norm(x, w.ln_f, w.spec), w.head, w.spec)


def forward_logits(w: InferenceWeights, k_cache: list[torch.Tensor], v_cache: list[torch.Tensor], tokens: torch.Tensor,
                   key_positions: torch.Tensor, all_positions: bool) -> torch.Tensor:
    """``tokens`` (B, T) at the last T of ``key_positions`` = arange(start + T) (a prefill, or
    speculative decoding's verification), attending to the cache before them; their keys and values
    are written to the cache. Returns fp32 logits (B, T, V) for every position, or (B, V) for the
    last one only."""
    spec = w.spec
    B, T = tokens.shape
    C = w.wte.shape[1]
    H, D = spec.n_head, C // spec.n_head
    start = key_positions.shape[0] - T
    positions = key_positions[start:]
    x = F.embedding(tokens, w.wte)
    if w.wpe is not None:
        x = x + F.embedding(positions, w.wpe)
    rotary = rotary_cos_sin(positions, D) if spec.rope else None
    backend = "torch" if spec.compiled else spec.backend
    for i, layer in enumerate(w.layers):
        q, k, v = _matmul(_norm(x, layer.ln_1, spec), layer.c_attn, spec).view(B, T, 3, H, D).permute(2, 0, 3, 1, 4)
        if rotary is not None:
            q, k = apply_rotary(q, *rotary), apply_rotary(k, *rotary)
        k_cache[i].index_copy_(2, positions, k)
        v_cache[i].index_copy_(2, positions, v)
        y = gpt2_kernels.causal_attention(q, k_cache[i][:, :, :start + T], v_cache[i][:, :, :start + T], backend=backend)
        x = x + _matmul(y.transpose(1, 2).reshape(B, T, C), layer.attn_proj, spec)
        x = x + _matmul(_gelu(_matmul(_norm(x, layer.ln_2, spec), layer.c_fc, spec), spec), layer.mlp_proj, spec)
    if not all_positions:
        x = x[:, -1]  # the output head on the last position only: no (B, T, vocab) logits for a prefill
    return _matmul(_norm(x, w.ln_f, spec), w.head, spec).float()


# One graph per model shape, batch size, dtype and layout, all of them on these two functions: dynamo's
# default of 8 graphs per function is too few for a process that decodes with several models (a draft
# and its target, int8 and float); past the limit it would stop compiling them.
RECOMPILE_LIMIT = 64
_compiled: dict[str, object] = {}


def _compiled_fn(name: str):
    """The compiled step / forward, made on first call (torch.compile caches graphs per code object,
    so one wrapper serves every model; graphs are keyed by the shapes and the Spec). Not before: making
    it imports dynamo (~1.5 s), which a decoder running ahead-of-time packages (gpt.aot_decode) never needs."""
    if name not in _compiled:
        made: list = []

        def call(*args):
            if not made:
                made.append(torch.compile(step_logits, fullgraph=True) if name == "step" else torch.compile(forward_logits))
            with torch._dynamo.config.patch(recompile_limit=RECOMPILE_LIMIT):
                return made[0](*args)

        _compiled[name] = call
    return _compiled[name]


# ---------------------------------------------------------------------------------------------- the decoder


class Decoder:
    """One generate() call's decoding state: the model's inference weights, a static KV cache for
    ``batch_size`` rows of up to n_ctx positions, and the tokens it holds (``tokens[:, :length]``)."""

    @torch.inference_mode()
    def __init__(self, model: nn.Module, batch_size: int, *, compile: bool = False, cache_weights: bool = True):
        self._prepare = inference_weights if cache_weights else build_inference_weights
        self.weights, self.arena = self._prepare(model, compile)
        self.model, self.compile = model, compile
        self.traced = compile  # torch.compile runs the step and prefill (dynamo's marks on their inputs)
        self._verify_weights: InferenceWeights | None = None
        config = model.config
        device, dtype = self.weights.wte.device, self.weights.wte.dtype
        self.n_ctx = config.n_ctx
        # torch.empty: the cache is only read where it was written, and untouched pages cost nothing.
        # One slot more than the context: compiled, a view of all n_ctx positions would be a graph of its
        # own (a slice as long as its tensor is special to dynamo), compiled when the cache first fills.
        shape = (batch_size, config.n_head, config.n_ctx + 1, config.head_dim)
        self.k_cache = [torch.empty(shape, dtype=dtype, device=device) for _ in range(config.n_layer)]
        self.v_cache = [torch.empty(shape, dtype=dtype, device=device) for _ in range(config.n_layer)]
        self.tokens = torch.zeros(batch_size, config.n_ctx, dtype=torch.long, device=device)
        self.positions = torch.arange(config.n_ctx + 1, device=device)
        self.length = 0
        self._step = _compiled_fn("step") if compile else step_logits
        self._forward = _compiled_fn("forward") if compile else forward_logits
        self._blocks = (cpu_decode.Blocks(self.weights.layers, self.k_cache, self.v_cache, n_head=config.n_head,
                                          eps=config.layer_norm_eps) if self.weights.spec.cpu_blocks else None)

    def room(self) -> int:
        return self.n_ctx - self.length

    @torch.inference_mode()
    def extend(self, tokens: torch.Tensor, *, all_positions: bool = False) -> torch.Tensor:
        """Feed ``tokens`` (B, T) after the ``length`` cached ones: (B, V) logits of the last position,
        or (B, T, V) for every position with ``all_positions``."""
        T, start = tokens.shape[1], self.length
        if T > self.room():
            raise ValueError(f"decoder cache full: {start} cached + {T} new tokens exceed n_ctx={self.n_ctx}")
        if T == 1 and start > 0:
            logits = self.step(tokens[:, 0])
            return logits[:, None] if all_positions else logits
        # A one-token prompt runs eagerly: torch.compile always specialises sizes 0 and 1, so it would
        # cost a graph (seconds of compiling) of its own for a single forward.
        forward, weights = self._forward if T > 1 else forward_logits, self.weights
        if all_positions and 1 < T <= VERIFY_MAX_ROWS and self.verify_weights() is not self.weights:
            forward, weights = forward_logits, self.verify_weights()  # a speculative verification: eagerly, on its own weights
        # A window cut from a longer sequence, or a tensor made outside inference mode, would be a graph of
        # its own (dynamo guards on strides and on autograd's dispatch keys).
        tokens = torch.empty(tokens.shape, dtype=tokens.dtype, device=tokens.device).copy_(tokens)
        key_positions = self.positions[: start + T]
        if self.traced:  # one graph for every length (the weights' shapes stay static)
            torch._dynamo.maybe_mark_dynamic(tokens, 1)
            torch._dynamo.maybe_mark_dynamic(key_positions, 0)
        logits = forward(weights, self.k_cache, self.v_cache, tokens, key_positions, all_positions)
        self.tokens[:, start:start + T] = tokens
        self.length = start + T
        return logits

    def verify_weights(self) -> InferenceWeights:
        """The weights that check a draft's tokens (``verify_layout``), made on first use."""
        if self._verify_weights is None:
            # int8 layers have no packed form: they keep the step's path (gpt2_kernels.int8_linear)
            quantized = getattr(self.model, "quantization", None) is not None
            layout = None if quantized else verify_layout(self.weights.wte.device, self.weights.wte.dtype)
            self._verify_weights = self._prepare(self.model, False, layout)[0] if layout else self.weights
        return self._verify_weights

    def prefill(self, tokens: torch.Tensor) -> torch.Tensor:
        """Start over with ``tokens`` (B, T) in the cache: the logits (B, V) of the last position."""
        self.length = 0
        return self.extend(tokens)

    @torch.inference_mode()
    def step(self, token: torch.Tensor) -> torch.Tensor:
        """Feed one token per row (B,): the logits (B, V) of its position."""
        if self.length >= self.n_ctx:
            raise ValueError(f"decoder cache full: {self.length} cached tokens, n_ctx={self.n_ctx}")
        if not token.is_inference():
            token = token.clone()
        positions = self.positions[: self.length + 1]
        if self.traced:
            torch._dynamo.maybe_mark_dynamic(positions, 0)  # one graph for every length
        if self._blocks is not None:
            logits = step_logits_c(self.weights, self._blocks, token, self.length + 1)
        else:
            logits = self._step(self.weights, self.k_cache, self.v_cache, token, positions)
        self.tokens[:, self.length] = token
        self.length += 1
        return logits

    def rewind(self, length: int) -> None:
        """Forget every cached position from ``length`` on (speculative decoding's rejected tokens)."""
        if not 0 <= length <= self.length:
            raise ValueError(f"cannot rewind a decoder holding {self.length} tokens to {length}")
        self.length = length
