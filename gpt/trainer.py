"""One training loop for everything: pre-training (`gpt-train`) and fine-tuning (`gpt-finetune`).

How to reuse it::

    from gpt.trainer import Trainer, TrainConfig, init_distributed

    dist = init_distributed("auto")           # joins torchrun's process group if there is one
    trainer = Trainer(
        model,                                 # any nn.Module (the Trainer moves it to the device)
        TrainConfig(max_steps=500, batch_size=8, lr=1e-4, eval_interval=50),
        train_batch=lambda step, micro_step: (x, y),   # tensors (tuple/list/dict) for this rank
        eval_batches=lambda: iter(val_batches),        # this rank's evaluation batches
        loss_fn=my_loss,                       # loss_fn(model, batch) -> scalar loss (default: lm_loss)
        out_dir="runs/exp1",
        tokenizer=tokenizer,                   # written into every checkpoint
        save_extra=lambda d: (d / "labels.json").write_text(...),  # your own files in each checkpoint
        dist=dist,
    )
    result = trainer.fit(resume=False)         # resume=True continues the latest checkpoint exactly
    print(result.summary())

``trainer.prepare(resume)`` (called by ``fit``) checks the run directory and loads the checkpoint;
call it first to report a bad ``--out``/``--resume`` before printing anything.

The contract:

- ``train_batch(step, micro_step)`` returns the micro-batch ``micro_step`` (0 <= micro_step <
  grad_accum) of optimiser step ``step`` *for this rank*. Make it a pure function of its arguments
  (and your seed): then resuming at a step replays the same data with no sampler state to save,
  which is what makes resume exact. ``gpt.data.RandomWindows`` is the language-model one; for a
  dataset of examples, index a per-epoch permutation with
  ``(step * grad_accum + micro_step) * world_size + rank``.
- ``loss_fn(model, batch)`` gets the *wrapped* model (DDP and/or torch.compile) during training and
  the unwrapped-from-DDP one during evaluation, so it must call ``model(...)``; to use another
  method (e.g. ``hidden_states`` for a classification head), put the model and the head in one
  ``nn.Module`` whose ``forward`` does it. Return the mean loss of the batch; the Trainer divides by
  ``grad_accum``. Padding: use ``-100`` targets (ignored by ``F.cross_entropy``).
- ``eval_batches()`` yields this rank's evaluation batches; at most ``eval_iters`` are used. The
  validation loss is the token-weighted mean of ``loss_fn`` over them (``count_tokens(batch)``, by
  default the ``numel`` of the first tensor), reduced over ranks. ``extra_eval(model) -> dict``
  adds your own metrics (e.g. accuracy) to the evaluation record; pick the one that decides
  ``RUN_DIR/best/`` with ``TrainConfig.best_metric`` / ``best_mode``.
- Checkpoints: ``save_model(model, dir)`` writes the model files (default: the GPT checkpoint format
  via ``gpt.checkpoint.write_checkpoint`` with ``tokenizer``/``generation``) and
  ``load_model(model, dir)`` restores them on resume (default: ``type(model).from_pretrained``);
  ``save_extra(dir)`` adds your files. The Trainer adds ``trainer_state.json`` (step, tokens seen,
  best metric, scaler, python/numpy RNG states), ``optimizer.safetensors`` (AdamW moments keyed by
  parameter name; hyper-parameters in the JSON) and ``rng.safetensors`` (torch CPU/CUDA generator
  states of every rank). No pickle.

Run directory: ``metrics.jsonl`` (one JSON object per line: training lines ``step, loss, lr,
grad_norm, tokens_per_s, tokens``; evaluation lines ``step, val_loss, val_ppl[, val_bpb, sample]``),
``loss.png``, ``checkpoints/step-NNNNNN/`` (the last ``keep_last``), ``best/`` and ``final/``.
SIGINT/SIGTERM finish the current step, write a checkpoint and return (``result.interrupted``); a
second Ctrl-C aborts at once. A non-finite loss raises ``TrainingDiverged`` before anything is
written for that step, so the last good checkpoint stays the newest one.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import json
import math
import os
import random
import re
import shutil
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np
import torch
import torch.distributed as torch_dist
import torch.nn as nn
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from gpt.checkpoint import DTYPES
from tools.fileio import atomic_directory, atomic_write

STATE_FORMAT = "gpt-trainer-state"
STATE_VERSION = 1
STATE_FILE = "trainer_state.json"
OPTIMIZER_FILE = "optimizer.safetensors"
RNG_FILE = "rng.safetensors"
METRICS_FILE = "metrics.jsonl"
PLOT_FILE = "loss.png"
RUN_CONFIG_FILE = "run_config.json"
_STEP_DIR = re.compile(r"^step-(\d{6,})$")


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
        """ValueError naming the first bad option (as its --flag)."""
        def positive(name, allow_zero=False):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < (0 if allow_zero else 1):
                raise ValueError(f"--{name.replace('_', '-')} must be an integer >= {0 if allow_zero else 1}, got {v!r}")

        for name in ("max_steps", "batch_size", "grad_accum", "eval_interval", "log_interval", "keep_last"):
            positive(name)
        positive("warmup_steps", allow_zero=True)
        for name in ("eval_iters", "checkpoint_interval", "lr_decay_steps"):
            if getattr(self, name) is not None:
                positive(name)
        if not self.lr > 0:
            raise ValueError(f"--lr must be > 0, got {self.lr}")
        if self.min_lr is not None and not 0 <= self.min_lr <= self.lr:
            raise ValueError(f"--min-lr must be between 0 and --lr ({self.lr}), got {self.min_lr}")
        if self.weight_decay < 0 or self.grad_clip < 0:
            raise ValueError("--weight-decay and --grad-clip must be >= 0")
        if not (0 <= self.beta1 < 1 and 0 <= self.beta2 < 1):
            raise ValueError(f"--beta1/--beta2 must be in [0, 1), got {self.beta1}, {self.beta2}")
        if self.dtype not in ("auto", *DTYPES):
            raise ValueError(f"--dtype must be one of auto, {', '.join(DTYPES)}, got {self.dtype!r}")
        if self.best_mode not in ("min", "max"):
            raise ValueError(f"best_mode must be 'min' or 'max', got {self.best_mode!r}")

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


def lm_loss(model: nn.Module, batch) -> torch.Tensor:
    """Next-token cross-entropy of a GPT on an ``(inputs, targets)`` batch."""
    x, y = batch
    _, loss = model(x, targets=y)
    return loss


def count_first_tensor(batch) -> int:
    """Tokens in a batch: the number of elements of its first tensor (the input ids)."""
    if isinstance(batch, dict):
        batch = list(batch.values())
    return (batch[0] if isinstance(batch, (tuple, list)) else batch).numel()


def to_device(batch, device: torch.device):
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {k: to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (tuple, list)):
        return type(batch)(to_device(v, device) for v in batch)
    return batch


# ---------------------------------------------------------------------------------------------- devices, DDP


@dataclass(frozen=True)
class Dist:
    """This process's place in a torchrun job (a single process is rank 0 of 1)."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    device: str = "cpu"

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def resolve_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {device}: CUDA is not available here; use --device cpu")
    if device != "cpu" and not device.startswith("cuda"):
        raise ValueError(f"--device must be auto, cpu, cuda or cuda:N, got {device!r}")
    return device


