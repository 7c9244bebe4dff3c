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
holds compiled code (pickled graphs; gpt.aot_decode's packages are shared libraries), and a cache
directory may come with a checkpoint from someone else (a tarball extracts as the user's own files),
so only a file signed with this user's key (``signature``: an HMAC with a secret made once in the
user's cache directory, mode 0600) is loaded; it is written atomically with a format header.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import platform
from pathlib import Path
from stat import S_ISREG

import torch

from tokenizers_bpe.fileio import atomic_write

SUFFIX = ".compile-cache"
MAGIC = b"gpt2-toolkit compile cache v2\n"  # then the signature (32 bytes), then PyTorch's artifacts
MAX_BYTES = 2**30  # a cache file larger than this is not ours
KEY_BYTES = 32
SIGNATURE_BYTES = hashlib.sha256().digest_size


def _signing_key() -> bytes | None:
    """This user's secret (made on first use, readable by the user only); None where it cannot be
    kept, and then nothing compiled is kept or loaded."""
    if not hasattr(os, "getuid"):
        return None  # (no owner to check the key file against)
    cache_home = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    path = Path(cache_home) / "gpt2-toolkit" / "compile-cache.key"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        except FileExistsError:
            pass
        else:
            with os.fdopen(fd, "wb") as f:
                f.write(os.urandom(KEY_BYTES))
        with os.fdopen(os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK), "rb") as f:
            st, key = os.fstat(f.fileno()), f.read(KEY_BYTES + 1)
    except OSError:
        return None
    if not S_ISREG(st.st_mode) or st.st_uid != os.getuid() or st.st_mode & 0o077 or len(key) != KEY_BYTES:
        return None  # (a key another user could read, or one being written this moment)
    return key


def signature(data: bytes) -> bytes | None:
    """The HMAC of ``data`` under this user's key (None without one)."""
    key = _signing_key()
    return None if key is None else hmac.new(key, data, hashlib.sha256).digest()


def signed_here(data: bytes, sig: bytes) -> bool:
    """Whether ``sig`` is this user's signature of ``data``: compiled code written by this user here."""
    expected = signature(data)
    return expected is not None and hmac.compare_digest(expected, sig)


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
    sig, artifacts = data[len(MAGIC) : len(MAGIC) + SIGNATURE_BYTES], data[len(MAGIC) + SIGNATURE_BYTES :]
    if not data.startswith(MAGIC) or not signed_here(artifacts, sig):
        return False  # not ours, or written by someone else: never unpickled
    try:
        return torch.compiler.load_cache_artifacts(artifacts) is not None
    except Exception:  # a file of another PyTorch build: compiling from scratch is the answer
        return False


def save(path: Path) -> bool:
    """Write the artifacts this process has compiled so far to ``path``, signed; False when there were
    none (or no key to sign them). OSError when it cannot be written."""
    artifacts = torch.compiler.save_cache_artifacts()
    sig = signature(artifacts[0]) if artifacts is not None and artifacts[0] else None
    if sig is None:
        return False
    with atomic_write(path, "wb") as f:
        f.write(MAGIC + sig + artifacts[0])
    return True
