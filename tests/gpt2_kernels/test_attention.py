"""gpt2_kernels.causal_attention against a step-by-step float64 reference, on both backends.

On CPU the Triton kernels run under the interpreter (tests/conftest.py sets TRITON_INTERPRET=1),
so shapes stay small; they still cross the 32-wide interpreter tiles (T = 1, 17, 64, 129).
"""

import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import gpt2_kernels
from gpt2_kernels import attention
from tests.conftest import requires_cuda
from tests.gpt2_kernels.conftest import BACKENDS, DEVICE, requires_triton

ROOT = Path(__file__).resolve().parents[2]

# (atol, rtol) for outputs and gradients compared with the float64 reference.
TOLERANCES = {torch.float32: (2e-5, 2e-5), torch.float16: (1e-2, 1e-2), torch.bfloat16: (5e-2, 5e-2)}

# (B, H, Tq, Tk, D): tile edges, B*H > 1, every supported head dim, and Tq < Tk (KV-cache decoding).
SHAPES = [
    (2, 2, 1, 1, 16),
    (1, 3, 17, 17, 32),
    (2, 1, 64, 64, 64),
    (1, 2, 129, 129, 16),
    (1, 2, 17, 100, 64),
    (1, 1, 64, 129, 32),
    (2, 1, 1, 129, 128),
    (1, 1, 33, 33, 128),
]


def reference_causal_attention(q, k, v, scale=None):
    """softmax(q k^T * scale, keys after each query's absolute position masked) v, in float64."""
    q, k, v = q.double(), k.double(), v.double()
    Tq, Tk, D = q.shape[2], k.shape[2], q.shape[3]
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    scores = q @ k.transpose(-1, -2) * scale
    query_pos = torch.arange(Tq)[:, None] + (Tk - Tq)
    key_pos = torch.arange(Tk)[None, :]
    scores = scores.masked_fill(key_pos > query_pos, float("-inf"))
    scores = scores - scores.amax(dim=-1, keepdim=True)
    weights = scores.exp()
    weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights @ v


def make_qkv(B, H, Tq, Tk, D, dtype, device=DEVICE, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, H, T, D, generator=g).to(device=device, dtype=dtype).requires_grad_()
               for T in (Tq, Tk, Tk))
    return q, k, v


