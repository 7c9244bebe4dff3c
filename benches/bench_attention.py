"""Causal attention: our Triton kernel vs PyTorch eager (written out) vs SDPA's flash backend.

CUDA: GPT-2 shapes B=8, H=12, D=64, T in {256, 1024, 4096}, bf16, forward and forward+backward,
and one decoding step (a single query per sequence against Tk in {1024, 4096} cached keys).
TFLOP/s counts the causal half of the matmuls: 4 B H T^2 D / 2 forward, 2.5x that backward
(FlashAttention's convention). Target on an H100: fwd+bwd at least as fast as SDPA flash for T >= 1024.
CPU: the PyTorch fallback (SDPA) vs eager at B=1, fp32, T in {256, 1024}; Triton only runs in the
interpreter there, whose speed means nothing.

    pytest benches/bench_attention.py            # --benchmark-only to skip nothing else
"""

import math

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

import gpt2_kernels
from benches.kernel_utils import make_call, run, table_fixture
from tests.conftest import requires_cuda

H, D = 12, 64
MODES = ["fwd", "fwd+bwd"]

table = table_fixture("causal attention: time per call, speed-up over PyTorch's built-in")


def eager_causal_attention(q, k, v):
    """nanoGPT's attention, op by op: the full T x T score matrix, masked, softmaxed in fp32."""
    T = q.shape[2]
    scores = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(q.shape[-1]))
    mask = torch.ones(T, T, dtype=torch.bool, device=q.device).tril()
    scores = scores.masked_fill(~mask, float("-inf"))
    return torch.softmax(scores.float(), dim=-1).to(q.dtype) @ v


def sdpa_flash(q, k, v):
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)


CUDA_IMPLS = {"triton": lambda q, k, v: gpt2_kernels.causal_attention(q, k, v, backend="triton"),
              "eager": eager_causal_attention, "builtin": sdpa_flash}
CPU_IMPLS = {"fallback": lambda q, k, v: gpt2_kernels.causal_attention(q, k, v, backend="torch"),
             "eager": eager_causal_attention}


def attention_flops(B, T, mode):
    forward = 4 * B * H * T * T * D / 2
    return forward if mode == "fwd" else 3.5 * forward


def bench(benchmark, table, impls, impl, B, T, mode, dtype, device):
    g = torch.Generator(device=device).manual_seed(0)
    qkv = [torch.randn(B, H, T, D, device=device, dtype=dtype, generator=g) for _ in range(3)]
    run(benchmark, table, make_call(impls[impl], qkv, mode), device=torch.device(device), impl=impl,
        group=f"{device} {str(dtype)[6:]} B{B} T{T} {mode}", flops=attention_flops(B, T, mode))


@requires_cuda
@pytest.mark.parametrize("impl", list(CUDA_IMPLS))
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("T", [256, 1024, 4096])
def test_attention_cuda(benchmark, table, T, mode, impl):
    bench(benchmark, table, CUDA_IMPLS, impl, 8, T, mode, torch.bfloat16, "cuda")


def sdpa_flash_decode(q, k, v):
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):  # one query sees every cached key: no mask
        return F.scaled_dot_product_attention(q, k, v)


@requires_cuda
@pytest.mark.parametrize("impl", ["triton", "builtin"])
@pytest.mark.parametrize("Tk", [1024, 4096])
def test_attention_decode_cuda(benchmark, table, Tk, impl):
    # One generation step with a KV cache: B=8 single queries against Tk cached keys; reading the
    # cache dominates, so GB/s (K and V read once) is the figure to watch.
    fn = {"triton": CUDA_IMPLS["triton"], "builtin": sdpa_flash_decode}[impl]
    B, dtype = 8, torch.bfloat16
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(B, H, T, D, device="cuda", dtype=dtype, generator=g) for T in (1, Tk, Tk))
    run(benchmark, table, make_call(fn, [q, k, v], "fwd"), device=torch.device("cuda"), impl=impl,
        group=f"cuda bfloat16 B{B} decode Tk{Tk} fwd", flops=4 * B * H * Tk * D,
        bytes_moved=2 * k.numel() * k.element_size())


@pytest.mark.parametrize("impl", list(CPU_IMPLS))
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("T", [256, 1024])
def test_attention_cpu(benchmark, table, T, mode, impl):
    bench(benchmark, table, CPU_IMPLS, impl, 1, T, mode, torch.float32, "cpu")
