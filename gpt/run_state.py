"""What a run directory holds, and the trainer state its step checkpoints carry.

    RUN_DIR/metrics.jsonl          one JSON object per line (see gpt.trainer)
    RUN_DIR/loss.png               the loss curve (gpt.plot)
    RUN_DIR/run_config.json        the command's effective options, stamped {"format": "gpt-run", ...}
    RUN_DIR/checkpoints/step-NNNNNN/   a model checkpoint + STATE_FILE, OPTIMIZER_FILE, RNG_FILE
    RUN_DIR/best/, RUN_DIR/final/  model checkpoints (the best evaluation, the end of training)
    RUN_DIR/.lock                  while a process writes the run: which one (tokenizers_bpe.locks)

A run survives a kill at any moment: checkpoints are written atomically, the next writer removes what a
killed one left half-written and takes over its lock, a corrupt checkpoint is set aside
(``step-NNNNNN.corrupt``) and the newest intact one resumed, and a run with no intact checkpoint starts
again from step 0 (``RunDirectory``).

The trainer state is JSON (step, tokens, best metric, scaler, python/numpy RNG states) plus two
safetensors files (AdamW moments keyed by parameter name; torch generator states of every rank):
no pickle.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import random
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file

from gpt.checkpoint import CHECKPOINT_STAMP, CONFIG_FILE, safetensors_name
from gpt.data import field_of_kind, integer_field
from tokenizers_bpe.errors import InputFileError, NoSpaceError
from tokenizers_bpe.fileio import (
    Stamp,
    atomic_directory,
    atomic_write,
    format_stamp,
    free_bytes,
    no_space_as_error,
    parse_json,
    read_json,
    read_text,
    recorded_version,
    remove_stale_temporaries,
)
from tokenizers_bpe.locks import OutputLock

log = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"
MAX_METRICS_BYTES = 1 << 30  # ~200 bytes a logged step: millions of steps
PLOT_FILE = "loss.png"
RUN_CONFIG_FILE = "run_config.json"
CHECKPOINTS_DIR = "checkpoints"
BEST_DIR = "best"
FINAL_DIR = "final"
STATE_FORMAT = "gpt-trainer-state"
STATE_VERSION = 1
STATE_FILE = "trainer_state.json"
OPTIMIZER_FILE = "optimizer.safetensors"
RNG_FILE = "rng.safetensors"
LOCK_FILE = ".lock"
RUN_FORMAT = "gpt-run"
RUN_VERSION = 1
RUN_STAMP = Stamp(RUN_FORMAT, "a run directory", RUN_CONFIG_FILE)
_STEP_DIR = re.compile(r"^step-(\d{6,})$")


def step_dir(out_dir: Path, step: int) -> Path:
    """RUN_DIR/checkpoints/step-NNNNNN of a step."""
    return Path(out_dir) / CHECKPOINTS_DIR / f"step-{step:06d}"


def holds_run(out_dir: Path) -> bool:
    """Whether ``out_dir`` holds a run with something to resume (a step checkpoint) or a finished one
    (``final/``). A run killed before its first checkpoint holds nothing: the same command restarts it."""
    return bool(checkpoint_dirs(out_dir)) or (Path(out_dir) / FINAL_DIR).is_dir()


def read_run_config(run_dir: Path, hint: str) -> dict:
    """The options a run recorded (``RUN_DIR/run_config.json``: a ``gpt-run`` v1 object), for a resume
    to compare with its own; an InputFileError naming the file (+ ``hint``) when it is missing,
    unreadable or not a run configuration this toolkit wrote."""
    path = Path(run_dir) / RUN_CONFIG_FILE
    config = read_json(path, hint)
    if not isinstance(config, dict) or config.get("format") != RUN_FORMAT or recorded_version(config) != RUN_VERSION:
        raise InputFileError(path, f"{path}: not a {RUN_FORMAT} v{RUN_VERSION} run configuration; {hint}")
    return config


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


def rng_snapshot() -> tuple:
    """The random states a micro-batch draws from (dropout, sampling), to undo a step cut short."""
    cuda = torch.cuda.get_rng_state() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
    return torch.get_rng_state(), cuda, random.getstate(), np.random.get_state()


def restore_rng(snapshot: tuple) -> None:
    cpu, cuda, python, numpy = snapshot
    torch.set_rng_state(cpu)
    if cuda is not None:
        torch.cuda.set_rng_state(cuda)
    random.setstate(python)
    np.random.set_state(numpy)


def checkpoint_dirs(out_dir: Path) -> list[tuple[int, Path]]:
    """RUN_DIR/checkpoints/step-NNNNNN directories, oldest first."""
    root = Path(out_dir) / CHECKPOINTS_DIR
    found = []
    if root.is_dir():
        for d in root.iterdir():
            m = _STEP_DIR.match(d.name)
            if m and d.is_dir():
                found.append((int(m.group(1)), d))
    return sorted(found)


def write_train_state(directory: Path, meta: dict, optimizer_tensors: dict[str, torch.Tensor], rng: dict[str, torch.Tensor]) -> None:
    """The trainer state files of a step checkpoint, into ``directory`` (the caller makes it atomic)."""
    save_file(optimizer_tensors, str(Path(directory) / OPTIMIZER_FILE))
    save_file(rng, str(Path(directory) / RNG_FILE))
    (Path(directory) / STATE_FILE).write_text(json.dumps(meta, indent=1) + "\n", encoding="utf-8")


def read_train_state(path: Path, device) -> tuple[dict, dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(state JSON, optimizer tensors on ``device``, RNG tensors) of the step checkpoint ``path``;
    a ValueError naming the file when one is missing, unreadable or not ours."""
    path = Path(path)
    try:
        meta = read_json(path / STATE_FILE)
    except (OSError, ValueError) as e:
        raise ValueError(f"{path / STATE_FILE}: unreadable trainer state ({e}); the run directory is corrupt") from None
    if not isinstance(meta, dict) or meta.get("format") != STATE_FORMAT or recorded_version(meta) != STATE_VERSION:
        raise ValueError(f"{path / STATE_FILE}: not a {STATE_FORMAT} v{STATE_VERSION} file; the run directory is corrupt or from another program")
    try:
        _check_state(meta)
    except TypeError as e:
        raise ValueError(f"{path / STATE_FILE}: malformed trainer state ({e}); the run directory is corrupt") from None
    try:
        with safetensors_name(path / OPTIMIZER_FILE) as name:
            optimizer_tensors = load_file(name, device=str(device))
        with safetensors_name(path / RNG_FILE) as name:
            rng = load_file(name)
    except Exception as e:  # safetensors raises its own error types
        raise ValueError(f"{path}: unreadable optimizer/RNG state ({type(e).__name__}: {e}); the run directory is corrupt") from None
    return meta, optimizer_tensors, rng