def check_against_reference(q, k, v, backend, scale=None, grad_out=None):
    out = gpt2_kernels.causal_attention(q, k, v, scale=scale, backend=backend)
    assert out.shape == q.shape and out.dtype == q.dtype
    expected = reference_causal_attention(q.detach().cpu(), k.detach().cpu(), v.detach().cpu(), scale)
    if grad_out is None:
        grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(out)
    grads = torch.autograd.grad(out, (q, k, v), grad_out)
    qr, kr, vr = (t.detach().cpu().double().requires_grad_() for t in (q, k, v))
    expected_grads = torch.autograd.grad(reference_causal_attention(qr, kr, vr, scale), (qr, kr, vr),
                                         grad_out.detach().cpu().double())
    atol, rtol = TOLERANCES[q.dtype]
    torch.testing.assert_close(out.detach().cpu().double(), expected, atol=atol, rtol=rtol)
    for name, got, want in zip(("dq", "dk", "dv"), grads, expected_grads):
        torch.testing.assert_close(got.cpu().double(), want, atol=atol, rtol=rtol, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B{}H{}Tq{}Tk{}D{}".format(*s))
def test_matches_reference(shape, dtype, backend):
    check_against_reference(*make_qkv(*shape, dtype), backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous_inputs_and_custom_scale(backend):
    # The model's layout: one (B, T, 3, H, D) projection split and transposed to (B, H, T, D) views,
    # plus a non-contiguous upstream gradient.
    B, T, H, D = 2, 40, 2, 32
    qkv = torch.randn(B, T, 3, H, D, generator=torch.Generator().manual_seed(0)).to(DEVICE).requires_grad_()
    q, k, v = (qkv[:, :, i].transpose(1, 2) for i in range(3))
    assert not q.is_contiguous()
    grad_out = torch.randn(B, H, D, T, device=DEVICE).transpose(-1, -2)
    check_against_reference(q, k, v, backend, scale=0.3, grad_out=grad_out)


@requires_triton
def test_triton_never_reads_keys_past_tk():
    # k and v are views into buffers poisoned with NaN after Tk: any read past the end shows up.
    B, H, Tq, Tk, D = 1, 2, 20, 45, 16
    q, _, _ = make_qkv(B, H, Tq, Tk, D, torch.float32)
    k_buf, v_buf = torch.full((2, B, H, 64, D), float("nan"), device=DEVICE).unbind(0)
    k_buf[:, :, :Tk], v_buf[:, :, :Tk] = torch.randn(2, B, H, Tk, D, device=DEVICE)
    k, v = (t[:, :, :Tk].requires_grad_() for t in (k_buf.clone(), v_buf.clone()))
    check_against_reference(q, k, v, "triton")


@requires_triton
def test_decode_step_equals_last_row_of_full_attention():
    # With a KV cache, the last query alone must see exactly what it saw in the full sequence.
    q, k, v = make_qkv(1, 2, 50, 50, 16, torch.float32)
    full = gpt2_kernels.causal_attention(q, k, v, backend="triton")
    last = gpt2_kernels.causal_attention(q[:, :, -1:], k, v, backend="triton")
    torch.testing.assert_close(last, full[:, :, -1:], atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("Tq,Tk", [(4, 4), (3, 6)])
def test_gradcheck_fallback(Tq, Tk):
    q, k, v = make_qkv(1, 2, Tq, Tk, 4, torch.float64)
    assert torch.autograd.gradcheck(lambda *t: gpt2_kernels.causal_attention(*t, backend="torch"), (q, k, v), fast_mode=True)


def test_bad_inputs_raise_clear_errors():
    q = torch.randn(1, 2, 8, 16)
    with pytest.raises(ValueError, match="Tk >= Tq"):
        gpt2_kernels.causal_attention(q, q[:, :, :4], q[:, :, :4])
    with pytest.raises(ValueError, match="4-D"):
        gpt2_kernels.causal_attention(q[0], q[0], q[0])
    with pytest.raises(ValueError, match="k and v must be"):
        gpt2_kernels.causal_attention(q, q, q[:, :1])
    with pytest.raises(ValueError, match="unknown kernels backend"):
        gpt2_kernels.causal_attention(q, q, q, backend="cuda")


@requires_triton
def test_inputs_the_triton_kernel_cannot_take_raise_clear_errors():
    for x in (torch.randn(1, 1, 4, 48, device=DEVICE), torch.randn(1, 1, 4, 16, device=DEVICE, dtype=torch.float64)):
        with pytest.raises(ValueError, match="the Triton kernel needs head dim in"):
            gpt2_kernels.causal_attention(x, x, x, backend="triton")
    if DEVICE == "cpu":
        with pytest.raises(ValueError, match="interpreter computes bf16 matmuls wrongly"):
            x = torch.randn(1, 1, 4, 16, dtype=torch.bfloat16)
            gpt2_kernels.causal_attention(x, x, x, backend="triton")


def output_and_grads(q, k, v, backend, grad_out):
    out = gpt2_kernels.causal_attention(q, k, v, backend=backend)
    return [out.detach(), *torch.autograd.grad(out, (q, k, v), grad_out)]


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("shape", [(2, 4, 1024, 1024, 64), (2, 3, 300, 300, 128), (3, 2, 17, 777, 32),
                                   (1, 2, 1, 2049, 64), (1, 1, 500, 500, 16)],
                         ids=lambda s: "B{}H{}Tq{}Tk{}D{}".format(*s))
def test_cuda_error_at_most_twice_pytorchs(shape, dtype):
    # Over long rows a fixed tolerance is either loose or flaky in 16-bit, so (as FlashAttention's
    # own tests do) our error against float64 must be at most twice that of PyTorch's SDPA in the
    # same dtype, plus a small floor, for the output and each gradient.
    q, k, v = make_qkv(*shape, dtype, device="cuda")
    grad_out = torch.randn(q.shape, device="cuda", dtype=dtype)
    exact = output_and_grads(*(t.detach().double().requires_grad_() for t in (q, k, v)), "torch", grad_out.double())
    ours = output_and_grads(q, k, v, "triton", grad_out)
    pytorch = output_and_grads(q, k, v, "torch", grad_out)
    for name, mine, theirs, want in zip(("out", "dq", "dk", "dv"), ours, pytorch, exact):
        our_error = (mine.double() - want).abs().max().item()
        pytorch_error = (theirs.double() - want).abs().max().item()
        assert our_error <= 2 * pytorch_error + 1e-5, f"{name}: error {our_error:.3g} vs PyTorch's {pytorch_error:.3g}"


# Every tile the autotuner can pick on a GPU, as (BLOCK_M, BLOCK_N): each must give the same results.
CANDIDATE_TILES = sorted({tile[:2] for tiles in attention._CANDIDATES.values() for tile in tiles})


@requires_triton
@pytest.mark.skipif(DEVICE != "cpu", reason="on a GPU the autotuner picks the tiles")
@pytest.mark.parametrize("tile", CANDIDATE_TILES, ids=lambda t: "M{}N{}".format(*t))
def test_every_candidate_tile_is_correct_on_the_interpreter(tile, monkeypatch):
    # The interpreter runs whatever tile it is given: run every candidate through the three kernels
    # (training, and decoding with a KV cache), with lengths that leave partial tiles.
    monkeypatch.setattr(attention, "_INTERPRETER_TILES", (*tile, 4, 1))
    check_against_reference(*make_qkv(1, 2, 150, 150, 16, torch.float32), "triton")
    check_against_reference(*make_qkv(1, 1, 3, 150, 16, torch.float32), "triton")


def test_autotuner_prunes_to_the_tile_space():
    # Without the interpreter the kernels are wrapped in triton.autotune; its prune hook must keep
    # exactly the tiles of _tile_space for the launch's head dim, dtype, Tq and GPU (here an H100's
    # shared memory and a small one's, given as the device property Triton reports).
    pytest.importorskip("triton")
    script = textwrap.dedent("""
        import torch
        from gpt2_kernels import attention
        assert set(attention._TUNED) == {"fwd", "dkdv", "dq"}
        for shared in (attention.H100_SHARED_MEMORY, 48 * 1024):
            attention._max_shared = lambda device, shared=shared: shared
            for kernel, tuned in attention._TUNED.items():
                assert tuned.keys == ["HEAD_DIM", "PRECISION", "tq_bucket", "tk_bucket"]
                for dtype, head_dim, Tq in [(torch.bfloat16, 64, 1024), (torch.float16, 128, 1), (torch.float32, 128, 7),
                                            (torch.float32, 32, 4096)]:
                    q = torch.empty(1, dtype=dtype)
                    kept = attention._prune(kernel, tuned.configs, {"Q": q, "Tq": Tq}, HEAD_DIM=head_dim, PRECISION="x")
                    tiles = [(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages) for c in kept]
                    want = attention._tile_space(kernel, head_dim, dtype, Tq, shared)
                    assert tiles == want and want, (kernel, dtype, head_dim, Tq, shared, tiles, want)
                    assert all(attention._fits("decode" if kernel == "fwd" and Tq <= 16 else kernel, t, head_dim,
                                               q.element_size(), shared) for t in tiles) or len(tiles) == 1
        print("ok")
    """)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "-c", script], env={**env, "PYTHONPATH": str(ROOT)}, cwd=ROOT,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-3000:]
