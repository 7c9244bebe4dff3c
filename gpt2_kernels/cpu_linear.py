"""The CPU kernels of decoding's few-row steps, built once per machine with the C compiler into one
library, loaded with ctypes, used eagerly (no torch.compile): linear layers (cpu_linear.c, used by
``int8_linear`` and gpt.decode), one query's attention (cpu_attention.c, ``attend_one``) and whole
transformer blocks built of them (cpu_layer.c, driven by gpt2_kernels.cpu_decode).

    linear(x, weight, scale, bias) = (x @ weight.T) * scale + bias, in fp32

``weight`` is (out, in), int8 with per-output scales (x has at most ``MAX_ROWS`` rows) or fp32 without
(at most ``F32_MAX_ROWS``). The kernel streams the weights once for all rows, converting int8 to fp32
in registers (exact), and sums in fp32: the same math as the dequantised product, in another
summation order (the scale multiplies each output's sum). It is built for AVX-512 where PyTorch uses
it, else AVX2. Measured (one thread, GPT-2 124M's 49 decoding products; benches/README.md,
Generation): on an AMD EPYC with AVX2, int8 at one row streams ~16 GB/s, 3.4x fp32 ``addmm``; on an
Intel Xeon with AVX-512, int8 4.3 ms a step at one row (AVX2 build: 5.1 ms) and 17 ms at 8 rows, fp32
24 ms at one row and 33 ms at 8 (MKL's ``addmm``: 29 and 56 ms).

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
import math
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

SOURCES = tuple(Path(__file__).with_name(name) for name in ("cpu_linear.c", "cpu_attention.c", "cpu_layer.c"))
FLAGS = ("-O3", "-mavx2", "-mfma", "-fopenmp", "-shared", "-fPIC", "-std=c11")
AVX512_FLAGS = ("-mavx512f",)  # added where PyTorch's dispatch uses AVX-512 (16 lanes instead of 8)
MAX_ROWS = 64  # more rows: a real matrix product, where dequantising once and MKL's GEMM are faster
# fp32 weights: up to 8 rows the kernel beats MKL (124M's products, one thread, AVX-512: 24 vs 29 ms at
# one row, 33 vs 56 ms at 8); a matrix product of more rows is MKL's
F32_MAX_ROWS = 8
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


def flags() -> tuple[str, ...]:
    """The compiler flags for this CPU: AVX-512 where PyTorch's own kernels use it (so
    ``ATEN_CPU_CAPABILITY=avx2`` forces the AVX2 build as it forces PyTorch's), else AVX2."""
    return FLAGS + (AVX512_FLAGS if torch.backends.cpu.get_cpu_capability() == "AVX512" else ())


def _library_path(compiler: str) -> Path:
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True, timeout=30).stdout
    digest = hashlib.sha256("\0".join((*(p.read_text() for p in SOURCES), version, *flags())).encode()).hexdigest()[:16]
    return cache_dir() / f"cpu_linear-{digest}.so"


