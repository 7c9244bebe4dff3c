"""What a run directory holds, and the trainer state its step checkpoints carry.

    RUN_DIR/metrics.jsonl          one JSON object per line (see gpt.trainer)
    RUN_DIR/loss.png               the loss curve (gpt.plot)
    RUN_DIR/run_config.json        the command's effective options (written by the command layer)
    RUN_DIR/checkpoints/step-NNNNNN/   a model checkpoint + STATE_FILE, OPTIMIZER_FILE, RNG_FILE
    RUN_DIR/best/, RUN_DIR/final/  model checkpoints (the best evaluation, the end of training)

The trainer state is JSON (step, tokens, best metric, scaler, python/numpy RNG states) plus two
safetensors files (AdamW moments keyed by parameter name; torch generator states of every rank):
no pickle.
"""

from __future__ import annotations

import itertools
import json
import random
import re
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file

from tokenizers_bpe.fileio import atomic_write, recorded_version

METRICS_FILE = "metrics.jsonl"
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
_STEP_DIR = re.compile(r"^step-(\d{6,})$")


def step_dir(out_dir: Path, step: int) -> Path:
    """RUN_DIR/checkpoints/step-NNNNNN of a step."""
    return Path(out_dir) / CHECKPOINTS_DIR / f"step-{step:06d}"


def holds_run(out_dir: Path) -> bool:
    """Whether a run was started in ``out_dir`` (it has checkpoints or metrics)."""
    return (Path(out_dir) / CHECKPOINTS_DIR).exists() or (Path(out_dir) / METRICS_FILE).exists()


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
        meta = json.loads((path / STATE_FILE).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path / STATE_FILE}: unreadable trainer state ({e}); the run directory is corrupt") from None
    if not isinstance(meta, dict) or meta.get("format") != STATE_FORMAT or recorded_version(meta) != STATE_VERSION:
        raise ValueError(f"{path / STATE_FILE}: not a {STATE_FORMAT} v{STATE_VERSION} file; the run directory is corrupt or from another program")
    try:
        optimizer_tensors = load_file(str(path / OPTIMIZER_FILE), device=str(device))
        rng = load_file(str(path / RNG_FILE))
    except Exception as e:  # safetensors raises its own error types
        raise ValueError(f"{path}: unreadable optimizer/RNG state ({type(e).__name__}: {e}); the run directory is corrupt") from None
    return meta, optimizer_tensors, rng


def truncate_metrics(out_dir: Path, step: int) -> None:
    """Drop the metrics logged after ``step`` (the checkpoint a run resumes from; a crash can leave
    some, and a line cut short)."""
    path = Path(out_dir) / METRICS_FILE
    if not path.exists():
        return
    keep = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            if json.loads(line).get("step", 0) <= step:
                keep.append(line)
        except (json.JSONDecodeError, AttributeError):  # a line cut short by a crash
            continue
    with atomic_write(path) as f:
        f.write("".join(line + "\n" for line in keep))
