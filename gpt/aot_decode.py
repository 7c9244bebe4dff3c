"""Compiled decoding without compiling again: the decoding step and the prefill of gpt.decode exported
with ``torch.export`` and compiled ahead of time by AOTInductor into two packages (``.pt2``: a shared
library and its metadata, no weights), kept beside the checkpoint in its compile cache. A later
process loads them (well under a second) instead of tracing the functions again with dynamo (~5-8 s for GPT-2
124M), which is what a second ``gpt-generate --compile`` run waited for.

    decoder = Decoder(model, batch_size, compile=True)
    attach(decoder, prefix)   # loads prefix-step.pt2 / prefix-prefill.pt2, or builds them first

Each package takes the decoder's inference weights and caches as inputs (their tensors, flattened in
a fixed order), so the same package serves any weights of the same shapes; the length is dynamic
(any position, any prompt). What the packages do not cover stays on the decoder's own path: a prompt
of one token, and several positions at once after the first (speculative decoding's verification)
run eagerly. CPU only; anything that fails to export or compile leaves the decoder as it was
(torch.compile). A package holds native code: it is loaded only if the current user owns it and
its signature (``<package>.sig``, gpt.compile_cache.signature) is this user's.
"""

from __future__ import annotations

import logging
import os
import tempfile
import warnings
from pathlib import Path
from stat import S_ISREG
from typing import Callable

import torch
import torch.utils._pytree as pytree

from gpt.compile_cache import SIGNATURE_BYTES, signature, signed_here
from gpt.decode import Decoder, forward_logits, step_logits
from tokenizers_bpe.fileio import atomic_write

MAX_PACKAGE_BYTES = 2**30  # a larger file is not a package of ours
log = logging.getLogger(__name__)


def package_paths(prefix: Path) -> tuple[Path, Path]:
    """Where the step's and the prefill's packages live for a compile-cache key ``prefix``."""
    return prefix.with_name(prefix.name + "-step.pt2"), prefix.with_name(prefix.name + "-prefill.pt2")


def _failed_marker(prefix: Path) -> Path:
    """Left where building failed, so that later runs go to torch.compile without trying again."""
    return prefix.with_name(prefix.name + "-aot-failed")


def packaged(prefix: Path) -> bool:
    """Both packages are there (a run will load them rather than compile)."""
    return all(_owned_package(p) for p in package_paths(prefix))


def will_build(prefix: Path | None) -> bool:
    """A compiled run with packages at ``prefix`` would build them first (none there, none failed)."""
    return prefix is not None and not packaged(prefix) and not _failed_marker(prefix).exists()


class _Flat(torch.nn.Module):
    """``fn(weights, k_cache, v_cache, *args)`` with the tensors of (weights, k_cache, v_cache) as one
    flat list: what torch.export and the package see; everything else of them is a constant."""

    def __init__(self, fn: Callable, decoder: Decoder, constants: tuple = ()):
        super().__init__()
        leaves, self.treespec = pytree.tree_flatten((decoder.weights, decoder.k_cache, decoder.v_cache))
        self.leaves = leaves
        self.tensor_at = [i for i, leaf in enumerate(leaves) if isinstance(leaf, torch.Tensor)]
        self.fn, self.constants = fn, constants

    def tensors(self) -> list[torch.Tensor]:
        return [self.leaves[i] for i in self.tensor_at]

    def forward(self, tensors: list[torch.Tensor], *args):
        full = list(self.leaves)
        for i, t in zip(self.tensor_at, tensors):
            full[i] = t
        weights, k_cache, v_cache = pytree.tree_unflatten(full, self.treespec)
        return self.fn(weights, k_cache, v_cache, *args, *self.constants)


def _signature_path(path: Path) -> Path:
    return path.with_name(path.name + ".sig")


def _owned_package(path: Path) -> bool:
    try:
        stat = path.stat()
        if stat.st_size > MAX_PACKAGE_BYTES or stat.st_uid != getattr(os, "getuid", lambda: -1)() or not S_ISREG(stat.st_mode):
            return False
        sig = _signature_path(path)
        return sig.stat().st_size == SIGNATURE_BYTES and signed_here(path.read_bytes(), sig.read_bytes())
    except OSError:
        return False


def _load(path: Path) -> Callable[..., torch.Tensor]:
    """A package as a function of its flat tensor inputs. Through PyTorch's loader itself: the usual
    ``torch._inductor.aoti_load_package`` imports inductor (~0.9 s) and compiles test programs to
    detect the CPU's vector ISA (~1.4 s) only to warn about a mismatch, which the compile cache's key
    (the CPU's model and flags) already rules out."""
    loader = torch._C._aoti.AOTIModelPackageLoader(str(path), "model", False, 1, -1)
    out_spec = pytree.treespec_loads(loader.get_call_spec()[1])

    def run(*tensors: torch.Tensor) -> torch.Tensor:
        return pytree.tree_unflatten(loader.boxed_run(list(tensors)), out_spec)

    return run