def init_distributed(device: str = "auto") -> Dist:
    """Join the process group that ``torchrun`` describes in the environment (NCCL on CUDA, gloo
    on CPU); without torchrun, a single process. Each rank gets its own GPU (``cuda:LOCAL_RANK``)."""
    device = resolve_device(device)
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return Dist(device=device)
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if device.startswith("cuda"):
        device = f"cuda:{local_rank}"
        torch.cuda.set_device(device)
    if not torch_dist.is_initialized():
        torch_dist.init_process_group(backend="nccl" if device.startswith("cuda") else "gloo")
    return Dist(rank=rank, local_rank=local_rank, world_size=world_size, device=device)


def resolve_dtype(dtype: str, device: str) -> torch.dtype:
    if dtype == "auto":
        if device.startswith("cuda"):
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    if dtype == "float16" and not device.startswith("cuda"):
        raise ValueError("--dtype float16 needs CUDA (a GradScaler); use bfloat16 or float32 on the CPU")
    return DTYPES[dtype]


def available_memory_bytes() -> int | None:
    """Memory the OS can give without swapping (Linux ``MemAvailable``); None where unknown."""
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def micro_batch_bytes(n_layer: int, n_embd: int, vocab_size: int, batch_size: int, block_size: int, dtype: torch.dtype) -> int:
    """A lower bound of the memory one language-model training micro-batch takes beyond the weights:
    per token, the windows (int64 inputs and targets), 14 x n_embd activations per layer kept for the
    backward pass (LayerNorm inputs and outputs, q/k/v, attention output, the 4x MLP before and after
    GELU) and the fp32 logits with their log-softmax. A lower bound (autograd keeps a little more, and
    the backward pass adds gradients), so it never refuses a batch that would fit."""
    tokens = batch_size * block_size
    activation_size = 2 if dtype in (torch.bfloat16, torch.float16) else 4
    return tokens * (16 + n_layer * 14 * n_embd * activation_size + 2 * vocab_size * 4)