def read_metrics(path: Path) -> list[tuple[str, dict]]:
    """(line, record) for each record of the metrics file ``path``, in order; a line cut short by a
    crash, or anything but a flat JSON object, is skipped. A file that is not a regular one, too large
    or not UTF-8 is an InputFileError/InvalidTextError naming it."""
    text = read_text(path, "metrics file", "the run directory is corrupt", MAX_METRICS_BYTES)
    records = []
    for line in text.splitlines():
        try:
            record = parse_json(line, str(path), limit=2)
        except InputFileError:
            continue
        if isinstance(record, dict):
            records.append((line, record))
    return records


MAX_COUNT = 2**62  # steps and tokens of a run


def _check_state(meta: dict) -> None:
    """The counters and the "best" and "last_eval" entries a resumed run goes on with (the optimizer's
    and the RNG's are checked where they are loaded)."""
    for name in ("step", "tokens"):
        integer_field(meta.get(name), name, 0, MAX_COUNT)
    integer_field(meta.get("world_size"), "world_size", 1, MAX_COUNT)
    best = meta.get("best")
    if best is not None:
        if not isinstance(best, dict) or not isinstance(best.get("metric"), str) or not isinstance(best.get("dir"), str):
            raise TypeError(f"best must be an object with metric, value, step and dir, got {json.dumps(best)[:60]}")
        field_of_kind(best.get("value"), (int, float), "best.value")
        integer_field(best.get("step"), "best.step", 0, MAX_COUNT)
    last_eval = meta.get("last_eval")
    if last_eval is not None:
        if not isinstance(last_eval, dict):
            raise TypeError(f"last_eval must be an object, got {json.dumps(last_eval)[:60]}")
        for key, value in last_eval.items():
            if key == "step":
                integer_field(value, "last_eval.step", 0, MAX_COUNT)
            else:
                field_of_kind(value, (int, float), f"last_eval.{key}")