def _package(module: _Flat, args: tuple, dynamic: dict, path: Path) -> None:
    """Export ``module`` on ``args`` (``dynamic``: tensor -> {dim: Dim}) and compile it into ``path``,
    written atomically."""
    shapes = torch.export.ShapesCollection()
    for tensor, dims in dynamic.items():
        shapes[tensor] = dims
    with torch.no_grad():
        program = torch.export.export(module, args, dynamic_shapes=shapes.dynamic_shapes(module, args))
    made = not path.parent.exists()
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp.pt2", dir=path.parent)
    os.close(fd)
    try:
        with warnings.catch_warnings():  # PyTorch's own deprecation (a LeafSpec pickled): nothing a user can act on
            warnings.filterwarnings("ignore", category=FutureWarning, module="copyreg")
            torch._inductor.aoti_compile_and_package(program, package_path=tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp's file is private; a package is as readable as any output
        sig = signature(Path(tmp).read_bytes())
        if sig is not None:  # (without a key a package is used by this run only)
            with atomic_write(_signature_path(path), "wb") as f:
                f.write(sig)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
            if made and not any(path.parent.iterdir()):  # stopped before anything was kept: no empty cache left
                path.parent.rmdir()


@torch.inference_mode()  # the decoder's caches are inference tensors, written in place by the step
def build(decoder: Decoder, prefix: Path) -> None:
    """Export and compile the decoder's step and prefill into ``package_paths(prefix)``."""
    n_ctx, batch = decoder.n_ctx, decoder.tokens.shape[0]
    step, prefill = _Flat(step_logits, decoder), _Flat(forward_logits, decoder, (False,))
    positions = torch.arange(3)  # the length, dynamic: any position from the second on
    length = torch.export.Dim("length", min=2, max=n_ctx)
    token = torch.zeros(batch, dtype=torch.long)
    tokens, key_positions = torch.zeros(batch, 3, dtype=torch.long), torch.arange(3)
    step_path, prefill_path = package_paths(prefix)
    _package(step, (step.tensors(), token, positions), {positions: {0: length}}, step_path)
    prompt = torch.export.Dim("prompt", min=2, max=n_ctx)
    _package(prefill, (prefill.tensors(), tokens, key_positions), {tokens: {1: prompt}, key_positions: {0: prompt}},
             prefill_path)


def attach(decoder: Decoder, prefix: Path, *, on_build: Callable[[], None] | None = None) -> bool:
    """Make ``decoder`` (a compiled one, on a CPU) decode with the packages at ``prefix``, building them
    first if they are not there (``on_build`` is called before that). False, with the decoder left as
    it was, where that cannot be done."""
    if not decoder.compile or decoder.weights.wte.device.type != "cpu":
        return False
    step_path, prefill_path = package_paths(prefix)
    if _failed_marker(prefix).exists():
        return False
    def build_once() -> None:
        if on_build is not None:
            on_build()
        try:
            build(decoder, prefix)
        except Exception:  # not exportable (an op without a C++ kernel), a compiler error
            _failed_marker(prefix).touch()
            raise

    try:
        if not packaged(prefix):
            build_once()
        try:
            step, prefill = _load(step_path), _load(prefill_path)
        except Exception:  # a damaged package, or one this PyTorch cannot read: ours to make again
            log.info("the compiled decoding in %s cannot be loaded; compiling it again (about a minute) ...", prefix.parent)
            for path in (step_path, prefill_path):
                path.unlink(missing_ok=True)
            build_once()
            step, prefill = _load(step_path), _load(prefill_path)
    except Exception:  # the step cannot be packaged here: torch.compile it is
        return False
    flat = _Flat(step_logits, decoder)
    tensors = flat.tensors()  # the decoder's own weights and caches, in the packages' order
    own_forward = forward_logits

    def run_step(weights, k_cache, v_cache, token, positions):
        return step(*tensors, token, positions)

    def run_forward(weights, k_cache, v_cache, tokens, key_positions, all_positions):
        if all_positions or key_positions.shape[0] != tokens.shape[1] or weights is not decoder.weights:
            return own_forward(weights, k_cache, v_cache, tokens, key_positions, all_positions)
        return prefill(*tensors, tokens, key_positions)

    decoder._step, decoder._forward, decoder.traced = run_step, run_forward, False
    return True
