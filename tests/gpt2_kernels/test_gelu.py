"""gpt2_kernels.gelu / GELU against the tanh formula written out in float64, on both backends."""

import math

import pytest
import torch

import gpt2_kernels
from gpt2_kernels import memory_plan
from gpt2_kernels.memory_plan import recompute_gelu
from tests.conftest import requires_cuda
from tests.gpt2_kernels.conftest import BACKENDS, DEVICE

TOLERANCES = {torch.float32: (1e-5, 1e-5), torch.float16: (1e-3, 1e-3), torch.bfloat16: (1e-2, 1e-2)}


def reference_gelu(x):
    x = x.double()
    inner = math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)
    return 0.5 * x * (1.0 + torch.tanh(inner))


def check_against_reference(x, backend):
    y = gpt2_kernels.gelu(x, backend=backend)
    assert y.shape == x.shape and y.dtype == x.dtype
    grad_out = torch.randn(y.shape, generator=torch.Generator().manual_seed(1)).to(y)
    (dx,) = torch.autograd.grad(y, x, grad_out)
    x_ref = x.detach().cpu().double().requires_grad_()
    expected = reference_gelu(x_ref)
    (expected_dx,) = torch.autograd.grad(expected, x_ref, grad_out.cpu().double())
    atol, rtol = TOLERANCES[x.dtype]
    torch.testing.assert_close(y.detach().cpu().double(), expected, atol=atol, rtol=rtol)
    torch.testing.assert_close(dx.cpu().double(), expected_dx, atol=atol, rtol=rtol, msg=lambda m: f"dx: {m}")


def make_input(shape, dtype, device=DEVICE):
    x = torch.randn(shape, generator=torch.Generator().manual_seed(0)) * 4
    return x.to(device=device, dtype=dtype).requires_grad_()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("shape", [(0,), (1,), (3, 1000), (2, 3, 5, 7), (4, 1025)], ids=str)
def test_matches_reference(shape, dtype, backend):
    check_against_reference(make_input(shape, dtype), backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous_and_extreme_inputs(backend):
    x = torch.cat([torch.linspace(-30, 30, 601), torch.tensor([0.0, -0.0, 1e-8, -1e-8])])
    x = x.reshape(5, 121).t().to(DEVICE).requires_grad_()  # transposed: strides (1, 121)
    assert not x.is_contiguous()
    check_against_reference(x, backend)
    strided = make_input((6, 40), torch.float32).detach()[::2, ::3].requires_grad_()
    check_against_reference(strided, backend)


def test_gradcheck_fallback():
    assert torch.autograd.gradcheck(lambda x: gpt2_kernels.gelu(x, backend="torch"), make_input((4, 5), torch.float64))


@pytest.mark.parametrize("backend", BACKENDS)
def test_module(backend):
    x = make_input((2, 9), torch.float32).detach()
    torch.testing.assert_close(gpt2_kernels.GELU(backend=backend)(x), reference_gelu(x).float())


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("shape", [(8, 1024, 3072), (3, 1001, 7)], ids=str)
def test_cuda_matches_reference(shape, dtype):
    check_against_reference(make_input(shape, dtype, device="cuda"), "triton")
    x = make_input(shape, dtype, device="cuda").detach().transpose(0, -1)
    torch.testing.assert_close(gpt2_kernels.gelu(x, backend="triton"), reference_gelu(x).to(dtype),
                               atol=TOLERANCES[dtype][0], rtol=TOLERANCES[dtype][1])


# ---------------------------------------------------------------------------------------------- gelu_linear


def reference_gelu_linear(x, weight, bias):
    return torch.nn.functional.linear(reference_gelu(x), weight.double(), None if bias is None else bias.double())


@pytest.mark.parametrize("save_memory", ["always", "never", "auto"])
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "no-bias"])
def test_gelu_linear_matches_reference_values_and_gradients(backend, with_bias, save_memory):
    g = torch.Generator().manual_seed(2)
    x = (torch.randn(3, 7, 40, generator=g) * 3).to(DEVICE).requires_grad_()
    weight = (torch.randn(24, 40, generator=g) * 0.1).to(DEVICE).requires_grad_()
    bias = (torch.randn(24, generator=g)).to(DEVICE).requires_grad_() if with_bias else None
    y = gpt2_kernels.gelu_linear(x, weight, bias, backend=backend, save_memory=save_memory)
    grad_out = torch.randn(y.shape, generator=g).to(y)
    inputs = [x, weight] + ([bias] if with_bias else [])
    grads = torch.autograd.grad(y, inputs, grad_out)
    refs = [t.detach().cpu().double().requires_grad_() for t in inputs]
    expected = reference_gelu_linear(refs[0], refs[1], refs[2] if with_bias else None)
    expected_grads = torch.autograd.grad(expected, refs, grad_out.cpu().double())
    torch.testing.assert_close(y.detach().cpu().double(), expected, atol=1e-5, rtol=1e-5)
    for name, got, want in zip(("dx", "dweight", "dbias"), grads, expected_grads):
        torch.testing.assert_close(got.cpu().double(), want, atol=1e-4, rtol=1e-5, msg=lambda m: f"{name}: {m}")


