"""One training loop for everything: pre-training (`gpt-train`) and fine-tuning (`gpt-finetune`).

    dist = gpt.device.init_distributed("auto")   # joins torchrun's process group if there is one
    trainer = Trainer(model, TrainConfig(max_steps=500, batch_size=8, lr=1e-4, eval_interval=50),
                      train_batch=lambda step, micro_step: (x, y),  # this rank's micro-batch (tensors)
                      eval_batches=lambda: iter(val_batches),       # this rank's evaluation batches
                      loss_fn=my_loss,                              # (model, batch) -> loss; default lm_loss
                      out_dir="runs/exp1", tokenizer=tokenizer, dist=dist)
    result = trainer.fit(resume=False)   # resume=True continues the newest intact checkpoint exactly

``prepare(resume)`` (called by ``fit``) opens the run directory (``gpt.run_state.RunDirectory``: one
writer at a time, a killed writer's leftovers removed) and loads the checkpoint; call it first to report
a bad run directory before printing anything. The contract:

- ``train_batch(step, micro_step)`` is micro-batch ``micro_step`` (< grad_accum) of step ``step`` for
  this rank, a pure function of its arguments (and your seed): then resuming replays the same data with
  no sampler state to save. ``gpt.data.RandomWindows`` is the language-model one; for a dataset of
  examples see ``gpt.finetune_data.ShuffledBatches``.
- ``loss_fn(model, batch)`` gets the *wrapped* model (DDP and/or torch.compile) in training and the
  unwrapped one in evaluation, so it must call ``model(...)`` (put a model and a head in one module
  whose ``forward`` does the work). It returns the batch's mean loss; ``-100`` targets are padding.
- ``eval_batches()`` yields evaluation batches, at most ``eval_iters``; the validation loss is their
  token-weighted mean (``count_tokens(batch)``), reduced over ranks. ``extra_eval(model) -> dict`` adds
  metrics; ``TrainConfig.best_metric``/``best_mode`` pick the one that decides ``RUN_DIR/best/``.
- ``save_model(model, dir)``/``load_model(model, dir)`` write and restore the model files (default:
  the GPT checkpoint format with ``tokenizer``/``generation``), ``save_extra(dir)`` adds yours; the
  Trainer adds its own state to step checkpoints (``gpt.run_state``; no pickle).

``metrics.jsonl`` has one JSON object per line: training lines ``step, loss, lr, grad_norm,
tokens_per_s, tokens, elapsed_s``; evaluation lines ``step, val_loss, val_ppl[, val_bpb, sample]``,
also logged (``logging``, logger ``gpt.trainer``). SIGINT/SIGTERM stop the run at the next
micro-batch (a step cut short is dropped, its random draws undone; with DDP the ranks finish the step
together), write a checkpoint of the last whole step and return (``result.interrupted``); a second
signal stops at once. A non-finite loss raises ``TrainingDiverged`` before anything is written for
that step, so the last good checkpoint stays the newest one.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import math
import random
import shutil
import signal
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np
import torch
import torch.distributed as torch_dist
import torch.nn as nn
from tqdm import tqdm

from gpt.checkpoint import write_checkpoint
from gpt.device import Dist, compile_failures_named, resolve_device, resolve_dtype, to_device
from gpt.memory import SMALLER_BATCH_ADVICE
from gpt.plot import plot_metrics
from gpt.run_state import (
    BEST_DIR, FINAL_DIR, METRICS_FILE, PLOT_FILE, STATE_FILE, STATE_FORMAT, STATE_VERSION, append_metrics, checkpoint_dirs, holds_run,
    load_optimizer_state, local_rng_state, optimizer_state, read_train_state, restore_rng, rng_snapshot, RunDirectory,
    set_local_rng_state, step_dir, TrainResult, truncate_metrics, write_train_state
)
from gpt.train_config import TrainConfig, build_optimizer, lr_at
from tokenizers_bpe.errors import SettingError
from tokenizers_bpe.fileio import format_stamp

log = logging.getLogger(__name__)


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


class CorruptCheckpoint(ValueError):
    """A step checkpoint whose files are missing, unreadable or malformed (resume skips it)."""


class TrainingDiverged(RuntimeError):
    """The loss (or the gradient norm) became NaN/inf; nothing was written for that step."""


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
        self.run_dir = RunDirectory(self.out_dir)
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
            append_metrics(self.out_dir, record)

    def _handle_signal(self, signum, frame) -> None:
        if self._stop_signal is not None:
            raise KeyboardInterrupt  # a second Ctrl-C or SIGTERM: stop now (a long step is not waited for)
        self._stop_signal = signum
        if self.dist.is_main:
            log.info(f"{signal.Signals(signum).name}: stopping after this micro-batch and checkpointing the last whole step "
                     "(Ctrl-C again to stop at once)")

    def _out_of_memory(self, e: BaseException) -> SettingError:
        return SettingError("batch_size", f"a micro-batch of {{batch_size}} {self.config.batch_size} does not fit in memory on "
                                          f"{self.device} ({str(e).splitlines()[0][:120]}); {SMALLER_BATCH_ADVICE}")

    # -- one optimiser step

    def train_step(self) -> dict | None:
        """One optimiser step; None when a signal cut it short (one process only: its gradients are
        dropped and its random draws undone, so the run resumes exactly at this step)."""
        cfg = self.config
        lr = lr_at(self.step, cfg)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        loss_sum = torch.zeros((), device=self.device)
        tokens = 0
        rng_at_start = rng_snapshot() if cfg.grad_accum > 1 and not self.dist.enabled else None
        for micro in range(cfg.grad_accum):
            if micro and rng_at_start is not None and self._stop_signal is not None:
                self.optimizer.zero_grad(set_to_none=True)
                restore_rng(rng_at_start)
                self.stop_requested = True
                return None
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
            **format_stamp(STATE_FORMAT, STATE_VERSION),
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
        def write(tmp: Path) -> None:
            self.save_model(self.model, tmp)
            if self.save_extra is not None:
                self.save_extra(tmp)
            if state is not None:
                write_train_state(tmp, *state)

        tensors = [*self.model.state_dict().values(), *(state[1].values() if state else ())]
        self.run_dir.write_checkpoint(directory, write, sum(t.numel() * t.element_size() for t in tensors))

    def save_checkpoint(self) -> Path:
        """RUN_DIR/checkpoints/step-NNNNNN/ (model + trainer state), keeping the last ``keep_last``."""
        state = self._state()
        path = step_dir(self.out_dir, self.step)
        if self.dist.is_main:
            self._write_model_dir(path, state)
            for _, old in checkpoint_dirs(self.out_dir)[: -self.config.keep_last]:
                shutil.rmtree(old, ignore_errors=True)
        return path

    def load_checkpoint(self, path: Path) -> None:
        """Restore model, optimizer, counters and RNG streams from a step checkpoint. A checkpoint whose
        files are damaged is a CorruptCheckpoint; one of another model a ValueError."""
        try:
            meta, opt_tensors, rng = read_train_state(path, self.device)
            self.load_model(self.model, path)
        except RuntimeError as e:  # load_state_dict: missing keys or shape mismatch
            raise ValueError(f"{path}: the checkpoint's weights do not fit this model ({str(e).splitlines()[0]})") from None
        except (ValueError, OSError) as e:
            raise CorruptCheckpoint(str(e)) from None
        try:
            load_optimizer_state(self.optimizer, self.param_names, opt_tensors, meta["optimizer"], str(path))
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
                    log.info(f"note: resuming a {meta['world_size']}-process run with {self.dist.world_size}; random streams are re-seeded")
                torch.manual_seed(self.config.seed + 1000 * self.step + rank)
        except (KeyError, TypeError, IndexError) as e:
            raise CorruptCheckpoint(f"{path / STATE_FILE}: malformed trainer state ({type(e).__name__}: {e})") from None

    def latest_checkpoint(self) -> Path | None:
        """The newest RUN_DIR/checkpoints/step-NNNNNN, if any."""
        found = checkpoint_dirs(self.out_dir)
        return found[-1][1] if found else None

    def prepare(self, resume: bool = False) -> Path | None:
        """Open the run directory (its lock: one writer at a time; a killed writer's leftovers removed);
        on resume load the newest intact checkpoint and return its path. ``fit`` calls it; call it first
        yourself to report a bad run directory before anything else."""
        if self._prepared is not None:
            return self._prepared[0]
        if self.dist.is_main:
            self.run_dir.open()
        try:
            path = self._prepare_run_dir(resume)
        except BaseException:
            self.run_dir.close()
            raise
        self._prepared = (path,)
        return path

    def _prepare_run_dir(self, resume: bool) -> Path | None:
        if not resume:
            if holds_run(self.out_dir):
                raise ValueError(f"{self.out_dir} already holds a run; resume it (fit(resume=True)) or choose another directory")
        else:
            initial = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
            corrupt = []
            for _, path in reversed(checkpoint_dirs(self.out_dir)):
                try:
                    self.load_checkpoint(path)
                except CorruptCheckpoint as e:
                    corrupt.append((path, str(e)))
                    continue
                self._set_aside(corrupt)
                return path
            if (self.out_dir / FINAL_DIR).is_dir():  # a finished run: starting it again would replace its model
                reasons = "; ".join(reason for _, reason in corrupt) or "none was written"
                raise ValueError(f"{self.out_dir}: no intact checkpoint to resume from ({reasons}); its model is in {FINAL_DIR}/")
            self._set_aside(corrupt)
            self.model.load_state_dict(initial)
            self.optimizer = build_optimizer(self.model, self.config, self.dist.device)
            self.step = self.tokens = 0
            self.best = self.last_eval = None
            log.warning(f"{self.out_dir}: no intact checkpoint to resume from; starting the run again from step 0")
        if self.dist.is_main:
            self.run_dir.restart()
        return None

    def _set_aside(self, corrupt: list[tuple[Path, str]]) -> None:
        if self.dist.is_main:
            for path, reason in corrupt:
                self.run_dir.set_aside(path, reason)

    # -- the loop

    def fit(self, resume: bool = False) -> TrainResult:
        """Train to ``max_steps`` (from the newest intact checkpoint with ``resume``); see the module docstring."""
        checkpoint = self.prepare(resume)
        try:
            with compile_failures_named():
                return self._fit(checkpoint)
        finally:
            self.run_dir.close()

    def _fit(self, checkpoint: Path | None) -> TrainResult:
        cfg = self.config
        if checkpoint is None:  # a fresh run: each rank its own dropout stream, all reproducible
            torch.manual_seed(cfg.seed + self.dist.rank)
            random.seed(cfg.seed + self.dist.rank)
            np.random.seed(cfg.seed + self.dist.rank)
        if self.dist.is_main:
            truncate_metrics(self.out_dir, self.step)
            if self.run_config is not None:
                self.run_dir.write_config(self.run_config)
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
                    if record is None:  # cut short by a signal: checkpoint the last whole step (below)
                        break
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
                    self._evaluate_and_log()
                if self.step % checkpoint_interval == 0 or done:
                    self.save_checkpoint()
                    saved_at = self.step
            if self.stop_requested and saved_at != self.step and self.step > 0:
                self.save_checkpoint()
                saved_at = self.step
        finally:
            bar.close()
            for sig, handler in restore:
                signal.signal(sig, handler)
        interrupted = self.stop_requested  # (at the last step too: the command ends as asked, resumable to final/)
        final_dir = None
        if not interrupted:
            final_dir = self.out_dir / FINAL_DIR
            if self.dist.is_main:
                self._write_model_dir(final_dir)
        return TrainResult(
            step=self.step, tokens=self.tokens - start_tokens, wall_s=time.perf_counter() - start, interrupted=interrupted,
            stop_signal=self._stop_signal if interrupted else None, last_eval=self.last_eval, best=self.best, final_dir=final_dir,
            checkpoint_dir=step_dir(self.out_dir, saved_at) if saved_at >= 0 else None)

    def _evaluate_and_log(self) -> None:
        cfg = self.config
        record = self.evaluate()
        self.last_eval = {k: v for k, v in record.items() if k != "sample"}
        value = record.get(cfg.best_metric)
        better = value is not None and (
            self.best is None or (value < self.best["value"] if cfg.best_mode == "min" else value > self.best["value"]))
        if better:
            self.best = {"metric": cfg.best_metric, "value": value, "step": self.step, "dir": str(self.out_dir / BEST_DIR)}
        if not self.dist.is_main:
            return
        self._log(record)
        shown = ", ".join(f"{k} {v:.4f}" for k, v in record.items() if k not in ("step", "sample") and isinstance(v, (int, float)))
        log.info(f"step {self.step}: {shown}")
        if "sample" in record:
            log.info("sample: " + record["sample"].strip()[:500])
        if better:
            self._write_model_dir(self.out_dir / BEST_DIR)
        plot_metrics(self.out_dir / METRICS_FILE, self.out_dir / PLOT_FILE)
