"""The CPU kernel of few-row linear layers (cpu_linear.c): built once per machine with the C compiler,
loaded with ctypes, used eagerly (no torch.compile) by ``int8_linear`` for decoding on a CPU.

    linear(x, weight, scale, bias) = (x @ weight.T) * scale + bias, in fp32

``weight`` is (out, in) int8; x has at most ``MAX_ROWS`` rows. The kernel streams the weights
once for all rows, converting int8 to fp32 in registers (exact), and sums in fp32: the same math as
the dequantised product, in another summation order (the scale multiplies each output's sum). Measured on the development machine (AMD EPYC,
AVX2, one thread, GPT-2 124M's 49 decoding products; benches/README.md, Generation): int8 at one row
streams ~16 GB/s of int8 weights, 3.4x fp32 ``addmm``; at 8 rows 2.4x fp32's matrix product.

Why a C file and ctypes, not a PyTorch C++ extension: it includes no PyTorch header, so it compiles in
about a second (a C++ extension takes a minute), which keeps a first run's wait short. The library is
cached at ``cache_dir()`` under a name that hashes the source, the compiler's version and the flags, so
a changed source or compiler builds a new one; it is written atomically (several processes may build
it at once). AVX2 and FMA are required (x86-64 from 2013 on); elsewhere, or without a compiler, or if
the build fails, ``available()`` is False, ``unavailable_reason()`` says why, and ``int8_linear`` falls
back to dequantising. Threads: the kernel splits the output rows over ``torch.get_num_threads()``
threads (OpenMP).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

SOURCE = Path(__file__).with_name("cpu_linear.c")
FLAGS = ("-O3", "-mavx2", "-mfma", "-fopenmp", "-shared", "-fPIC", "-std=c11")
MAX_ROWS = 64  # more rows: a real matrix product, where dequantising once and MKL's GEMM are faster
CACHE_ENV = "GPT2_KERNELS_CACHE"
BUILD_TIMEOUT_S = 120


def cache_dir() -> Path:
    """Where the built library is kept: $GPT2_KERNELS_CACHE, else $XDG_CACHE_HOME/gpt2_kernels, else
    ~/.cache/gpt2_kernels."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "gpt2_kernels"


def _cpu_supported() -> bool:
    return torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512")


def _compiler() -> str | None:
    for name in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def _library_path(compiler: str) -> Path:
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True, timeout=30).stdout
    digest = hashlib.sha256("\0".join((SOURCE.read_text(), version, *FLAGS)).encode()).hexdigest()[:16]
    return cache_dir() / f"cpu_linear-{digest}.so"


def _build(compiler: str, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        result = subprocess.run([compiler, *FLAGS, "-o", tmp, str(SOURCE)], capture_output=True, text=True,
                                timeout=BUILD_TIMEOUT_S)
        if result.returncode != 0:
            raise OSError(f"{Path(compiler).name} failed: {result.stderr.strip()[-500:]}")
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


_POINTER, _INT64 = ctypes.c_void_p, ctypes.c_int64
_ARGTYPES = [_POINTER, _INT64, _INT64, _POINTER, _INT64, _INT64, _POINTER, _POINTER, _POINTER, _INT64, ctypes.c_int]


@functools.cache
def _load() -> tuple[ctypes.CDLL | None, str]:
    """(the library, "") or (None, why not); built on first use."""
    if not _cpu_supported():
        return None, f"the CPU lacks AVX2/FMA (PyTorch reports {torch.backends.cpu.get_cpu_capability()})"
    compiler = _compiler()
    if compiler is None:
        return None, "no C compiler found (set $CC, or install gcc)"
    try:
        path = _library_path(compiler)
        if not path.exists():
            _build(compiler, path)
        lib = ctypes.CDLL(str(path))
    except (OSError, subprocess.SubprocessError) as e:
        return None, f"building {SOURCE.name} failed: {e}"
    lib.linear_i8.argtypes, lib.linear_i8.restype = _ARGTYPES, None
    return lib, ""


def available() -> bool:
    """The kernel runs on this machine (built, or buildable now: the first call builds it)."""
    return _load()[0] is not None


def unavailable_reason() -> str:
    """Why ``available()`` is False ("" when it is True)."""
    return _load()[1]


def linear(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """(x @ weight.T) * scale + bias as fp32 (M, out), for x (M, in) fp32 with unit stride along in and
    M <= MAX_ROWS, weight (out, in) int8 contiguous, scale (out,) fp32, bias (out,) fp32 or None, all on
    the CPU. The caller checks that the shapes agree (``int8_linear`` does)."""
    lib = _load()[0]
    if lib is None:
        raise RuntimeError(f"the CPU linear kernel is unavailable: {unavailable_reason()}")
    M, K = x.shape
    N = weight.shape[0]
    if not (M <= MAX_ROWS and x.dtype == torch.float32 and x.stride(1) == 1 and weight.dtype == torch.int8
            and weight.is_contiguous() and scale.dtype == torch.float32 and scale.is_contiguous()
            and (bias is None or bias.dtype == torch.float32 and bias.is_contiguous())):
        raise ValueError("cpu_linear.linear: x (M <= MAX_ROWS, in) fp32 rows, a contiguous int8 weight, fp32 scale and bias expected")
    y = torch.empty(M, N, dtype=torch.float32)
    if M and N:
        lib.linear_i8(x.data_ptr(), x.stride(0), M, weight.data_ptr(), N, K, scale.data_ptr(),
           None if bias is None else bias.data_ptr(), y.data_ptr(), N, torch.get_num_threads())
    return y
