"""LayerNorm: our Triton kernel vs PyTorch eager (written out) vs F.layer_norm.

CUDA: GPT-2 activations, 8 x 1024 rows of N in {768, 1024, 1280, 1600} (small .. xl), bf16,
forward and forward+backward. GB/s counts the bytes the op must move at least: x in and y out
forward, plus x and dy in and dx out backward (weights and statistics are noise). Target on an H100:
at least 90% of the memory-bandwidth roofline.
CPU: the PyTorch fallback (F.layer_norm) vs eager, 1024 rows, fp32.
"""

import pytest
import torch
import torch.nn.functional as F

import gpt2_kernels
from benches.kernel_utils import make_call, run, table_fixture
from tests.conftest import requires_cuda

MODES = ["fwd", "fwd+bwd"]

table = table_fixture("LayerNorm: time per call, speed-up over PyTorch's built-in")


def eager_layer_norm(x, weight, bias, eps=1e-5):
    """LayerNorm op by op, statistics in fp32."""
    x32 = x.float()
    mean = x32.mean(dim=-1, keepdim=True)
    var = (x32 - mean).pow(2).mean(dim=-1, keepdim=True)
    return ((x32 - mean) * torch.rsqrt(var + eps) * weight + bias).to(x.dtype)


CUDA_IMPLS = {"triton": lambda x, w, b: gpt2_kernels.layer_norm(x, w, b, backend="triton"), "eager": eager_layer_norm,
              "builtin": lambda x, w, b: F.layer_norm(x, x.shape[-1:], w, b)}
CPU_IMPLS = {"fallback": lambda x, w, b: gpt2_kernels.layer_norm(x, w, b, backend="torch"), "eager": eager_layer_norm}


def bench(benchmark, table, impls, impl, rows, N, mode, dtype, device):
    g = torch.Generator(device=device).manual_seed(0)
    inputs = [torch.randn(rows, N, device=device, dtype=dtype, generator=g),
              torch.randn(N, device=device, dtype=dtype, generator=g), torch.randn(N, device=device, dtype=dtype, generator=g)]
    tensor_bytes = rows * N * inputs[0].element_size()
    run(benchmark, table, make_call(impls[impl], inputs, mode), device=torch.device(device), impl=impl,
        group=f"{device} {str(dtype)[6:]} {rows}x{N} {mode}", bytes_moved=(2 if mode == "fwd" else 5) * tensor_bytes)


@requires_cuda
@pytest.mark.parametrize("impl", list(CUDA_IMPLS))
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("N", [768, 1024, 1280, 1600])
def test_layer_norm_cuda(benchmark, table, N, mode, impl):
    bench(benchmark, table, CUDA_IMPLS, impl, 8 * 1024, N, mode, torch.bfloat16, "cuda")


@pytest.mark.parametrize("impl", list(CPU_IMPLS))
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("N", [768, 1600])
def test_layer_norm_cpu(benchmark, table, N, mode, impl):
    bench(benchmark, table, CPU_IMPLS, impl, 1024, N, mode, torch.float32, "cpu")
