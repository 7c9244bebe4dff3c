"""gpt2_kernels.cpu_linear's fp32 linear layer and one-query attention (the int8 layer is tested in
test_int8_linear.py): values against float64 references, every tile shape and tail, threads, both
builds (AVX-512 and AVX2) where this CPU runs them, and the checks of their arguments."""

from __future__ import annotations

import math
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from gpt2_kernels import cpu_linear


@pytest.fixture(autouse=True)
def require_cpu_kernel():
    if not cpu_linear.available():
        pytest.skip(f"the CPU kernels cannot run here: {cpu_linear.unavailable_reason()}")


def randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def with_threads(n, fn):
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        return fn()
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("has_bias", [True, False], ids=["bias", "no-bias"])
@pytest.mark.parametrize("M", range(1, cpu_linear.F32_MAX_ROWS + 1))
@pytest.mark.parametrize("N, K", [(37, 100), (8, 16), (130, 768), (3, 7)])
def test_f32_linear_matches_reference(M, N, K, has_bias):
    """Every row-block shape (1, 2, 3-4 rows per tile), partial blocks of weight rows (N = 37, 130, 3),
    tails after the 8- or 16-wide vectors (K = 100, 7); rows with a stride longer than K. Two threads
    give the same bits as one (each output is summed by one thread in one order)."""
    weight, bias = randn(N, K, seed=1), randn(N, seed=2) if has_bias else None
    x = randn(M, K + 5)[:, :K]
    y = cpu_linear.linear(x, weight, None, bias)
    want = x.double() @ weight.double().T + (0 if bias is None else bias.double())
    torch.testing.assert_close(y.double(), want, atol=1e-4 * math.sqrt(K), rtol=1e-5)
    assert torch.equal(with_threads(2, lambda: cpu_linear.linear(x, weight, None, bias)), y)


def test_f32_linear_refuses_what_it_cannot_read():
    weight = randn(4, 8)
    for bad in [dict(x=randn(cpu_linear.F32_MAX_ROWS + 1, 8)), dict(weight=randn(8, 4).t()),
                dict(scale=torch.ones(4)), dict(x=randn(2, 8).double()), dict(bias=torch.ones(4, dtype=torch.float64))]:
        args = dict(x=randn(2, 8), weight=weight, scale=None, bias=None) | bad
        with pytest.raises(ValueError, match="cpu_linear.linear"):
            cpu_linear.linear(**args)


def attention_reference(q, k_cache, v_cache, length):
    """(B, H, D) float64: softmax over the first ``length`` cached positions."""
    scores = torch.einsum("bhd,bhld->bhl", q.double(), k_cache[:, :, :length].double()) / math.sqrt(q.shape[-1])
    return torch.einsum("bhl,bhld->bhd", scores.softmax(-1), v_cache[:, :, :length].double())


@pytest.mark.parametrize("B, H, D, length", [(1, 12, 64, 1), (1, 12, 64, 300), (3, 4, 16, 17), (2, 2, 40, 9), (1, 1, 5, 4)])
def test_attend_one_matches_reference_and_writes_the_cache(B, H, D, length):
    """q, k and v as decoding makes them (views of one (B, 3, H, D) tensor: strides of 3 * H * D
    between rows), head sizes with and without a tail after 16 lanes; the new key and value land at
    position length - 1 and nowhere else."""
    Lmax = length + 3
    k_cache, v_cache = randn(B, H, Lmax, D, seed=1), randn(B, H, Lmax, D, seed=2)
    k_before, v_before = k_cache.clone(), v_cache.clone()
    q, k, v = (randn(B, 3, H, D, seed=3) * 3).unbind(1)
    out = cpu_linear.attend_one(q, k, v, k_cache, v_cache, length)
    assert torch.equal(k_cache[:, :, length - 1], k) and torch.equal(v_cache[:, :, length - 1], v)
    others = [i for i in range(Lmax) if i != length - 1]
    assert torch.equal(k_cache[:, :, others], k_before[:, :, others]) and torch.equal(v_cache[:, :, others], v_before[:, :, others])
    torch.testing.assert_close(out.double(), attention_reference(q, k_cache, v_cache, length), atol=1e-5, rtol=1e-5)
    k_cache[:, :, length - 1], v_cache[:, :, length - 1] = k_before[:, :, length - 1], v_before[:, :, length - 1]
    again = with_threads(2, lambda: cpu_linear.attend_one(q, k, v, k_cache, v_cache, length))
    assert torch.equal(again, out)


