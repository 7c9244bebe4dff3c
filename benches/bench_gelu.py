"""GELU (tanh): our Triton kernel vs PyTorch eager (written out) vs F.gelu(approximate="tanh").

CUDA: GPT-2 small's MLP activation (8, 1024, 3072) in bf16 and fp32, forward and forward+backward.
GB/s counts x in and y out forward, plus x and dy in and dx out backward. Target on an H100: at
least 90% of the memory-bandwidth roofline.
CPU: the PyTorch fallback vs eager on (1, 1024, 3072), fp32.
"""

import math

import pytest
import torch
import torch.nn.functional as F

import gpt2_kernels
from benches.kernel_utils import make_call, run, table_fixture
from tests.conftest import requires_cuda

MODES = ["fwd", "fwd+bwd"]

table = table_fixture("GELU: time per call, speed-up over PyTorch's built-in")


def eager_gelu(x):
    """GPT-2's gelu as written in its original code: five elementwise kernels."""
    return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3.0))))


CUDA_IMPLS = {"triton": lambda x: gpt2_kernels.gelu(x, backend="triton"), "eager": eager_gelu,
              "builtin": lambda x: F.gelu(x, approximate="tanh")}
CPU_IMPLS = {"fallback": lambda x: gpt2_kernels.gelu(x, backend="torch"), "eager": eager_gelu}


def bench(benchmark, table, impls, impl, shape, mode, dtype, device):
    x = torch.randn(shape, device=device, dtype=dtype, generator=torch.Generator(device=device).manual_seed(0))
    run(benchmark, table, make_call(impls[impl], [x], mode), device=torch.device(device), impl=impl,
        group=f"{device} {str(dtype)[6:]} {'x'.join(map(str, shape))} {mode}",
        bytes_moved=(2 if mode == "fwd" else 5) * x.numel() * x.element_size())


@requires_cuda
@pytest.mark.parametrize("impl", list(CUDA_IMPLS))
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_gelu_cuda(benchmark, table, dtype, mode, impl):
    bench(benchmark, table, CUDA_IMPLS, impl, (8, 1024, 3072), mode, dtype, "cuda")


@pytest.mark.parametrize("impl", list(CPU_IMPLS))
@pytest.mark.parametrize("mode", MODES)
def test_gelu_cpu(benchmark, table, mode, impl):
    bench(benchmark, table, CPU_IMPLS, impl, (1, 1024, 3072), mode, torch.float32, "cpu")