def check_micro_batch_fits(n_layer: int, n_embd: int, vocab_size: int, batch_size: int, block_size: int, device: str,
                           dtype: str, length_flag: str = "--block-size") -> str | None:
    """On a CPU, refuse before training a micro-batch that cannot fit in the available memory: there
    the OS kills the process (or swaps for hours) instead of raising an out-of-memory error. CUDA
    raises one cleanly, which the Trainer turns into the same advice, so there this checks nothing.
    Returns a warning to print when the lower bound already takes more than half the available
    memory (the real peak is higher). ``device`` and ``dtype`` are the option values (may be auto)."""
    device = resolve_device(device)
    available = available_memory_bytes()
    if device.startswith("cuda") or available is None:
        return None
    need = micro_batch_bytes(n_layer, n_embd, vocab_size, batch_size, block_size, resolve_dtype(dtype, device))
    sizes = f"a micro-batch of --batch-size {batch_size} x {length_flag} {block_size} needs at least {need / 2**30:,.1f} GiB"
    advice = f"lower --batch-size (raise --grad-accum to keep the batch) or {length_flag}"
    if need > available:
        raise ValueError(f"{sizes} but {available / 2**30:,.1f} GiB of memory is available; {advice}")
    if need > available / 2:
        return f"{sizes} of the {available / 2**30:,.1f} GiB available; if the process is killed, {advice}"
    return None


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


# ---------------------------------------------------------------------------------------------- state files


def optimizer_state(opt: torch.optim.Optimizer, names: dict[nn.Parameter, str]) -> tuple[dict, dict]:
    """AdamW state as (tensors for safetensors, JSON): moments keyed ``name/exp_avg`` etc."""
    ordered = [names[p] for g in opt.param_groups for p in g["params"]]
    sd = opt.state_dict()
    tensors, scalars = {}, {}
    for index, state in sd["state"].items():
        for key, value in state.items():
            if torch.is_tensor(value):
                tensors[f"{ordered[index]}/{key}"] = value.detach().contiguous().cpu()
            else:
                scalars[f"{ordered[index]}/{key}"] = value
    groups = [{**{k: v for k, v in g.items() if k != "params"}, "params": [ordered[i] for i in g["params"]]} for g in sd["param_groups"]]
    return tensors, {"param_groups": groups, "scalars": scalars}


def load_optimizer_state(opt: torch.optim.Optimizer, names: dict[nn.Parameter, str], tensors: dict, meta: dict, where: str) -> None:
    ordered = [names[p] for g in opt.param_groups for p in g["params"]]
    saved = [n for g in meta["param_groups"] for n in g["params"]]
    if saved != ordered:
        raise ValueError(f"{where}: the optimizer state is for other parameters than this model's (a foreign run?)")
    index = {n: i for i, n in enumerate(ordered)}
    state: dict[int, dict] = {}
    for key, value in itertools.chain(tensors.items(), meta["scalars"].items()):
        name, _, field = key.rpartition("/")
        state.setdefault(index[name], {})[field] = value
    groups = [{**g, "params": [index[n] for n in g["params"]]} for g in meta["param_groups"]]
    opt.load_state_dict({"state": state, "param_groups": groups})


