"""LoRA: low-rank adapters on a GPT's linear layers (Hu et al., 2021).

A frozen ``nn.Linear`` with weight W (out x in) gets two small trainable matrices A (r x in) and
B (out x r); the layer computes ``x W^T + b + (alpha / r) * x A^T B^T``. B starts at zero, so an
adapted model starts out exactly equal to its base model, and only ``r * (in + out)`` numbers per
layer are trained.

``LoRALinear`` *is* an ``nn.Linear`` (a subclass) that keeps the base ``weight``/``bias`` under
their usual names and adds ``lora_A``/``lora_B``: a state dict of an adapted model is the base
model's plus ``*.lora_A``/``*.lora_B`` entries. The checkpoint format stores those separately
(``adapters.safetensors`` and a ``"lora"`` section in ``config.json``, see gpt.checkpoint), so the
base weights stay untouched and ``merge_lora`` folds the adapters in (``gpt-convert merge-lora``).
LoRA knows nothing of fine-tuning: any GPT (or a module holding one) can be adapted.

Targets name groups of layers: ``attn`` = ``attn.c_attn`` + ``attn.c_proj``, ``mlp`` = ``mlp.c_fc`` +
``mlp.c_proj``. The token embedding and the (tied) output head are never adapted.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from gpt.config import MAX_SIZES
from tokenizers_bpe.errors import SettingError

TARGETS = {"attn": ("attn.c_attn", "attn.c_proj"), "mlp": ("mlp.c_fc", "mlp.c_proj")}
ADAPTER_SUFFIXES = (".lora_A", ".lora_B")
MAX_ALPHA = 1e6  # alpha / rank scales the update: usual values are rank to 2 x rank
MAX_RANK = MAX_SIZES["n_embd"]  # a rank is at most the smaller side of the layers it adapts (checked in apply_lora)


@dataclass
class LoRAConfig:
    rank: int = 8
    alpha: float = 16.0  # the update is scaled by alpha / rank
    targets: tuple[str, ...] = ("attn",)

    def __post_init__(self):
        self.targets = tuple(self.targets)
        self.validate()

    def validate(self) -> None:
        if not isinstance(self.rank, int) or isinstance(self.rank, bool) or not 1 <= self.rank <= MAX_RANK:
            raise SettingError("lora_rank", f"{{lora_rank}} must be an integer in [1, {MAX_RANK}], got {self.rank!r}")
        if not isinstance(self.alpha, (int, float)) or isinstance(self.alpha, bool) or not 0 < self.alpha <= MAX_ALPHA:
            raise SettingError("lora_alpha", f"{{lora_alpha}} must be > 0 and at most {MAX_ALPHA:g}, got {self.alpha!r}")
        unknown = [t for t in self.targets if not isinstance(t, str) or t not in TARGETS]  # (a list in a file: unhashable)
        if unknown or not self.targets or len(set(self.targets)) != len(self.targets):
            raise SettingError("lora_targets", f"{{lora_targets}} must be a comma-separated subset of {','.join(TARGETS)}, "
                                               f"got {','.join(map(str, self.targets)) or 'nothing'}")

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank

    def to_dict(self) -> dict[str, Any]:
        return {"rank": self.rank, "alpha": float(self.alpha), "targets": list(self.targets)}

    @classmethod
    def from_dict(cls, d: Any) -> "LoRAConfig":
        if not isinstance(d, dict):
            raise ValueError(f"lora config must be a JSON object, got {type(d).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        if set(d) != known:
            raise ValueError(f"lora config must have exactly the keys {', '.join(sorted(known))}, got {', '.join(sorted(d)) or 'none'}")
        if not isinstance(d["targets"], list):
            raise ValueError(f"lora config: targets must be a list, got {d['targets']!r}")
        return cls(rank=d["rank"], alpha=d["alpha"], targets=tuple(d["targets"]))

    @classmethod
    def parse_targets(cls, text: str) -> tuple[str, ...]:
        return tuple(t.strip() for t in text.split(",") if t.strip())


class LoRALinear(nn.Linear):
    """An nn.Linear plus a low-rank update; ``weight``/``bias`` are the (frozen) base layer's."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float):
        # Share the base tensors instead of allocating new ones: no copy, and the names stay.
        nn.Module.__init__(self)
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight, self.bias = base.weight, base.bias
        self.rank, self.scaling = rank, alpha / rank
        factory = dict(device=base.weight.device, dtype=base.weight.dtype)
        self.lora_A = nn.Parameter(torch.empty(rank, self.in_features, **factory))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, rank, **factory))
        if base.weight.device.type != "meta":
            nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # as nn.Linear (and the LoRA paper's code)
        self.merged = False

    def delta_weight(self) -> torch.Tensor:
        return (self.lora_B @ self.lora_A) * self.scaling

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.linear(x, self.weight, self.bias)
        if self.merged:
            return out
        return out + F.linear(F.linear(x, self.lora_A), self.lora_B) * self.scaling

    @torch.no_grad()
    def merge(self) -> None:
        """Fold the update into ``weight`` (faster inference); ``unmerge`` takes it out again."""
        if not self.merged:
            self.weight += self.delta_weight().to(self.weight.dtype)
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if self.merged:
            self.weight -= self.delta_weight().to(self.weight.dtype)
            self.merged = False

    def to_linear(self) -> nn.Linear:
        """A plain nn.Linear holding the merged weight."""
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, device="meta")
        with torch.no_grad():  # add in fp32, so a bf16 checkpoint loses no more than one rounding
            weight = self.weight if self.merged else (self.weight.float() + self.delta_weight().float()).to(self.weight.dtype)
        linear.weight = nn.Parameter(weight.detach().clone(), requires_grad=self.weight.requires_grad)
        if self.bias is not None:
            linear.bias = nn.Parameter(self.bias.detach().clone(), requires_grad=self.bias.requires_grad)
        return linear

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, rank={self.rank}, scaling={self.scaling:g}, merged={self.merged}"


