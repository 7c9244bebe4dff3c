"""Model arguments (gpt-generate --model, gpt-inspect DIR, gpt-finetune --model, gpt-convert SRC,
gpt-train --init-from): a checkpoint directory, or a run directory standing for its model."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

import gpt2_kernels
from gpt.run_state import resolve_model_dir
from tools.cli import CLIError


def model_argument(path: str | Path, prog: str) -> Path:
    """``path`` resolved by gpt.run_state.resolve_model_dir; what was picked is said on stderr."""
    directory, note = resolve_model_dir(path)
    if note:
        print(f"{prog}: note: {note}", file=sys.stderr)
    return directory


def check_finite_weights(model, source) -> None:
    """A one-line error when a model to train from or to export holds a NaN or an infinity: training
    would stop at a NaN loss, an export would carry the damage to another tool."""
    damaged = [name for name, t in model.named_parameters() if not torch.isfinite(t).all()]
    if damaged:
        raise CLIError(f"{source}: NaN or inf in {len(damaged)} weight tensor(s) ({', '.join(damaged[:3])}"
                       f"{', ...' if len(damaged) > 3 else ''}): the weights are damaged, or their training diverged")


def check_kernels_backend(backend: str, device: str) -> None:
    """A one-line error, before any work, when the kernels backend cannot run on ``device`` (e.g.
    --backend triton, or GPT2_KERNELS_BACKEND=triton, on a machine without CUDA)."""
    try:
        gpt2_kernels.backend_for_device(backend, device.split(":")[0])
    except (RuntimeError, ValueError) as e:
        override = gpt2_kernels.backend_override()
        source = f"{override[0]}={override[1]}" if backend == "auto" and override else f"--backend {backend}"
        if isinstance(e, ValueError):  # (an override's error names its variable already)
            raise CLIError(str(e) if backend == "auto" and override else f"{source}: {e}") from None
        raise CLIError(f"{source}: the Triton kernels need a CUDA GPU ({device} here), or TRITON_INTERPRET=1 to run "
                       f"them on the CPU interpreter (slow, for tests); use --backend torch or auto") from None
