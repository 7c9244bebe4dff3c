"""The model's configuration: ``GPTConfig`` (a dataclass, validated on creation) and named sizes."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from gpt2_kernels import BACKENDS

POS_EMBEDDINGS = ("learned", "rope")
# Upper bounds of the sizes, far above any real GPT (GPT-3 175B: 96 layers, 12288 wide, 2048 context):
# a config file is read from disk, and an absurd size must be an error, not an hour of building modules
# or a multiplication that overflows. Whether a model within them fits the machine is gpt.memory's check.
MAX_SIZES = {"vocab_size": 2**24, "n_ctx": 2**20, "n_embd": 2**16, "n_layer": 1024, "n_head": 1024}


@dataclass
class GPTConfig:
    """Hyperparameters of a GPT. Defaults are GPT-2 small (124M)."""

    vocab_size: int = 50257
    n_ctx: int = 1024  # maximum sequence length (context window)
    n_embd: int = 768
    n_layer: int = 12
    n_head: int = 12
    dropout: float = 0.0
    bias: bool = True  # biases in Linear layers and LayerNorms
    pos_embedding: str = "learned"  # "learned" (GPT-2's wpe) or "rope" (rotary, no wpe)
    tie_embeddings: bool = True  # lm_head shares its weight with wte
    layer_norm_eps: float = 1e-5
    backend: str = "auto"  # kernels backend: "auto" | "triton" | "torch"

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        """Raise ValueError naming the first field that is out of range."""
        for name, high in MAX_SIZES.items():
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"model config: {name} must be a positive integer, got {value!r}")
            if value > high:
                raise ValueError(f"model config: {name} must be at most {high:,}, got {value:,}")
        for name in ("bias", "tie_embeddings"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"model config: {name} must be true or false, got {getattr(self, name)!r}")
        if self.n_embd % self.n_head:
            raise ValueError(f"model config: n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")
        if not isinstance(self.dropout, (int, float)) or isinstance(self.dropout, bool) or not 0 <= self.dropout < 1:
            raise ValueError(f"model config: dropout must be in [0, 1), got {self.dropout!r}")
        if self.pos_embedding not in POS_EMBEDDINGS:
            raise ValueError(f"model config: pos_embedding must be one of {', '.join(POS_EMBEDDINGS)}, got {self.pos_embedding!r}")
        if self.pos_embedding == "rope" and self.head_dim % 2:
            raise ValueError(f"model config: rope needs an even head size, but n_embd/n_head = {self.head_dim}")
        if not isinstance(self.layer_norm_eps, (int, float)) or isinstance(self.layer_norm_eps, bool) or not 0 < self.layer_norm_eps <= 1:
            raise ValueError(f"model config: layer_norm_eps must be in (0, 1], got {self.layer_norm_eps!r}")
        if self.backend not in BACKENDS:
            raise ValueError(f"model config: backend must be one of {', '.join(BACKENDS)}, got {self.backend!r}")

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    def num_parameters(self) -> int:
        """The parameter count of a GPT of this config, computed (no model is built): embeddings, 12
        n_embd^2 weights per block with their biases and LayerNorms, the final LayerNorm, and an untied
        output layer."""
        E, bias = self.n_embd, int(self.bias)
        block = 12 * E * E + bias * 9 * E + (2 + 2 * bias) * E
        embeddings = self.vocab_size * E * (1 if self.tie_embeddings else 2)
        positions = self.n_ctx * E if self.pos_embedding == "learned" else 0
        return embeddings + positions + self.n_layer * block + (1 + bias) * E

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "GPTConfig":
        """Build a config from a dict (e.g. JSON); unknown keys and bad values are ValueErrors.
        Keys left out take the defaults."""
        if not isinstance(d, dict):
            raise ValueError(f"model config must be a JSON object, got {type(d).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"model config: unknown key(s) {', '.join(unknown)}; known keys: {', '.join(sorted(known))}")
        return cls(**d)

    @classmethod
    def from_preset(cls, name: str, **overrides) -> "GPTConfig":
        if name not in PRESETS:
            raise ValueError(f"unknown model preset {name!r}; choose one of {', '.join(PRESETS)}")
        return cls.from_dict({**PRESETS[name], **overrides})


# Named sizes (fields that differ from the defaults). vocab_size is GPT-2's; a model trained with
# another tokenizer overrides it with the tokenizer's n_vocab.
PRESETS: dict[str, dict[str, Any]] = {
    "gpt2": dict(n_layer=12, n_head=12, n_embd=768),  # 124M
    "gpt2-medium": dict(n_layer=24, n_head=16, n_embd=1024),  # 350M
    "gpt2-large": dict(n_layer=36, n_head=20, n_embd=1280),  # 774M
    "gpt2-xl": dict(n_layer=48, n_head=25, n_embd=1600),  # 1558M
    # nanoGPT's Shakespeare configs: the GPU one (train_shakespeare_char.py) and the CPU one (README).
    "shakespeare": dict(n_layer=6, n_head=6, n_embd=384, n_ctx=256, dropout=0.2),
    "shakespeare-cpu": dict(n_layer=4, n_head=4, n_embd=128, n_ctx=64),
    "tiny": dict(n_layer=2, n_head=4, n_embd=64, n_ctx=128),  # for tests
}
