"""Fused linear + cross-entropy (gpt2_kernels.linear_cross_entropy) vs F.cross_entropy(F.linear(...)).

GPT-2's output layer and loss: C=768 channels, V=50257 words. Timed forward only (`fwd`: the loss
under torch.no_grad, as in evaluation) and forward+backward (`fwd+bwd`: the loss and the gradients
of hidden and weight, as in training).

CPU: N=4096 tokens (a 4 x 1024 batch), fp32, `fused` (backend="torch", the chunked fallback) vs
`unfused`. Peak memory is measured in a fresh process per case: the growth of its peak resident set
over one call, from its resident set just before (torch's CPU allocations are invisible to
tracemalloc; see PEAK_RSS_CHILD).
CUDA: N=8192 (8 x 1024), bf16, `triton` (the fused Triton path) vs `unfused`; peak memory is
torch.cuda's peak allocation during one call.
TFLOP/s counts the three matmuls' 2·N·C·V FLOPs each (one forward).

    OMP_NUM_THREADS=1 pytest benches/bench_linear_cross_entropy.py --benchmark-timer=time.process_time
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import gpt2_kernels
from benches.kernel_utils import run, table_fixture
from tests.conftest import requires_cuda

ROOT = Path(__file__).resolve().parents[1]
C, V = 768, 50257
MODES = ["fwd", "fwd+bwd"]

table = table_fixture("linear + cross-entropy: time per call, peak memory, speed-up over the unfused loss")

IMPLS = {
    "fused": lambda h, w, t: gpt2_kernels.linear_cross_entropy(h, w, t, backend="torch"),
    "triton": lambda h, w, t: gpt2_kernels.linear_cross_entropy(h, w, t, backend="triton"),
    "unfused": lambda h, w, t: F.cross_entropy(F.linear(h, w).float(), t),
}


def make_inputs(N, dtype, device, requires_grad):
    g = torch.Generator(device=device).manual_seed(0)
    hidden = torch.randn(N, C, device=device, dtype=dtype, generator=g)
    weight = torch.randn(V, C, device=device, dtype=dtype, generator=g).mul_(0.02)  # in place: no temporary
    targets = torch.randint(0, V, (N,), device=device, generator=g)
    return hidden.requires_grad_(requires_grad), weight.requires_grad_(requires_grad), targets


def make_loss_call(fn, hidden, weight, targets, mode):
    if mode == "fwd":
        def call():
            with torch.no_grad():
                return fn(hidden, weight, targets)
        return call
    return lambda: torch.autograd.grad(fn(hidden, weight, targets), (hidden, weight))


# One case in a fresh process; prints the growth of its peak resident set (MiB) over one call: the
# kernel's high-water mark VmHWM, reset to the current resident set just before the call (Linux's
# clear_refs), so neither the set-up's transient peaks nor the parent's count. (getrusage's ru_maxrss
# is the same mark but never resets, and a child spawned by a large process inherits its parent's.)
PEAK_RSS_CHILD = r"""
import json, sys, torch
from benches.bench_linear_cross_entropy import IMPLS, make_inputs, make_loss_call

def status_kib(field):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))

impl, mode, N = sys.argv[1], sys.argv[2], int(sys.argv[3])
torch.set_num_threads(1)
call = make_loss_call(IMPLS[impl], *make_inputs(N, torch.float32, "cpu", mode != "fwd"), mode)
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # VmHWM := VmRSS
resident = status_kib("VmRSS")
call()
print(json.dumps({"growth_mib": (status_kib("VmHWM") - resident) / 1024}))
"""


def peak_rss_growth_mib(impl: str, mode: str, N: int) -> float:
    # Without TRITON_INTERPRET (which the tests' set-up may have set): not needed by the CPU path, and
    # its import changes the allocator's state (glibc raises its mmap threshold after large frees).
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    result = subprocess.run([sys.executable, "-c", PEAK_RSS_CHILD, impl, mode, str(N)], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=600, check=True)
    return json.loads(result.stdout.splitlines()[-1])["growth_mib"]


def bench(benchmark, table, impl, N, mode, dtype, device):
    inputs = make_inputs(N, dtype, device, mode != "fwd")
    flops = 2 * N * C * V * (1 if mode == "fwd" else 3)
    run(benchmark, table, make_loss_call(IMPLS[impl], *inputs, mode), device=torch.device(device),
        impl="builtin" if impl == "unfused" else impl, group=f"{device} {str(dtype)[6:]} N{N} C{C} V{V} {mode}",
        flops=flops)


@pytest.mark.parametrize("impl", ["fused", "unfused"])
@pytest.mark.parametrize("mode", MODES)
def test_linear_cross_entropy_cpu(benchmark, table, mode, impl):
    N = 4096
    bench(benchmark, table, impl, N, mode, torch.float32, "cpu")
    if benchmark.stats is not None:
        growth = peak_rss_growth_mib(impl, mode, N)
        benchmark.extra_info["peak_rss_growth_mib"] = growth
        table[-1]["peak_mib"] = growth  # the table's peak column: RSS growth on the CPU


@requires_cuda
@pytest.mark.parametrize("impl", ["triton", "unfused"])
@pytest.mark.parametrize("mode", MODES)
def test_linear_cross_entropy_cuda(benchmark, table, mode, impl):
    bench(benchmark, table, impl, 8192, mode, torch.bfloat16, "cuda")
