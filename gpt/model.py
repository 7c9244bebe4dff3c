"""The GPT-2 model: the transformer and its KV cache (its configuration is in ``gpt.config``, its
checkpoint format in ``gpt.checkpoint``).

Read top to bottom: rotary embeddings -> attention -> MLP -> block -> GPT -> KV cache.
Module names follow nanoGPT / Hugging Face (``transformer.h[i].attn.c_attn`` ...), so weights map
one to one (HF's Conv1D stores the transpose of our ``nn.Linear`` weights).

Every attention, LayerNorm and GELU call, and the output layer with its loss in training, goes through
``gpt2_kernels``; ``config.backend`` picks Triton or PyTorch for the whole model. The Triton attention kernel has no dropout, so dropout is applied to the
embeddings and to the output of each residual branch (attention ``c_proj`` and MLP ``c_proj``), never
to attention probabilities.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

import gpt2_kernels
from gpt.checkpoint import PretrainedMixin
from gpt.config import GPTConfig
from gpt.memory import check_model_fits

ROPE_THETA = 10000.0  # RoFormer's base for the rotary frequencies


# ----------------------------------------------------------------------------------------------
# Rotary position embeddings (RoPE): rotate each (x_i, x_{i+D/2}) pair of q and k by an angle
# proportional to the position, so q.k depends on relative position. cos/sin are computed on the fly
# in fp32 (cheap: T x D/2) so they never get rounded by model.to(bfloat16) and need no buffers.


def rotary_cos_sin(positions: torch.Tensor, head_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    inv_freq = ROPE_THETA ** (-torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float32) / head_dim)
    angles = torch.outer(positions.float(), inv_freq)  # (T, D/2)
    angles = torch.cat((angles, angles), dim=-1)  # (T, D), matching the rotate-half layout
    return angles.cos(), angles.sin()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    x32 = x.float()
    x1, x2 = x32.chunk(2, dim=-1)
    rotated = torch.cat((-x2, x1), dim=-1)
    return (x32 * cos + rotated * sin).to(x.dtype)


# ----------------------------------------------------------------------------------------------


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.n_head = config.n_head
        self.backend = config.backend
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)  # q, k, v together
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(self, x, rotary=None, kv_cache: "KVCache | None" = None, layer: int = 0):
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))  # (B, H, T, D)
        if rotary is not None:
            q, k = apply_rotary(q, *rotary), apply_rotary(k, *rotary)
        if kv_cache is not None:
            k, v = kv_cache.append(layer, k, v)  # all positions so far: (B, H, cache.length + T, D)
        y = gpt2_kernels.causal_attention(q, k, v, backend=self.backend)
        y = y.transpose(1, 2).reshape(B, T, C)
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.gelu = gpt2_kernels.GELU(backend=config.backend)  # tanh approximation, as GPT-2
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        h = self.c_fc(x)
        if type(self.c_proj) is nn.Linear:  # (LoRA's layer adds its own term: its forward must run)
            # where it is large, the GELU's output is recomputed in the backward instead of kept: half
            # the MLP's activations (gpt2_kernels.memory_plan decides)
            return self.dropout(gpt2_kernels.gelu_linear(h, self.c_proj.weight, self.c_proj.bias, backend=self.gelu.backend))
        return self.dropout(self.c_proj(self.gelu(h)))


class Block(nn.Module):
    """Pre-LayerNorm transformer block: x + attn(ln(x)), then x + mlp(ln(x))."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.ln_1 = gpt2_kernels.LayerNorm(config.n_embd, eps=config.layer_norm_eps, bias=config.bias, backend=config.backend)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = gpt2_kernels.LayerNorm(config.n_embd, eps=config.layer_norm_eps, bias=config.bias, backend=config.backend)
        self.mlp = MLP(config)

    def forward(self, x, rotary=None, kv_cache=None, layer: int = 0):
        x = x + self.attn(self.ln_1(x), rotary, kv_cache, layer)
        return x + self.mlp(self.ln_2(x))


def embedding(num_embeddings: int, embedding_dim: int) -> nn.Embedding:
    """An nn.Embedding left uninitialised (init_weights fills it): nn.Embedding's own normal_ init on
    the meta device imports torch._dynamo, seconds of start-up for every from_pretrained."""
    return nn.Embedding.from_pretrained(torch.empty(num_embeddings, embedding_dim), freeze=False)