def _build(compiler: str, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        result = subprocess.run([compiler, *flags(), "-o", tmp, *map(str, SOURCES)], capture_output=True, text=True,
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
        return None, f"building {' and '.join(p.name for p in SOURCES)} failed: {e}"
    for fn in (lib.linear_i8, lib.linear_f32):
        fn.argtypes, fn.restype = _ARGTYPES, None
    lib.attend_one_f32.argtypes = [_POINTER] * 3 + [_INT64] * 2 + [_POINTER] * 2 + [_INT64] * 3 + [_POINTER] + [_INT64] * 6 + [ctypes.c_float, ctypes.c_int]
    lib.attend_one_f32.restype = ctypes.c_int
    lib.decode_blocks.argtypes = [_POINTER, _INT64, ctypes.c_int, _POINTER] + [_INT64] * 4 + [ctypes.c_float, _POINTER, ctypes.c_int]
    lib.decode_blocks.restype = ctypes.c_int
    lib.gelu_tanh_f32.argtypes, lib.gelu_tanh_f32.restype = [_POINTER, _INT64], None
    return lib, ""


def available() -> bool:
    """The kernel runs on this machine (built, or buildable now: the first call builds it)."""
    return _load()[0] is not None


def unavailable_reason() -> str:
    """Why ``available()`` is False ("" when it is True)."""
    return _load()[1]


def linear(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor | None, bias: torch.Tensor | None) -> torch.Tensor:
    """(x @ weight.T) * scale + bias as fp32 (M, out), for x (M, in) fp32 with unit stride along in and
    M <= MAX_ROWS, weight (out, in) contiguous, int8 with scale (out,) fp32, or fp32 with scale None
    (M <= F32_MAX_ROWS), bias (out,) fp32 or None, all on the CPU. The caller checks that the shapes
    agree (``int8_linear`` and gpt.decode do)."""
    lib = _load()[0]
    if lib is None:
        raise RuntimeError(f"the CPU linear kernel is unavailable: {unavailable_reason()}")
    M, K = x.shape
    N = weight.shape[0]
    int8 = weight.dtype == torch.int8
    if not (M <= (MAX_ROWS if int8 else F32_MAX_ROWS) and x.dtype == torch.float32 and x.stride(1) == 1
            and weight.is_contiguous()
            and (scale is not None and scale.dtype == torch.float32 and scale.is_contiguous() if int8
                 else weight.dtype == torch.float32 and scale is None)
            and (bias is None or bias.dtype == torch.float32 and bias.is_contiguous())):
        raise ValueError("cpu_linear.linear: x (M, in) fp32 rows, a contiguous int8 weight with fp32 scales or an fp32 "
                         "weight without, and an fp32 bias expected")
    y = torch.empty(M, N, dtype=torch.float32)
    if M and N:
        (lib.linear_i8 if int8 else lib.linear_f32)(
            x.data_ptr(), x.stride(0), M, weight.data_ptr(), N, K, None if scale is None else scale.data_ptr(),
            None if bias is None else bias.data_ptr(), y.data_ptr(), N, torch.get_num_threads())
    return y


def same_layout(*tensors: torch.Tensor) -> bool:
    """The tensors (of one shape) have the same strides along every dimension longer than 1."""
    first = tensors[0]
    return all(t.shape == first.shape and all(a == b for a, b, n in zip(t.stride(), first.stride(), first.shape) if n > 1)
               for t in tensors)


def attend_one(q: torch.Tensor, k_new: torch.Tensor, v_new: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
               length: int) -> torch.Tensor:
    """One decoding step's attention, in fp32 on the CPU: writes k_new and v_new (B, H, D) into the
    caches (B, H, Lmax, D) at position ``length - 1``, then returns softmax(q k^T / sqrt(D)) v over the
    first ``length`` positions as (B, H, D), for q (B, H, D). q, k_new and v_new share their layout
    (``same_layout``); every tensor has unit stride along D."""
    lib = _load()[0]
    if lib is None:
        raise RuntimeError(f"the CPU decoding kernels are unavailable: {unavailable_reason()}")
    B, H, D = q.shape
    if not (q.dtype == k_new.dtype == v_new.dtype == k_cache.dtype == v_cache.dtype == torch.float32
            and same_layout(q, k_new, v_new) and q.stride(2) == 1
            and k_cache.shape == v_cache.shape and k_cache.stride() == v_cache.stride() and k_cache.stride(3) == 1
            and k_cache.shape[:2] == (B, H) and k_cache.shape[3] == D and 1 <= length <= k_cache.shape[2]):
        raise ValueError("cpu_linear.attend_one: fp32 q, k_new, v_new (B, H, D) of one layout and caches (B, H, Lmax, D) expected")
    out = torch.empty(B, H, D)
    status = lib.attend_one_f32(q.data_ptr(), k_new.data_ptr(), v_new.data_ptr(), q.stride(0), q.stride(1),
                                k_cache.data_ptr(), v_cache.data_ptr(), *k_cache.stride()[:3], out.data_ptr(), H * D, D,
                                B, H, length, D, 1.0 / math.sqrt(D), torch.get_num_threads())
    if status != 0:
        raise MemoryError(f"cpu_linear.attend_one: no memory for {length} attention scores")
    return out