def local_rng_state() -> tuple[dict[str, torch.Tensor], dict]:
    tensors = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        tensors["torch_cuda"] = torch.cuda.get_rng_state()
    version, state, gauss = random.getstate()
    np_state = np.random.get_state()
    return tensors, {
        "python": [version, list(state), gauss],
        "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
    }


def set_local_rng_state(tensors: dict[str, torch.Tensor], states: dict) -> None:
    torch.set_rng_state(tensors["torch_cpu"])
    if "torch_cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors["torch_cuda"])
    version, state, gauss = states["python"]
    random.setstate((version, tuple(state), gauss))
    name, keys, pos, has_gauss, cached = states["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))


def checkpoint_dirs(out_dir: Path) -> list[tuple[int, Path]]:
    """RUN_DIR/checkpoints/step-NNNNNN directories, oldest first."""
    root = out_dir / "checkpoints"
    found = []
    if root.is_dir():
        for d in root.iterdir():
            m = _STEP_DIR.match(d.name)
            if m and d.is_dir():
                found.append((int(m.group(1)), d))
    return sorted(found)


class TrainingDiverged(RuntimeError):
    """The loss (or the gradient norm) became NaN/inf; nothing was written for that step."""


@dataclass
class TrainResult:
    step: int
    tokens: int
    wall_s: float
    interrupted: bool
    stop_signal: int | None  # the signal that interrupted the run (SIGINT/SIGTERM), if one did
    last_eval: dict | None
    best: dict | None  # {"step", best_metric, "dir"}
    final_dir: Path | None
    checkpoint_dir: Path | None

    def summary(self) -> str:
        lines = [f"{'interrupted' if self.interrupted else 'finished'} at step {self.step}: "
                 f"{self.tokens:,} tokens in {self.wall_s:.0f}s ({self.tokens / max(self.wall_s, 1e-9):,.0f} tok/s)"]
        if self.last_eval:
            lines.append("last eval: " + ", ".join(f"{k} {v:.4f}" for k, v in self.last_eval.items() if k.startswith("val_") and isinstance(v, float)))
        if self.best:
            lines.append(f"best: {self.best['metric']} {self.best['value']:.4f} at step {self.best['step']} -> {self.best['dir']}")
        if self.final_dir:
            lines.append(f"final model: {self.final_dir}")
        if self.checkpoint_dir:
            lines.append(f"latest checkpoint: {self.checkpoint_dir}")
        return "\n".join(lines)


# ---------------------------------------------------------------------------------------------- the trainer


class Trainer:
    def __init__(
        self,
        model: nn.Module,
        config: TrainConfig,
        train_batch: Callable[[int, int], Any],
        eval_batches: Callable[[], Iterable[Any]] | None = None,
        *,
        out_dir: str | Path,
        loss_fn: Callable[[nn.Module, Any], torch.Tensor] = lm_loss,
        tokenizer=None,
        generation: dict | None = None,
        save_model: Callable[[nn.Module, Path], None] | None = None,
        load_model: Callable[[nn.Module, Path], None] | None = None,
        save_extra: Callable[[Path], None] | None = None,
        sample_fn: Callable[[nn.Module], str] | None = None,
        extra_eval: Callable[[nn.Module], dict] | None = None,
        bytes_per_token: float | None = None,
        count_tokens: Callable[[Any], int] = count_first_tensor,
        run_config: dict | None = None,
        dist: Dist | None = None,
    ):
        config.validate()
        self.config = cfg = config
        self.dist = dist or Dist(device=resolve_device(cfg.device))
        self.device = torch.device(self.dist.device)
        self.dtype = resolve_dtype(cfg.dtype, self.dist.device)
        self.out_dir = Path(out_dir)
        self.train_batch, self.eval_batches, self.loss_fn = train_batch, eval_batches, loss_fn
        self.tokenizer, self.generation = tokenizer, generation
        self.save_model = save_model or self._write_gpt_checkpoint
        self.load_model = load_model or self._read_gpt_checkpoint
        self.save_extra, self.sample_fn, self.extra_eval = save_extra, sample_fn, extra_eval
        self.bytes_per_token, self.count_tokens, self.run_config = bytes_per_token, count_tokens, run_config

        self.model = model.to(self.device)
        self.model.train()
        self.param_names = {p: n for n, p in self.model.named_parameters()}
        self.optimizer = build_optimizer(self.model, cfg, self.dist.device)
        self.scaler = torch.amp.GradScaler("cuda") if self.dtype == torch.float16 else None
        self.autocast = (
            torch.autocast(self.device.type, dtype=self.dtype) if self.dtype != torch.float32 else contextlib.nullcontext()
        )
        self.compiled = torch.compile(self.model) if cfg.compile else self.model
        self.wrapped: nn.Module = self.compiled
        if self.dist.enabled:
            from torch.nn.parallel import DistributedDataParallel

            ids = [self.device.index] if self.device.type == "cuda" else None
            self.wrapped = DistributedDataParallel(self.compiled, device_ids=ids)

        self.step = 0
        self.tokens = 0
        self.best: dict | None = None
        self.last_eval: dict | None = None
        self._stop_signal: int | None = None  # set by our signal handler (this process)
        self.stop_requested = False  # agreed by all ranks after each step
        self._prepared: tuple[Path | None] | None = None

    # -- model files (the GPT defaults)

    def _write_gpt_checkpoint(self, model: nn.Module, directory: Path) -> None:
        from gpt.checkpoint import write_checkpoint

        write_checkpoint(directory, model, self.tokenizer if self.tokenizer is not None else getattr(model, "tokenizer", None), self.generation)

    def _read_gpt_checkpoint(self, model: nn.Module, directory: Path) -> None:
        loaded = type(model).from_pretrained(directory, device=str(self.device))
        model.load_state_dict(loaded.state_dict())

    # -- helpers

    def _all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        if self.dist.enabled:
            torch_dist.all_reduce(t)
        return t

    def _log(self, record: dict) -> None:
        if self.dist.is_main:
            with open(self.out_dir / METRICS_FILE, "a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")

    def _handle_signal(self, signum, frame) -> None:
        if self._stop_signal is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C: stop now
        self._stop_signal = signum
        if self.dist.is_main:
            tqdm.write(f"{signal.Signals(signum).name}: finishing step {self.step + 1}, then writing a checkpoint (Ctrl-C again to abort)")

    def _out_of_memory(self, e: BaseException) -> ValueError:
        cfg = self.config
        return ValueError(
            f"a micro-batch of --batch-size {cfg.batch_size} does not fit in memory on {self.device} ({str(e).splitlines()[0][:120]}); "
            "lower --batch-size (raise --grad-accum to keep the batch) or --block-size")

    # -- one optimiser step

    def train_step(self) -> dict:
        cfg = self.config
        lr = lr_at(self.step, cfg)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        loss_sum = torch.zeros((), device=self.device)
        tokens = 0
        for micro in range(cfg.grad_accum):
            batch = to_device(self.train_batch(self.step, micro), self.device)
            tokens += self.count_tokens(batch)
            # DDP: all-reduce gradients only on the last micro-step of the accumulation.
            sync = self.wrapped.no_sync() if self.dist.enabled and micro < cfg.grad_accum - 1 else contextlib.nullcontext()
            with sync:
                with self.autocast:
                    loss = self.loss_fn(self.wrapped, batch)
                loss_sum += loss.detach().float()
                scaled = loss / cfg.grad_accum
                (self.scaler.scale(scaled) if self.scaler else scaled).backward()
        # One all-reduce for the logged loss and the stop flag (a signal on any rank stops all).
        stats = self._all_reduce(torch.stack([loss_sum / cfg.grad_accum, torch.tensor(float(self._stop_signal is not None), device=self.device)]))
        loss_value = stats[0].item() / self.dist.world_size
        if not math.isfinite(loss_value):
            raise TrainingDiverged(f"non-finite loss ({loss_value}) at step {self.step + 1}")
        if self.scaler:
            self.scaler.unscale_(self.optimizer)
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip if cfg.grad_clip > 0 else float("inf"))
        grad_norm = grad_norm.item()
        if self.scaler:  # fp16: an inf gradient norm means "skip this step and lower the scale"
            self.scaler.step(self.optimizer)
            self.scaler.update()
        elif not math.isfinite(grad_norm):
            raise TrainingDiverged(f"non-finite gradient norm ({grad_norm}) at step {self.step + 1}")
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        self.tokens += tokens * self.dist.world_size
        self.stop_requested = stats[1].item() > 0
        return {"step": self.step, "loss": loss_value, "lr": lr, "grad_norm": grad_norm}

    # -- evaluation

    @torch.no_grad()
    def evaluate(self) -> dict:
        cfg = self.config
        record: dict[str, Any] = {"step": self.step}
        model = self.compiled  # not the DDP wrapper: ranks may have different numbers of batches
        model.eval()
        try:
            if self.eval_batches is not None:
                total = torch.zeros(2, dtype=torch.float64, device=self.device)
                for batch in itertools.islice(self.eval_batches(), cfg.eval_iters):
                    batch = to_device(batch, self.device)
                    with self.autocast:
                        loss = self.loss_fn(model, batch)
                    n = self.count_tokens(batch)
                    total += torch.stack([loss.double() * n, torch.tensor(float(n), dtype=torch.float64, device=self.device)])
                total = self._all_reduce(total)
                if total[1] > 0:
                    val_loss = (total[0] / total[1]).item()
                    record["val_loss"] = val_loss
                    record["val_ppl"] = math.exp(val_loss) if val_loss < 700 else math.inf
                    if self.bytes_per_token:
                        record["val_bpb"] = val_loss / math.log(2) / self.bytes_per_token
            if self.extra_eval is not None:
                record.update(self.extra_eval(model))
            if self.sample_fn is not None and self.dist.is_main:
                record["sample"] = self.sample_fn(self.model)
        finally:
            model.train()
        return record

    # -- checkpoints

    def _state(self) -> tuple[dict, dict, dict]:
        """(trainer_state JSON, optimizer tensors, rng tensors); collective under DDP."""
        opt_tensors, opt_meta = optimizer_state(self.optimizer, self.param_names)
        rng_tensors, rng_json = local_rng_state()
        per_rank = [(rng_tensors, rng_json)]
        if self.dist.enabled:  # every rank's generators, so that dropout resumes exactly everywhere
            per_rank = [None] * self.dist.world_size
            torch_dist.all_gather_object(per_rank, (rng_tensors, rng_json))
        state = {
            "format": STATE_FORMAT,
            "version": STATE_VERSION,
            "step": self.step,
            "tokens": self.tokens,
            "world_size": self.dist.world_size,
            "best": self.best,
            "last_eval": self.last_eval,
            "train_config": self.config.to_dict(),
            "optimizer": opt_meta,
            "scaler": self.scaler.state_dict() if self.scaler else None,
            "rng": [j for _, j in per_rank],
        }
        rng = {f"rank{r}/{k}": v.contiguous() for r, (t, _) in enumerate(per_rank) for k, v in t.items()}
        return state, opt_tensors, rng

    def _write_model_dir(self, directory: Path, state=None) -> None:
        with atomic_directory(directory) as tmp:
            self.save_model(self.model, tmp)
            if self.save_extra is not None:
                self.save_extra(tmp)
            if state is not None:
                meta, opt_tensors, rng = state
                save_file(opt_tensors, str(tmp / OPTIMIZER_FILE))
                save_file(rng, str(tmp / RNG_FILE))
                (tmp / STATE_FILE).write_text(json.dumps(meta, indent=1) + "\n", encoding="utf-8")

    def save_checkpoint(self) -> Path:
        """RUN_DIR/checkpoints/step-NNNNNN/ (model + trainer state), keeping the last ``keep_last``."""
        state = self._state()
        path = self.out_dir / "checkpoints" / f"step-{self.step:06d}"
        if self.dist.is_main:
            self._write_model_dir(path, state)
            for _, old in checkpoint_dirs(self.out_dir)[: -self.config.keep_last]:
                shutil.rmtree(old, ignore_errors=True)
        return path

    def load_checkpoint(self, path: Path) -> None:
        where = str(path)
        try:
            meta = json.loads((path / STATE_FILE).read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValueError(f"{path / STATE_FILE}: unreadable trainer state ({e}); the run directory is corrupt") from None
        if not isinstance(meta, dict) or meta.get("format") != STATE_FORMAT or meta.get("version") != STATE_VERSION:
            raise ValueError(f"{path / STATE_FILE}: not a {STATE_FORMAT} v{STATE_VERSION} file; the run directory is corrupt or from another program")
        try:
            opt_tensors = load_file(str(path / OPTIMIZER_FILE), device=str(self.device))
            rng = load_file(str(path / RNG_FILE))
        except Exception as e:  # safetensors raises its own error types
            raise ValueError(f"{path}: unreadable optimizer/RNG state ({type(e).__name__}: {e}); the run directory is corrupt") from None
        try:
            self.load_model(self.model, path)
        except RuntimeError as e:  # load_state_dict: missing keys or shape mismatch
            raise ValueError(f"{path}: the checkpoint's weights do not fit this model ({str(e).splitlines()[0]})") from None
        try:
            load_optimizer_state(self.optimizer, self.param_names, opt_tensors, meta["optimizer"], where)
            if self.scaler and meta.get("scaler"):
                self.scaler.load_state_dict(meta["scaler"])
            self.step, self.tokens = int(meta["step"]), int(meta["tokens"])
            self.best, self.last_eval = meta.get("best"), meta.get("last_eval")
            rank = self.dist.rank
            if meta["world_size"] == self.dist.world_size:
                tensors = {k.split("/", 1)[1]: v for k, v in rng.items() if k.startswith(f"rank{rank}/")}
                set_local_rng_state(tensors, meta["rng"][rank])
            else:  # a different number of processes: continue, but not bit-exactly
                if self.dist.is_main:
                    tqdm.write(f"note: resuming a {meta['world_size']}-process run with {self.dist.world_size}; random streams are re-seeded")
                torch.manual_seed(self.config.seed + 1000 * self.step + rank)
        except (KeyError, TypeError, IndexError) as e:
            raise ValueError(f"{path / STATE_FILE}: malformed trainer state ({type(e).__name__}: {e}); the run directory is corrupt") from None

    def prepare(self, resume: bool = False) -> Path | None:
        """Check the run directory; on resume load the latest checkpoint and return its path.
        ``fit`` calls it; call it first yourself to report a bad run directory before anything else."""
        if self._prepared is not None:
            return self._prepared[0]
        path = self._prepare_run_dir(resume)
        self._prepared = (path,)
        return path

    def _prepare_run_dir(self, resume: bool) -> Path | None:
        if not resume:
            if checkpoint_dirs(self.out_dir) or (self.out_dir / METRICS_FILE).exists():
                raise ValueError(f"--out {self.out_dir} already holds a run; continue it with --resume {self.out_dir} or choose another --out")
            return None
        found = checkpoint_dirs(self.out_dir)
        if not found:
            raise ValueError(f"--resume {self.out_dir}: no checkpoints/step-NNNNNN/ there to resume from")
        path = found[-1][1]
        self.load_checkpoint(path)
        return path

    def _truncate_metrics(self) -> None:
        """Drop metrics logged after the checkpoint we resume from (a crash can leave some)."""
        path = self.out_dir / METRICS_FILE
        if not path.exists():
            return
        keep = []
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                if json.loads(line).get("step", 0) <= self.step:
                    keep.append(line)
            except (json.JSONDecodeError, AttributeError):  # a line cut short by a crash
                continue
        with atomic_write(path) as f:
            f.write("".join(line + "\n" for line in keep))

    # -- the loop

    def fit(self, resume: bool = False) -> TrainResult:
        cfg = self.config
        checkpoint = self.prepare(resume)
        if checkpoint is None:  # a fresh run: each rank its own dropout stream, all reproducible
            torch.manual_seed(cfg.seed + self.dist.rank)
            random.seed(cfg.seed + self.dist.rank)
            np.random.seed(cfg.seed + self.dist.rank)
        if self.dist.is_main:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            if resume:
                self._truncate_metrics()
            if self.run_config is not None:
                with atomic_write(self.out_dir / RUN_CONFIG_FILE) as f:
                    json.dump(self.run_config, f, indent=2)
                    f.write("\n")
        checkpoint_interval = cfg.checkpoint_interval or cfg.eval_interval
        restore = []
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                restore.append((sig, signal.signal(sig, self._handle_signal)))
        bar = tqdm(total=cfg.max_steps, initial=self.step, desc="train", unit="step", dynamic_ncols=True,
                   disable=not (cfg.progress and self.dist.is_main))
        start, window_start, window_tokens = time.perf_counter(), time.perf_counter(), self.tokens
        start_tokens = self.tokens
        saved_at = self.step if checkpoint else -1
        try:
            while self.step < cfg.max_steps and not self.stop_requested:
                try:
                    record = self.train_step()
                except torch.OutOfMemoryError as e:
                    raise self._out_of_memory(e) from None
                except RuntimeError as e:
                    if "can't allocate memory" in str(e) or "out of memory" in str(e):
                        raise self._out_of_memory(e) from None
                    raise
                now = time.perf_counter()
                tok_s = (self.tokens - window_tokens) / max(now - window_start, 1e-9)
                bar.update(1)
                bar.set_postfix(loss=f"{record['loss']:.4f}", tok_s=f"{tok_s:,.0f}", lr=f"{record['lr']:.2e}", refresh=False)
                done = self.step == cfg.max_steps or self.stop_requested
                if self.step % cfg.log_interval == 0 or done:
                    self._log({**record, "tokens_per_s": round(tok_s, 1), "tokens": self.tokens, "elapsed_s": round(now - start, 3)})
                    window_start, window_tokens = now, self.tokens
                if self.step % cfg.eval_interval == 0 or self.step == cfg.max_steps:
                    self._evaluate_and_log(bar)
                if self.step % checkpoint_interval == 0 or done:
                    self.save_checkpoint()
                    saved_at = self.step
        finally:
            bar.close()
            for sig, handler in restore:
                signal.signal(sig, handler)
        interrupted = self.stop_requested and self.step < cfg.max_steps
        final_dir = None
        if not interrupted:
            final_dir = self.out_dir / "final"
            if self.dist.is_main:
                self._write_model_dir(final_dir)
        return TrainResult(
            step=self.step, tokens=self.tokens - start_tokens, wall_s=time.perf_counter() - start, interrupted=interrupted,
            stop_signal=self._stop_signal if interrupted else None, last_eval=self.last_eval, best=self.best, final_dir=final_dir,
            checkpoint_dir=self.out_dir / "checkpoints" / f"step-{saved_at:06d}" if saved_at >= 0 else None)

    def _evaluate_and_log(self, bar) -> None:
        cfg = self.config
        record = self.evaluate()
        self.last_eval = {k: v for k, v in record.items() if k != "sample"}
        value = record.get(cfg.best_metric)
        better = value is not None and (
            self.best is None or (value < self.best["value"] if cfg.best_mode == "min" else value > self.best["value"]))
        if better:
            self.best = {"metric": cfg.best_metric, "value": value, "step": self.step, "dir": str(self.out_dir / "best")}
        if not self.dist.is_main:
            return
        self._log(record)
        shown = ", ".join(f"{k} {v:.4f}" for k, v in record.items() if k not in ("step", "sample") and isinstance(v, (int, float)))
        bar.write(f"step {self.step}: {shown}")
        if "sample" in record:
            bar.write("sample: " + record["sample"].strip()[:500])
        if better:
            self._write_model_dir(self.out_dir / "best")
        plot_metrics(self.out_dir / METRICS_FILE, self.out_dir / PLOT_FILE)


def plot_metrics(metrics_path: Path, png_path: Path) -> None:
    """The loss curve (training loss and validation loss against step) as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train, val = [], []
    for line in metrics_path.read_text(encoding="utf-8").splitlines():
        r = json.loads(line)
        if "loss" in r:
            train.append((r["step"], r["loss"]))
        if "val_loss" in r:
            val.append((r["step"], r["val_loss"]))
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    if train:
        ax.plot(*zip(*train), label="train loss", linewidth=1, alpha=0.8)
    if val:
        ax.plot(*zip(*val), "o-", label="val loss", markersize=3)
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    with atomic_write(png_path, "wb") as f:
        fig.savefig(f, format="png")
    plt.close(fig)
