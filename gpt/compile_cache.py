"""Compiled decoding reused across processes: PyTorch's cache artifacts (``torch.compiler``'s
"mega-cache": inductor's compiled graphs, AOTAutograd's, dynamo's recorded dynamic shapes) of one
generation setup, kept in a directory beside the checkpoint (``<checkpoint>.compile-cache/``, never
inside it: a checkpoint stays what its files say).

``torch.compile`` keeps its own caches in a temporary directory of this machine; these artifacts make
a later process (or another machine of the same kind, given the directory) skip inductor's code
generation and C++ compiling, which is most of a first compiled run's wait. What remains is dynamo
tracing the step and the prefill again (seconds).

One file per setup, named by a hash of everything that makes compiled code invalid or different:
the checkpoint's weight files (names, sizes, modification times: replaced weights make a new key),
the PyTorch version, the CPU (model name and feature flags) or GPU, the dtype, the quantization, the
batch size and the thread count (inductor specialises code to it), and a draft model's files. A file
holds compiled code, so only one owned by the current user is loaded (as ssh treats its keys); it is
written atomically with a format header.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
from pathlib import Path
from stat import S_ISREG

import torch

from tokenizers_bpe.fileio import atomic_write

SUFFIX = ".compile-cache"
MAGIC = b"gpt2-toolkit compile cache v1\n"
MAX_BYTES = 2**30  # a cache file larger than this is not ours


def _files_fingerprint(directory: Path) -> list:
    return sorted((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in Path(directory).iterdir() if p.is_file())


def _machine(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    cpu = platform.machine()
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        cpu += "|" + "|".join(sorted({line.split(":", 1)[1].strip() for line in lines
                                      if line.startswith(("model name", "flags"))}))
    except OSError:
        cpu += "|" + platform.processor()
    return cpu + "|" + str(torch.backends.cpu.get_cpu_capability())


def cache_file(model_dir: Path, *, device: torch.device | str, dtype: torch.dtype, quantize: str | None, batch_size: int,
               draft_dir: Path | None = None) -> Path:
    """Where the artifacts of this setup live: ``<model_dir>.compile-cache/<key>.bin``."""
    model_dir, device = Path(model_dir).absolute(), torch.device(device)
    key = {"torch": torch.__version__, "machine": _machine(device), "device": device.type, "dtype": str(dtype),
           "quantize": quantize, "batch_size": batch_size, "threads": torch.get_num_threads(),
           "weights": _files_fingerprint(model_dir), "draft": _files_fingerprint(draft_dir) if draft_dir else None}
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:32]
    return model_dir.parent / f"{model_dir.name}{SUFFIX}" / f"{digest}.bin"


def load(path: Path) -> bool:
    """Hand the artifacts in ``path`` to torch.compile's caches; False when there are none to use (no
    file, not ours, not this format, or PyTorch refused them)."""
    try:
        stat = path.stat()
        if (not S_ISREG(stat.st_mode) or (hasattr(os, "getuid") and stat.st_uid != os.getuid())
                or stat.st_size > MAX_BYTES):  # (a FIFO would block the read)
            return False
        data = path.read_bytes()
    except OSError:
        return False
    if not data.startswith(MAGIC):
        return False
    try:
        return torch.compiler.load_cache_artifacts(data[len(MAGIC):]) is not None
    except Exception:  # a file of another PyTorch build: compiling from scratch is the answer
        return False


def save(path: Path) -> bool:
    """Write the artifacts this process has compiled so far to ``path``; False when there were none.
    OSError when it cannot be written."""
    artifacts = torch.compiler.save_cache_artifacts()
    if artifacts is None or not artifacts[0]:
        return False
    with atomic_write(path, "wb") as f:
        f.write(MAGIC + artifacts[0])
    return True
