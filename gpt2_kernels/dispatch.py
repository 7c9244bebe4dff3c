"""The one backend rule shared by every op.

- ``backend="auto"`` runs the Triton kernel when the tensor is on CUDA and Triton is importable,
  otherwise the PyTorch fallback.
- ``"triton"`` / ``"torch"`` force one. ``"triton"`` on CPU tensors works only under the Triton
  interpreter (``TRITON_INTERPRET=1`` set before ``gpt2_kernels`` is imported) and raises otherwise.
- The environment variable ``GPT2_KERNELS_BACKEND`` (auto|torch|triton) overrides ``"auto"`` globally,
  e.g. ``GPT2_KERNELS_BACKEND=torch`` to rule the kernels out when debugging a model on a GPU. The
  variable's earlier name, ``KERNELS_BACKEND``, is still read (a FutureWarning says to rename it) when the
  new one is not set; it goes in the next minor release.
"""

from __future__ import annotations

import os
import warnings

import torch

try:
    import triton
    import triton.language as tl

    jit = triton.jit
    constexpr = tl.constexpr  # the only kind of module global a Triton kernel may read
except ImportError:  # Triton ships for Linux only: elsewhere only the PyTorch fallbacks run
    triton = tl = None

    def jit(fn):
        # Without Triton the kernels stay plain functions that `resolve_backend` never lets run.
        return fn

    def constexpr(value):
        return value


ENV_VAR = "GPT2_KERNELS_BACKEND"
LEGACY_ENV_VAR = "KERNELS_BACKEND"  # deprecated: the package was called `kernels`, a name Hugging Face's uses
BACKENDS = ("auto", "torch", "triton")

# triton.jit picks compiled vs interpreted kernels when they are decorated (at import), so what
# counts is whether the interpreter was on then, not whether someone sets it later.
INTERPRETER = triton is not None and os.environ.get("TRITON_INTERPRET", "0") == "1"


def _check_name(backend: str, where: str) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"{where}: unknown kernels backend {backend!r}; expected one of {', '.join(BACKENDS)}")
    return backend


def backend_override() -> tuple[str, str] | None:
    """``(variable, value)`` of the environment variable that overrides ``"auto"``, or None when neither
    $GPT2_KERNELS_BACKEND nor the deprecated $KERNELS_BACKEND is set (the new name wins when both are)."""
    for name in (ENV_VAR, LEGACY_ENV_VAR):
        value = os.environ.get(name)
        if value:
            if name == LEGACY_ENV_VAR:
                warnings.warn(f"${LEGACY_ENV_VAR} is deprecated; set ${ENV_VAR} instead", FutureWarning, stacklevel=3)
            return name, value
    return None


def resolve_backend(backend: str, x: torch.Tensor) -> str:
    """Return "triton" or "torch" for an op on tensor `x` given the requested backend."""
    return backend_for_device(backend, x.device.type)


def backend_for_device(backend: str, device_type: str) -> str:
    """The rule of ``resolve_backend`` for tensors on ``device_type`` ("cuda", "cpu", ...), so that a
    caller can check a backend before it has a tensor. ValueError for an unknown name, RuntimeError for
    a backend that cannot run there."""
    _check_name(backend, "backend")
    if backend == "auto" and (override := backend_override()) is not None:
        backend = _check_name(override[1], f"${override[0]}")
    if backend == "auto":
        return "triton" if device_type == "cuda" and triton is not None else "torch"
    if backend == "torch":
        return "torch"
    if triton is None:
        raise RuntimeError("backend='triton' needs the triton package, which is not installed; "
                           "use backend='torch' (or 'auto')")
    if device_type == "cuda":
        return "triton"
    if not INTERPRETER:
        raise RuntimeError(f"backend='triton' got a tensor on {device_type}: Triton kernels need a CUDA "
                           "tensor, or TRITON_INTERPRET=1 set before importing gpt2_kernels to run them on the "
                           "CPU interpreter; use backend='torch' (or 'auto') for CPU tensors")
    return "triton"


def cdiv(a: int, b: int) -> int:
    """ceil(a / b) for launch grids (triton.cdiv, available without Triton)."""
    return -(-a // b)
