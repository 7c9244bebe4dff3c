"""Training settings (``TrainConfig``, validated) and what they define: the learning-rate schedule
(``lr_at``) and the optimizer (``build_optimizer``)."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn

from gpt.device import DTYPES
from tokenizers_bpe.errors import SettingError
from tokenizers_bpe.fileio import MAX_SEED



@dataclass
class TrainConfig:
    """Optimisation settings (the model and data are the caller's)."""

    max_steps: int = 2000  # optimiser steps
    batch_size: int = 12  # sequences per micro-batch per process
    grad_accum: int = 1  # micro-batches per optimiser step per process
    lr: float = 1e-3  # peak learning rate
    min_lr: float | None = None  # cosine floor (default lr / 10)
    warmup_steps: int = 100  # linear warmup
    lr_decay_steps: int | None = None  # end of the cosine (default max_steps), then min_lr
    weight_decay: float = 0.1  # on parameters with >= 2 dimensions only
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0  # max global gradient norm; 0 = no clipping (the norm is still reported)
    eval_interval: int = 250  # evaluate (and sample) every N steps and at the end
    eval_iters: int | None = 20  # evaluation batches per rank (None: all eval_batches yields)
    log_interval: int = 10  # a training line in metrics.jsonl every N steps
    checkpoint_interval: int | None = None  # default eval_interval
    keep_last: int = 3  # step checkpoints kept (best/ and final/ are separate)
    best_metric: str = "val_loss"
    best_mode: str = "min"  # "min" or "max"
    seed: int = 1337
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    dtype: str = "auto"  # auto (bf16/fp16 on CUDA, float32 on CPU) | float32 | bfloat16 | float16
    compile: bool = False  # torch.compile the model
    progress: bool = True  # tqdm bar on rank 0

    def validate(self) -> None:
        """A SettingError naming the first setting out of range."""

        def integer(name: str, low: int = 1, high: int | None = None) -> None:
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < low:
                raise SettingError(name, f"{{{name}}} must be an integer >= {low}, got {v!r}")
            if high is not None and v > high:
                raise SettingError(name, f"{{{name}}} must be an integer in [{low}, {high}], got {v!r}")

        def finite(name: str) -> float:
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v):
                raise SettingError(name, f"{{{name}}} must be a finite number, got {v!r}")
            return v

        for name in ("max_steps", "batch_size", "grad_accum", "eval_interval", "log_interval", "keep_last"):
            integer(name)
        integer("warmup_steps", low=0)
        integer("seed", low=0, high=MAX_SEED)
        for name in ("eval_iters", "checkpoint_interval", "lr_decay_steps"):
            if getattr(self, name) is not None:
                integer(name)
        if not finite("lr") > 0:
            raise SettingError("lr", f"{{lr}} must be > 0, got {self.lr}")
        if self.min_lr is not None and not 0 <= finite("min_lr") <= self.lr:
            raise SettingError("min_lr", f"{{min_lr}} must be between 0 and {{lr}} ({self.lr}), got {self.min_lr}")
        for name in ("weight_decay", "grad_clip"):
            if finite(name) < 0:
                raise SettingError(name, f"{{{name}}} must be >= 0, got {getattr(self, name)}")
        for name in ("beta1", "beta2"):
            if not 0 <= finite(name) < 1:
                raise SettingError(name, f"{{{name}}} must be in [0, 1), got {getattr(self, name)}")
        if self.dtype not in ("auto", *DTYPES):
            raise SettingError("dtype", f"{{dtype}} must be one of auto, {', '.join(DTYPES)}, got {self.dtype!r}")
        if self.best_mode not in ("min", "max"):
            raise SettingError("best_mode", f"{{best_mode}} must be 'min' or 'max', got {self.best_mode!r}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warmup to ``lr``, cosine decay to ``min_lr`` at ``lr_decay_steps``, then flat (nanoGPT)."""
    min_lr = cfg.lr / 10 if cfg.min_lr is None else cfg.min_lr
    decay_steps = cfg.lr_decay_steps or cfg.max_steps
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / (cfg.warmup_steps + 1)
    if step >= decay_steps:
        return min_lr
    progress = (step - cfg.warmup_steps) / max(1, decay_steps - cfg.warmup_steps)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (cfg.lr - min_lr)


def build_optimizer(model: nn.Module, cfg: TrainConfig, device: str) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices/embeddings only (not biases or LayerNorm gains); the
    fused kernel where this torch has one for the device, else foreach."""
    decay, no_decay = [], []
    for p in model.parameters():  # parameters() yields a tied weight once
        if p.requires_grad:
            (decay if p.dim() >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    kwargs = dict(lr=cfg.lr, betas=(cfg.beta1, cfg.beta2))
    try:
        return torch.optim.AdamW(groups, fused=True, **kwargs)
    except (RuntimeError, TypeError):  # no fused kernel for this device / torch
        return torch.optim.AdamW(groups, foreach=device.startswith("cuda") or None, **kwargs)
