"""Where a model runs: the device and dtype rules every command shares, and this process's place in
a ``torchrun`` job (DDP: NCCL on GPUs, gloo on CPUs)."""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile
from dataclasses import dataclass
from typing import Iterator

import torch
import torch.distributed as torch_dist

from tokenizers_bpe.errors import SettingError
from tokenizers_bpe.fileio import is_out_of_space

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def dtype_name(dtype: torch.dtype) -> str:
    """The name of a weights dtype in DTYPES ("float32", ...); ValueError for any other."""
    for name, d in DTYPES.items():
        if d == dtype:
            return name
    raise ValueError(f"unsupported weight dtype {dtype}; use one of {', '.join(DTYPES)}")


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
    """"auto" -> "cuda" when there is a GPU, else "cpu"; "cpu", "cuda" and "cuda:N" as they are."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device != "cpu" and not device.startswith("cuda"):
        raise SettingError("device", f"{{device}} must be auto, cpu, cuda or cuda:N, got {device!r}")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise SettingError("device", f"{{device}} {device}: CUDA is not available here; use {{device}} cpu")
    return device


def init_distributed(device: str = "auto") -> Dist:
    """Join the process group that ``torchrun`` describes in the environment (NCCL on CUDA, gloo
    on CPU); without torchrun, a single process. Each rank gets its own GPU (``cuda:LOCAL_RANK``)."""
    device = resolve_device(device)
    world_size = _environment_int("WORLD_SIZE", "1", 1 << 20)
    if world_size <= 1:
        return Dist(device=device)
    rank, local_rank = _environment_int("RANK", None, world_size - 1), _environment_int("LOCAL_RANK", "0", world_size - 1)
    if device.startswith("cuda"):
        device = f"cuda:{local_rank}"
        torch.cuda.set_device(device)
    if not torch_dist.is_initialized():
        torch_dist.init_process_group(backend="nccl" if device.startswith("cuda") else "gloo")
    return Dist(rank=rank, local_rank=local_rank, world_size=world_size, device=device)


def _environment_int(name: str, default: str | None, most: int) -> int:
    """An integer torchrun sets in the environment, checked: a stray or garbled one is a one-line error."""
    text = os.environ.get(name, default)
    if text is None or len(text) > 20 or not text.strip().isdigit() or int(text) > most:
        got = "unset" if text is None else f"{text[:40]!r}"
        raise ValueError(f"the environment variable {name} must be an integer from 0 to {most} as torchrun sets it, got "
                         f"{got}; unset WORLD_SIZE to train in one process, or start the run with torchrun")
    return int(text)


def _check_dtype_name(dtype: str) -> None:
    if dtype != "auto" and dtype not in DTYPES:
        raise SettingError("dtype", f"{{dtype}} must be one of auto, {', '.join(DTYPES)}, got {dtype!r}")


def resolve_dtype(dtype: str, device: str) -> torch.dtype:
    """The training dtype: "auto" is bf16 on a GPU that has it, else fp16 there (with a GradScaler),
    and fp32 on the CPU."""
    _check_dtype_name(dtype)
    if dtype == "auto":
        if device.startswith("cuda"):
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    if dtype == "float16" and not device.startswith("cuda"):
        raise SettingError("dtype", "{dtype} float16 needs CUDA (a GradScaler); use bfloat16 or float32 on the CPU")
    return DTYPES[dtype]


def resolve_inference_dtype(dtype: str, device: str) -> torch.dtype:
    """The weights dtype for inference: "auto" is bf16 on a GPU that has it, else fp32 (inference
    needs no fp16 loss scaling, but fp32 is the safe default on a CPU)."""
    _check_dtype_name(dtype)
    if dtype == "auto":
        return torch.bfloat16 if device.startswith("cuda") and torch.cuda.is_bf16_supported() else torch.float32
    return DTYPES[dtype]


def to_device(batch, device: torch.device):
    """A batch (a tensor, or a tuple/list/dict of them) on ``device``; other values as they are."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {k: to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (tuple, list)):
        return type(batch)(to_device(v, device) for v in batch)
    return batch


@contextlib.contextmanager
def compile_failures_named() -> Iterator[None]:
    """torch.compile's failures inside the block (its C++ build, a full $TMPDIR where it builds) as a
    SettingError naming the setting ``compile``; any other error as it is."""
    try:
        yield
    except Exception as e:
        failure = _compile_failure(e)
        if failure is None:
            raise
        raise failure from None


def _compile_failure(e: BaseException) -> SettingError | None:
    dynamo = sys.modules.get("torch._dynamo.exc")  # (not imported: nothing was compiled)
    if dynamo is None or not isinstance(e, dynamo.TorchDynamoException):
        return None
    chain, cause = [], e
    while cause is not None and len(chain) < 16:
        chain.append(cause)
        cause = cause.__cause__ or cause.__context__
    if any(is_out_of_space(c) for c in chain):
        where = os.environ.get("TMPDIR") or tempfile.gettempdir()  # (the C++ compiler's, where Python's had to look elsewhere)
        return SettingError("compile", f"torch.compile could not write its build files under {where}: no space "
                                       "left on the device; free some space there, set TMPDIR to a disk with more, or run "
                                       "without {compile}")
    first = next((line.strip() for line in str(e).splitlines() if line.strip()), type(e).__name__)
    return SettingError("compile", f"torch.compile failed on this machine ({first[:200]}); run without {{compile}}")
