"""nanoGPT's character-level training loop in plain PyTorch: the peer of the recipe benchmark.

nanoGPT is not a package, so this is a small, independent rewrite of what its ``train.py`` and
``model.py`` do for ``config/train_shakespeare_char.py`` on a CPU: characters sorted into a 65-entry
vocabulary, the first 90% for training; nanoGPT's defaults (no biases, exact GELU, weight tying,
N(0, 0.02) init with residual projections scaled by 1/sqrt(2 L)); ``torch.randint`` windows; AdamW
with decay on >= 2-D parameters; warmup then cosine; clipping at 1.0. It shares no code with
``gpt`` on purpose: it is the yardstick the Trainer is measured against.

It reports the validation loss both ways: on the whole split in non-overlapping windows (what
``gpt-train`` reports) and as nanoGPT prints it, the mean of 20 random batches.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
from torch.nn import functional as F


@dataclass
class Recipe:
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    block_size: int = 64
    batch_size: int = 12
    max_iters: int = 2000
    lr: float = 1e-3
    min_lr: float = 1e-4
    warmup_iters: int = 100
    lr_decay_iters: int = 2000
    beta2: float = 0.99
    weight_decay: float = 0.1


class Block(nn.Module):
    def __init__(self, r: Recipe):
        super().__init__()
        c = r.n_embd
        self.n_head = r.n_head
        self.ln_1 = nn.LayerNorm(c, bias=False)
        self.c_attn = nn.Linear(c, 3 * c, bias=False)
        self.attn_proj = nn.Linear(c, c, bias=False)
        self.ln_2 = nn.LayerNorm(c, bias=False)
        self.c_fc = nn.Linear(c, 4 * c, bias=False)
        self.mlp_proj = nn.Linear(4 * c, c, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, c = x.shape
        q, k, v = (z.view(b, t, self.n_head, c // self.n_head).transpose(1, 2) for z in self.c_attn(self.ln_1(x)).split(c, dim=2))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(b, t, c)
        x = x + self.attn_proj(y)
        return x + self.mlp_proj(F.gelu(self.c_fc(self.ln_2(x))))


class CharGPT(nn.Module):
    def __init__(self, vocab_size: int, r: Recipe):
        super().__init__()
        self.wte = nn.Embedding(vocab_size, r.n_embd)
        self.wpe = nn.Embedding(r.block_size, r.n_embd)
        self.blocks = nn.ModuleList(Block(r) for _ in range(r.n_layer))
        self.ln_f = nn.LayerNorm(r.n_embd, bias=False)
        self.head = nn.Linear(r.n_embd, vocab_size, bias=False)
        self.wte.weight = self.head.weight
        for name, p in self.named_parameters():
            if p.dim() >= 2:
                std = 0.02 / math.sqrt(2 * r.n_layer) if name.endswith("proj.weight") else 0.02
                nn.init.normal_(p, 0.0, std)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        x = self.wte(idx) + self.wpe(torch.arange(idx.shape[1]))
        for block in self.blocks:
            x = block(x)
        logits = self.head(self.ln_f(x))
        return F.cross_entropy(logits.flatten(0, 1), targets.flatten())


def train_char_recipe(text: str, *, seed: int = 1337, recipe: Recipe | None = None) -> dict:
    """Train nanoGPT's CPU char recipe on ``text``; returns val losses (full split, 20 batches) and wall time."""
    r = recipe or Recipe()
    torch.manual_seed(seed)
    chars = sorted(set(text))
    lookup = np.zeros(max(map(ord, chars)) + 1, dtype=np.int64)  # code point -> index in sorted chars
    lookup[[ord(c) for c in chars]] = np.arange(len(chars))
    data = torch.from_numpy(lookup[np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)])
    n_train = int(len(data) * 0.9)
    train, val = data[:n_train], data[n_train:]
    T, B = r.block_size, r.batch_size

    def get_batch(split: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        ix = torch.randint(len(split) - T, (B,))
        return torch.stack([split[i : i + T] for i in ix]), torch.stack([split[i + 1 : i + 1 + T] for i in ix])

    def lr_at(it: int) -> float:
        if it < r.warmup_iters:
            return r.lr * (it + 1) / (r.warmup_iters + 1)
        if it > r.lr_decay_iters:
            return r.min_lr
        ratio = (it - r.warmup_iters) / (r.lr_decay_iters - r.warmup_iters)
        return r.min_lr + 0.5 * (1 + math.cos(math.pi * ratio)) * (r.lr - r.min_lr)

    model = CharGPT(len(chars), r)
    params = list(model.parameters())
    optimizer = torch.optim.AdamW(
        [{"params": [p for p in params if p.dim() >= 2], "weight_decay": r.weight_decay},
         {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}],
        lr=r.lr, betas=(0.9, r.beta2),
    )
    start = time.perf_counter()
    for it in range(r.max_iters):
        for group in optimizer.param_groups:
            group["lr"] = lr_at(it)
        loss = model(*get_batch(train))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    wall = time.perf_counter() - start

    model.eval()
    with torch.no_grad():
        starts = torch.arange(0, len(val) - T, T)
        total = 0.0
        for chunk in starts.split(64):
            x = torch.stack([val[i : i + T] for i in chunk])
            y = torch.stack([val[i + 1 : i + 1 + T] for i in chunk])
            total += model(x, y).item() * len(chunk)
        val_full = total / len(starts)
        val_20 = torch.stack([model(*get_batch(val)) for _ in range(20)]).mean().item()
    return {"val_loss": val_full, "val_loss_20_batches": val_20, "train_s": wall}
