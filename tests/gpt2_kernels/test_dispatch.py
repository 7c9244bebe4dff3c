"""The backend rule: "auto" = Triton on CUDA tensors, PyTorch otherwise; $GPT2_KERNELS_BACKEND (or the
deprecated $KERNELS_BACKEND) overrides it;
"triton" on CPU needs the interpreter and otherwise fails with a clear error."""

import importlib
import os
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest
import torch

import gpt2_kernels
from gpt2_kernels.dispatch import INTERPRETER, resolve_backend
from tests.conftest import requires_cuda
from tests.gpt2_kernels.conftest import DEVICE, requires_triton

ROOT = Path(__file__).resolve().parents[2]

# Every op on CPU with a backward pass, then each op forced onto Triton, printing the error it raises.
RUN_ALL_OPS = """
import torch, gpt2_kernels
x = torch.randn(2, 3, 8, 16, requires_grad=True)
out = gpt2_kernels.causal_attention(x, x, x).sum() + gpt2_kernels.layer_norm(x, torch.ones(16), torch.zeros(16)).sum()
out = out + gpt2_kernels.gelu(x).sum() + gpt2_kernels.LayerNorm(16)(x).sum()
out.backward()
print("auto ok", torch.isfinite(x.grad).all().item())
for call in (lambda: gpt2_kernels.causal_attention(x, x, x, backend="triton"),
             lambda: gpt2_kernels.layer_norm(x, None, None, backend="triton"),
             lambda: gpt2_kernels.gelu(x, backend="triton")):
    try:
        call()
    except RuntimeError as e:
        print(e)
"""


def run_python(code: str, **env_overrides: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "GPT2_KERNELS_BACKEND", "KERNELS_BACKEND")}
    env.update(env_overrides, CUDA_VISIBLE_DEVICES="", PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=env, cwd=ROOT, capture_output=True,
                          text=True, timeout=300)


@requires_triton
def test_resolve_backend_rule(monkeypatch):
    monkeypatch.delenv("GPT2_KERNELS_BACKEND", raising=False)
    monkeypatch.delenv("KERNELS_BACKEND", raising=False)
    cpu = torch.zeros(1)
    assert resolve_backend("auto", cpu) == "torch"  # even with the interpreter on
    assert resolve_backend("torch", cpu) == "torch"
    if INTERPRETER:  # as tests/conftest.py sets it up on a machine without a GPU
        assert resolve_backend("triton", cpu) == "triton"
    else:
        with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
            resolve_backend("triton", cpu)
    with pytest.raises(ValueError, match="unknown kernels backend 'fast'"):
        resolve_backend("fast", cpu)


@requires_triton
def test_env_var_overrides_auto_only(monkeypatch):
    cpu = torch.zeros(1)
    monkeypatch.delenv("KERNELS_BACKEND", raising=False)
    monkeypatch.setenv("GPT2_KERNELS_BACKEND", "triton")
    assert resolve_backend("auto", torch.zeros(1, device=DEVICE)) == "triton"
    assert resolve_backend("torch", cpu) == "torch"  # an explicit choice wins over the variable
    monkeypatch.setenv("GPT2_KERNELS_BACKEND", "torch")
    assert resolve_backend("auto", cpu) == "torch"
    monkeypatch.setenv("GPT2_KERNELS_BACKEND", "cuda")
    with pytest.raises(ValueError, match=r"\$GPT2_KERNELS_BACKEND: unknown kernels backend 'cuda'"):
        resolve_backend("auto", cpu)


@requires_triton
def test_the_old_variable_name_still_works_with_a_warning(monkeypatch):
    cpu = torch.zeros(1)
    monkeypatch.delenv("GPT2_KERNELS_BACKEND", raising=False)
    monkeypatch.setenv("KERNELS_BACKEND", "triton")
    with pytest.warns(FutureWarning, match=r"\$KERNELS_BACKEND is deprecated; set \$GPT2_KERNELS_BACKEND"):
        assert resolve_backend("auto", torch.zeros(1, device=DEVICE)) == "triton"
    monkeypatch.setenv("KERNELS_BACKEND", "cuda")
    with pytest.warns(FutureWarning), pytest.raises(ValueError, match=r"\$KERNELS_BACKEND: unknown kernels backend"):
        resolve_backend("auto", cpu)
    monkeypatch.setenv("GPT2_KERNELS_BACKEND", "torch")  # the new name wins, and nothing is said
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert resolve_backend("auto", cpu) == "torch"


def test_auto_on_cpu_never_launches_triton(monkeypatch):
    monkeypatch.delenv("GPT2_KERNELS_BACKEND", raising=False)
    monkeypatch.delenv("KERNELS_BACKEND", raising=False)

    def forbidden(*args):
        raise AssertionError("a Triton kernel was called for a CPU tensor with backend='auto'")

    # (import_module: the package's `gpt2_kernels.gelu` attribute is the function, not the module)
    for module, fn in [("attention", "_TritonCausalAttention"), ("layer_norm", "_TritonLayerNorm"), ("gelu", "_TritonGELU")]:
        monkeypatch.setattr(getattr(importlib.import_module(f"gpt2_kernels.{module}"), fn), "apply", forbidden)
    x = torch.randn(1, 2, 5, 16, requires_grad=True)
    gpt2_kernels.causal_attention(x, x, x).sum().backward()
    gpt2_kernels.LayerNorm(16)(x).sum().backward()
    gpt2_kernels.GELU()(x).sum().backward()


def test_auto_on_cpu_works_without_triton_installed():
    # Triton ships for Linux only: with it unimportable, "auto" still runs every op and "triton"
    # says what is missing.
    result = run_python("import sys; sys.modules['triton'] = None  # `import triton` fails\n" + RUN_ALL_OPS)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == "auto ok True"
    assert lines[1:] == ["backend='triton' needs the triton package, which is not installed; "
                         "use backend='torch' (or 'auto')"] * 3


@requires_triton
def test_forced_triton_on_cpu_without_interpreter_is_a_clear_error():
    result = run_python(RUN_ALL_OPS)  # TRITON_INTERPRET unset
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == "auto ok True"
    assert len(lines) == 4
    for line in lines[1:]:
        assert line.startswith("backend='triton' got a tensor on cpu") and "TRITON_INTERPRET=1" in line


@requires_cuda
def test_auto_on_cuda_picks_triton(monkeypatch):
    monkeypatch.delenv("GPT2_KERNELS_BACKEND", raising=False)
    monkeypatch.delenv("KERNELS_BACKEND", raising=False)
    x = torch.zeros(1, device="cuda")
    assert resolve_backend("auto", x) == "triton"
    monkeypatch.setenv("GPT2_KERNELS_BACKEND", "torch")
    assert resolve_backend("auto", x) == "torch"