def merged_weight(linear: nn.Linear) -> torch.Tensor:
    """The weight a linear layer applies: a LoRA layer's unmerged update folded in (added in fp32, as
    ``to_linear``); any other layer's own weight."""
    if isinstance(linear, LoRALinear) and not linear.merged:
        return (linear.weight.float() + linear.delta_weight().float()).to(linear.weight.dtype)
    return linear.weight


def target_modules(model: nn.Module, targets: tuple[str, ...]) -> list[str]:
    """Names of the linear layers (in ``model.transformer.h``) that ``targets`` selects."""
    suffixes = tuple(s for t in targets for s in TARGETS[t])
    return [name for name, m in model.named_modules() if isinstance(m, nn.Linear) and ".h." in f".{name}" and name.endswith(suffixes)]


def _set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def apply_lora(model: nn.Module, config: LoRAConfig) -> nn.Module:
    """Wrap the target layers of a GPT in LoRALinear (in place) and freeze every base parameter.
    ``model.lora_config`` records the config (the checkpoint writer stores it)."""
    if getattr(model, "lora_config", None) is not None:
        raise ValueError("this model already has LoRA adapters; merge them first (gpt-convert merge-lora)")
    names = target_modules(model, config.targets)
    if not names:
        raise SettingError("lora_targets", f"no linear layers match {{lora_targets}} {','.join(config.targets)}")
    smallest = min(min(model.get_submodule(name).weight.shape) for name in names)
    if config.rank > smallest:  # a rank above a layer's smaller side adds nothing but memory
        raise SettingError("lora_rank", f"{{lora_rank}} {config.rank} exceeds the smallest side ({smallest}) of the layers it adapts")
    for p in model.parameters():
        p.requires_grad_(False)
    for name in names:
        _set_module(model, name, LoRALinear(model.get_submodule(name), config.rank, config.alpha))
    model.lora_config = config
    return model


def lora_layers(model: nn.Module) -> list[tuple[str, LoRALinear]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, LoRALinear)]


def merge_lora(model: nn.Module) -> nn.Module:
    """Replace every LoRALinear by a plain nn.Linear with the merged weight (in place); the result
    is an ordinary model with no adapters."""
    for name, layer in lora_layers(model):
        _set_module(model, name, layer.to_linear())
    model.lora_config = None
    return model


def is_adapter_key(name: str) -> bool:
    return name.endswith(ADAPTER_SUFFIXES)


def split_adapters(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Remove the adapter tensors from ``state`` (in place) and return them."""
    return {k: state.pop(k) for k in [k for k in state if is_adapter_key(k)]}


def adapter_shapes(model: nn.Module) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in model.state_dict().items() if is_adapter_key(k)}


def check_unmerged(model: nn.Module) -> None:
    merged = [n for n, m in lora_layers(model) if m.merged]
    if merged:
        raise ValueError(f"LoRA layer {merged[0]} is merged; unmerge it before saving (the checkpoint stores base weights and adapters apart)")


def count_trainable(model: nn.Module) -> tuple[int, int]:
    """(trainable parameters, all parameters), tied weights counted once."""
    params = list(model.parameters())
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)