class GPT(PretrainedMixin, nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        config.validate()
        if torch.get_default_device().type != "meta":  # (on the meta device a model takes no memory)
            check_model_fits(config)
        self.config = config
        self.transformer = nn.ModuleDict(
            dict(
                wte=embedding(config.vocab_size, config.n_embd),
                **({"wpe": embedding(config.n_ctx, config.n_embd)} if config.pos_embedding == "learned" else {}),
                drop=nn.Dropout(config.dropout),
                h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
                ln_f=gpt2_kernels.LayerNorm(config.n_embd, eps=config.layer_norm_eps, bias=config.bias, backend=config.backend),
            )
        )
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.tie_weights()
        if not self.lm_head.weight.is_meta:  # on the meta device weights get assigned later (from_state_dict)
            self.init_weights()
        self.tokenizer = None  # set by from_pretrained; saved by save_pretrained
        self.generation_config: dict[str, Any] = {}
        self.quantization: dict[str, Any] | None = None  # set by gpt.quantize (a quantized model is not saved)

    def tie_weights(self) -> None:
        if self.config.tie_embeddings:
            self.lm_head.weight = self.transformer.wte.weight

    def init_weights(self) -> None:
        """GPT-2's initialisation: N(0, 0.02) weights, zero biases, LayerNorms 1/0, and the residual
        projections scaled by 1/sqrt(2 * n_layer), since each block adds two of them to the stream."""
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if isinstance(module, gpt2_kernels.LayerNorm):
                nn.init.ones_(module.weight)
            if isinstance(module, (nn.Linear, gpt2_kernels.LayerNorm)) and module.bias is not None:
                nn.init.zeros_(module.bias)
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * self.config.n_layer))

    def num_parameters(self, non_embedding: bool = False) -> int:
        """Parameter count (tied weights counted once). ``non_embedding`` leaves out the token and
        position embeddings and an untied output head (Kaplan et al.'s N)."""
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            n -= self.transformer.wte.weight.numel()
            if "wpe" in self.transformer:
                n -= self.transformer.wpe.weight.numel()
            if not self.config.tie_embeddings:
                n -= self.lm_head.weight.numel()
        return n

    def make_kv_cache(self, batch_size: int, max_len: int | None = None) -> "KVCache":
        return KVCache(self.config, batch_size, max_len)

    def hidden_states(self, idx: torch.Tensor, kv_cache: "KVCache | None" = None) -> torch.Tensor:
        """(B, T) token ids -> (B, T, n_embd) after the final LayerNorm."""
        B, T = idx.shape
        start = 0 if kv_cache is None else kv_cache.check_room(B, T)
        if start + T > self.config.n_ctx:
            raise ValueError(f"sequence of {T} tokens exceeds the model's context window n_ctx={self.config.n_ctx}")
        positions = torch.arange(start, start + T, device=idx.device)
        x = self.transformer.wte(idx)
        rotary = None
        if self.config.pos_embedding == "learned":
            x = x + self.transformer.wpe(positions)
        else:
            rotary = rotary_cos_sin(positions, self.config.head_dim)
        x = self.transformer.drop(x)
        for layer, block in enumerate(self.transformer.h):
            x = block(x, rotary, kv_cache, layer)
        if kv_cache is not None:
            kv_cache.length += T
        return self.transformer.ln_f(x)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None, kv_cache: "KVCache | None" = None,
                *, return_logits: bool = False):
        """Return (logits, loss). Without targets: (B, T, vocab) fp32 logits and None. With targets: the
        mean cross-entropy over targets != -100, from gpt2_kernels.linear_cross_entropy, which goes through
        the tokens a chunk at a time where the (B, T, vocab) logits would be large (gpt2_kernels.memory_plan;
        $GPT2_KERNELS_SAVE_MEMORY=always|never forces either path) and never returns them: logits is then
        None, unless ``return_logits=True`` asks for them (and the loss is computed from them)."""
        hidden = self.hidden_states(idx, kv_cache)
        if targets is not None and not return_logits:
            return None, gpt2_kernels.linear_cross_entropy(hidden, self.lm_head.weight, targets, backend=self.config.backend)
        logits = self.lm_head(hidden).float()
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-100)
        return logits, loss


class KVCache:
    """Keys and values of every layer for positions [0, length), for incremental decoding.

    A forward with ``kv_cache=cache`` processes its T tokens at positions length..length+T-1, attends
    to everything cached, and appends its keys/values. Buffers are allocated on first use with the
    dtype/device of the keys (so autocast and model.to(...) need no extra care)."""

    def __init__(self, config: GPTConfig, batch_size: int, max_len: int | None = None):
        max_len = config.n_ctx if max_len is None else max_len
        if not 1 <= max_len <= config.n_ctx:
            raise ValueError(f"KV cache max_len must be in [1, n_ctx={config.n_ctx}], got {max_len}")
        if batch_size < 1:
            raise ValueError(f"KV cache batch_size must be >= 1, got {batch_size}")
        self.batch_size, self.max_len = batch_size, max_len
        self.shape = (config.n_layer, batch_size, config.n_head, max_len, config.head_dim)
        self.k: torch.Tensor | None = None
        self.v: torch.Tensor | None = None
        self.length = 0

    def reset(self) -> None:
        self.length = 0

    def check_room(self, batch_size: int, T: int) -> int:
        """Validate a forward of (batch_size, T) new tokens; return the first new position."""
        if batch_size != self.batch_size:
            raise ValueError(f"KV cache was made for batch size {self.batch_size}, got a batch of {batch_size}")
        if self.length + T > self.max_len:
            raise ValueError(
                f"KV cache is full: {self.length} cached + {T} new tokens exceeds its max_len={self.max_len} "
                "(the model's context window unless set lower); reset it or crop the sequence"
            )
        return self.length

    def append(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.k is None or (self.length == 0 and (self.k.dtype, self.k.device) != (k.dtype, k.device)):
            self.k = torch.zeros(self.shape, dtype=k.dtype, device=k.device)
            self.v = torch.zeros(self.shape, dtype=v.dtype, device=v.device)
        end = self.length + k.size(2)
        self.k[layer, :, :, self.length : end] = k
        self.v[layer, :, :, self.length : end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]