def truncate_metrics(out_dir: Path, step: int) -> None:
    """Drop the metrics logged after ``step`` (the checkpoint a run resumes from; a crash can leave
    some, and a line cut short)."""
    path = Path(out_dir) / METRICS_FILE
    if not path.exists():
        return
    keep = [line for line, record in read_metrics(path) if isinstance(record.get("step", 0), int) and record.get("step", 0) <= step]
    with atomic_write(path) as f:
        f.write("".join(line + "\n" for line in keep))


def append_metrics(out_dir: Path, record: dict) -> None:
    """One line of ``metrics.jsonl``. A full disk is a NoSpaceError naming the last good checkpoint (the
    line it cut short is dropped when the run resumes)."""
    path = Path(out_dir) / METRICS_FILE
    try:
        with no_space_as_error(path), open(path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
    except NoSpaceError as e:
        raise NoSpaceError(path, e.free, e.needed, checkpoint_advice(out_dir)) from None


def checkpoint_advice(run_dir: Path) -> str:
    """What a run that cannot write on can still resume from, for a message."""
    found = checkpoint_dirs(run_dir)
    return f"the last good checkpoint {found[-1][1]} is intact" if found else "no checkpoint was written yet"


def resolve_model_dir(path: str | os.PathLike) -> tuple[Path, str | None]:
    """A checkpoint directory as given, or a run directory standing for its model: ``final/``, else
    ``best/``, else the newest step checkpoint. Returns (directory, a note saying what was picked, or
    None when ``path`` was used as it is)."""
    path = Path(path)
    if not path.is_dir() or (path / CONFIG_FILE).is_file():
        return path, None
    candidates = [path / FINAL_DIR, path / BEST_DIR, *(d for _, d in reversed(checkpoint_dirs(path)))]
    for candidate in candidates:
        if (candidate / CONFIG_FILE).is_file():
            return candidate, f"{path} is a run directory; using its model {candidate}"
    return path, None


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
        if self.tokens == 0 and not self.interrupted:
            lines = [f"nothing to train: the run was already at step {self.step}, its last step"]
        else:
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


class RunDirectory:
    """A run directory while a process writes it: one writer at a time (the lock), the leftovers of a
    killed writer removed, corrupt checkpoints set aside. ``open()`` before writing, ``close()`` after."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.lock = OutputLock(self.path / LOCK_FILE, f"run directory {self.path}")

    def open(self) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        self.lock.acquire()
        for directory in (self.path, self.path / CHECKPOINTS_DIR):
            for entry in remove_stale_temporaries(directory):
                log.info(f"note: removed {entry}, left by a writer that was killed")

    def close(self) -> None:
        self.lock.release()

    def __enter__(self) -> RunDirectory:
        self.open()
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def set_aside(self, checkpoint: Path, reason: str) -> None:
        """Rename a corrupt step checkpoint out of the way (kept, as ``step-NNNNNN.corrupt``)."""
        target = checkpoint.with_name(checkpoint.name + ".corrupt")
        n = 1
        while target.exists():
            n += 1
            target = checkpoint.with_name(f"{checkpoint.name}.corrupt{n}")
        os.replace(checkpoint, target)
        log.warning(f"skipped {checkpoint}: {reason}; it is kept as {target.name}")

    def restart(self) -> None:
        """Forget what a run that left no checkpoint wrote (its metrics and best/), to start it again."""
        truncate_metrics(self.path, 0)
        best = self.path / BEST_DIR
        if best.is_dir():
            shutil.rmtree(best)

    def write_checkpoint(self, directory: Path, write: Callable[[Path], None], size: int) -> None:
        """A checkpoint directory of the run, written atomically by ``write(tmp)``; ``size`` is about the
        bytes it takes. A disk too full for it is a NoSpaceError naming the last good checkpoint, raised
        before writing when the free space is known to be short."""
        advice = checkpoint_advice(self.path)
        if free_bytes(directory.parent) < size:
            raise NoSpaceError(directory, free_bytes(directory.parent), size, advice)
        try:
            with atomic_directory(directory, CHECKPOINT_STAMP) as tmp:
                write(tmp)
        except NoSpaceError as e:
            raise NoSpaceError(directory, e.free, size, advice) from None

    def write_config(self, run_config: dict) -> None:
        with atomic_write(self.path / RUN_CONFIG_FILE) as f:
            json.dump({**format_stamp(RUN_FORMAT, RUN_VERSION), **run_config}, f, indent=2)
            f.write("\n")
