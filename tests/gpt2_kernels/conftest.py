"""Shared by the kernel tests: where Triton is not installed (it ships for Linux only), the Triton
cases skip with a reason and the PyTorch fallback is still tested."""

import importlib.util

import pytest
import torch

requires_triton = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="Triton is not installed")

# Both backends of an op; on the CPU "triton" runs under the interpreter (see tests/conftest.py).
BACKENDS = [pytest.param("triton", marks=requires_triton), "torch"]

# The small tests run where the kernels really run: on the GPU when there is one, otherwise on the
# CPU under the Triton interpreter (tests/conftest.py turns it on only when there is no GPU).
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