def test_attend_one_refuses_mismatched_arguments():
    k_cache = v_cache = randn(1, 2, 8, 4)
    q = randn(1, 2, 4)
    for args in [(q, q, q, k_cache, v_cache, 9), (q, q, q, k_cache, v_cache, 0), (q, q.double(), q, k_cache, v_cache, 2),
                 (q, randn(1, 2, 8)[:, :, :4], q, k_cache, v_cache, 2), (q, q, q, randn(1, 2, 8, 5), v_cache, 2)]:
        with pytest.raises(ValueError, match="attend_one"):
            cpu_linear.attend_one(*args)


def test_avx2_build_gives_the_same_values(tmp_path):
    """Where PyTorch dispatches to AVX-512 the library is built for it; ATEN_CPU_CAPABILITY=avx2 gets the
    AVX2 build (its own cache entry), whose values agree with it to rounding."""
    if torch.backends.cpu.get_cpu_capability() != "AVX512":
        pytest.skip("this CPU runs the AVX2 build only")
    script = textwrap.dedent("""
        import sys, torch
        from gpt2_kernels import cpu_linear
        g = torch.Generator().manual_seed(0)
        x, w, wi = torch.randn(3, 100, generator=g), torch.randn(37, 100, generator=g), torch.randint(-127, 128, (37, 100), dtype=torch.int8, generator=g)
        q, kc, vc = torch.randn(2, 4, 24, generator=g), torch.randn(2, 4, 9, 24, generator=g), torch.randn(2, 4, 9, 24, generator=g)
        out = [cpu_linear.linear(x, w, None, None), cpu_linear.linear(x, wi, torch.ones(37), None), cpu_linear.attend_one(q, q, q, kc, vc, 5)]
        torch.save({"flags": cpu_linear.flags(), "out": out}, sys.argv[1])
    """)
    results = {}
    for capability in ("avx512", "avx2"):
        env = dict(os.environ, ATEN_CPU_CAPABILITY=capability, **{cpu_linear.CACHE_ENV: str(tmp_path / "cache")})
        subprocess.run([sys.executable, "-c", script, str(tmp_path / capability)], env=env, check=True, timeout=300)
        results[capability] = torch.load(tmp_path / capability, weights_only=True)
    assert "-mavx512f" in results["avx512"]["flags"] and "-mavx512f" not in results["avx2"]["flags"]
    assert len(list((tmp_path / "cache").glob("cpu_linear-*.so"))) == 2
    for a, b in zip(results["avx512"]["out"], results["avx2"]["out"]):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-5)


def test_gelu_matches_pytorch():
    """cpu_layer.c's GELU (a rational tanh) against float64: within 1e-6 over the range where it bends,
    as PyTorch's own fp32 GELU is."""
    x = torch.linspace(-12, 12, 20001)
    y = x.clone()
    cpu_linear._load()[0].gelu_tanh_f32(y.data_ptr(), y.numel())
    want = torch.nn.functional.gelu(x.double(), approximate="tanh")
    torch.testing.assert_close(y.double(), want, atol=1e-6, rtol=1e-6)


def test_blocks_refuse_what_they_cannot_read():
    """cpu_decode.Blocks checks every tensor once, when it takes their pointers (the values of a whole
    step are tested against the model's forward in tests/gpt/test_decode.py)."""
    from types import SimpleNamespace

    from gpt2_kernels.cpu_decode import Blocks

    C, H = 8, 2

    def lin(out_features, in_features, dtype=torch.float32):
        return SimpleNamespace(weight=randn(out_features, in_features).to(dtype), scale=None, bias=randn(out_features))

    def block(**changes):
        parts = dict(ln_1=(torch.ones(C), None), ln_2=(torch.ones(C), torch.zeros(C)), c_attn=lin(3 * C, C), attn_proj=lin(C, C),
                     c_fc=lin(4 * C, C), mlp_proj=lin(C, 4 * C))
        return SimpleNamespace(**(parts | changes))

    cache = [torch.zeros(1, H, 6, C // H)]
    blocks = Blocks([block()], cache, [torch.zeros(1, H, 6, C // H)], n_head=H, eps=1e-5)
    x = randn(1, C)
    blocks.run(x, 1)
    with pytest.raises(ValueError, match="length"):
        blocks.run(x, 7)
    for bad in [dict(c_fc=lin(4 * C, C + 1)), dict(attn_proj=lin(C, C, torch.float64)), dict(ln_1=(torch.ones(C + 1), None)),
                dict(c_attn=SimpleNamespace(weight=randn(C, 3 * C).t(), scale=None, bias=None))]:
        with pytest.raises(ValueError, match="cpu_decode.Blocks"):
            Blocks([block(**bad)], cache, cache, n_head=H, eps=1e-5)
    with pytest.raises(ValueError, match="caches"):
        Blocks([block()], [torch.zeros(1, H, 6, C)], [torch.zeros(1, H, 6, C)], n_head=H, eps=1e-5)