def saved_for_backward(fn):
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.shape) or t, lambda t: t):
        fn()
    return saved


def test_gelu_linear_saving_memory_keeps_only_its_input_for_the_backward():
    x = torch.randn(64, 96, requires_grad=True)
    weight, bias = torch.randn(32, 96, requires_grad=True), torch.randn(32, requires_grad=True)
    saved = saved_for_backward(lambda: gpt2_kernels.gelu_linear(x, weight, bias, backend="torch", save_memory="always"))
    assert saved == [x.shape, weight.shape]  # not the GELU's output (64 x 96 as well)
    # The plain path: x for the GELU, its output and the weight for the linear layer.
    saved = saved_for_backward(lambda: gpt2_kernels.gelu_linear(x, weight, bias, backend="torch", save_memory="never"))
    assert saved == saved_for_backward(lambda: torch.nn.functional.linear(gpt2_kernels.gelu(x, backend="torch"), weight, bias))
    assert len(saved) == 3


def test_gelu_linear_recomputes_from_the_threshold_on(monkeypatch):
    # One element below GELU_RECOMPUTE_MIN_BYTES the output is kept; at it, recomputed. GPT-2 124M in
    # fp32 (C=768, a 3072-wide GELU): kept up to 1023 tokens, recomputed from 1024 on.
    monkeypatch.delenv(gpt2_kernels.SAVE_MEMORY_ENV_VAR, raising=False)
    limit = memory_plan.GELU_RECOMPUTE_MIN_BYTES
    assert not recompute_gelu(limit // 4 - 1, torch.float32) and recompute_gelu(limit // 4, torch.float32)
    assert not recompute_gelu(limit // 2 - 1, torch.bfloat16) and recompute_gelu(limit // 2, torch.bfloat16)
    assert not recompute_gelu(1023 * 3072, torch.float32) and recompute_gelu(1024 * 3072, torch.float32)
    assert recompute_gelu(1, torch.float32, save_memory="always") and not recompute_gelu(10**9, torch.float32, save_memory="never")
    monkeypatch.setenv(gpt2_kernels.SAVE_MEMORY_ENV_VAR, "always")
    assert recompute_gelu(1, torch.float32)
    # Both sides of the threshold, shrunk to a small input: the same values and gradients.
    monkeypatch.delenv(gpt2_kernels.SAVE_MEMORY_ENV_VAR)
    monkeypatch.setattr(memory_plan, "GELU_RECOMPUTE_MIN_BYTES", 64 * 96 * 4)
    g = torch.Generator().manual_seed(3)
    weight, bias = torch.randn(32, 96, generator=g, requires_grad=True), torch.randn(32, generator=g, requires_grad=True)
    for rows, n_saved in [(63, 3), (64, 2)]:
        x = torch.randn(rows, 96, generator=g, requires_grad=True)
        assert len(saved_for_backward(lambda: gpt2_kernels.gelu_linear(x, weight, bias, backend="torch"))) == n_saved
        y = gpt2_kernels.gelu_linear(x, weight, bias, backend="torch")
        grad_out = torch.randn(y.shape, generator=g)
        grads = torch.autograd.grad(y, (x, weight, bias), grad_out)
        refs = [t.detach().double().requires_grad_() for t in (x, weight, bias)]
        expected = reference_gelu_linear(*refs)
        torch.testing.assert_close(y.detach().double(), expected, atol=1e-5, rtol=1e-5)
        for got, want in zip(grads, torch.autograd.grad(expected, refs, grad_out.double())):
            torch.testing.assert_close(got.double(), want, atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("save_memory", ["always", "never"])
def test_gelu_linear_under_autocast_computes_in_the_autocast_dtype(save_memory):
    x = torch.randn(4, 16, requires_grad=True)
    weight, bias = torch.randn(8, 16, requires_grad=True), torch.randn(8, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = gpt2_kernels.gelu_linear(x, weight, bias, backend="torch", save_memory=save_memory)
        expected = torch.nn.functional.linear(gpt2_kernels.gelu(x, backend="torch"), weight, bias)
    assert y.dtype == expected.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), expected.float(), atol=2e-2, rtol=2e-2)
    y.float().sum().backward()
    assert x.grad.dtype == weight.grad.dtype == torch.float32
