"""gpt2_kernels.layer_norm / LayerNorm against a step-by-step float64 reference, on both backends."""

import pytest
import torch

import gpt2_kernels
from tests.conftest import requires_cuda
from tests.gpt2_kernels.conftest import BACKENDS, DEVICE, requires_triton

TOLERANCES = {torch.float32: (1e-5, 1e-5), torch.float16: (5e-3, 5e-3), torch.bfloat16: (3e-2, 3e-2)}

# Leading shapes with enough rows that each backward program reduces several of them; row lengths
# that are not powers of two (GPT-2's 768, 1000, 1600), tiny ones, no rows at all, and the 8192 maximum.
SHAPES = [(37, 768), (2, 5, 1000), (9, 1600), (4, 3, 7), (1, 5), (0, 16), (3, 8192)]
AFFINE = [(True, True), (True, False), (False, True), (False, False)]


def reference_layer_norm(x, weight, bias, eps):
    x = x.double()
    mean = x.mean(dim=-1, keepdim=True)
    var = ((x - mean) ** 2).mean(dim=-1, keepdim=True)  # biased, as LayerNorm defines it
    y = (x - mean) / torch.sqrt(var + eps)
    if weight is not None:
        y = y * weight.double()
    if bias is not None:
        y = y + bias.double()
    return y


def make_inputs(shape, dtype, has_weight, has_bias, device=DEVICE, seed=0):
    g = torch.Generator().manual_seed(seed)
    n = shape[-1]
    x = (torch.randn(shape, generator=g) * 3 + 1).to(device=device, dtype=dtype).requires_grad_()
    weight = (torch.randn(n, generator=g) + 1).to(device=device, dtype=dtype).requires_grad_() if has_weight else None
    bias = torch.randn(n, generator=g).to(device=device, dtype=dtype).requires_grad_() if has_bias else None
    return x, weight, bias


def check_against_reference(x, weight, bias, backend, eps=1e-5):
    y = gpt2_kernels.layer_norm(x, weight, bias, eps, backend=backend)
    assert y.shape == x.shape and y.dtype == x.dtype
    params = [t for t in (x, weight, bias) if t is not None]
    grad_out = torch.randn(y.shape, generator=torch.Generator().manual_seed(1)).to(y)
    grads = torch.autograd.grad(y, params, grad_out)
    ref_params = [t.detach().cpu().double().requires_grad_() for t in params]
    ref_x, ref_w, ref_b = (ref_params.pop(0) if t is not None else None for t in (x, weight, bias))
    expected = reference_layer_norm(ref_x, ref_w, ref_b, eps)
    expected_grads = torch.autograd.grad(expected, [t for t in (ref_x, ref_w, ref_b) if t is not None],
                                         grad_out.cpu().double())
    atol, rtol = TOLERANCES[x.dtype]
    torch.testing.assert_close(y.detach().cpu().double(), expected, atol=atol, rtol=rtol)
    rows = x.numel() // x.shape[-1]
    for name, got, want in zip(("dx", "dweight", "dbias"), grads, expected_grads):
        # dweight/dbias sum over rows, so their rounding error grows with the row count.
        scale = 1 if name == "dx" else max(1, rows) ** 0.5
        torch.testing.assert_close(got.cpu().double(), want, atol=atol * scale, rtol=rtol,
                                   msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("affine", AFFINE, ids=["weight+bias", "weight", "bias", "none"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_matches_reference(shape, dtype, affine, backend):
    check_against_reference(*make_inputs(shape, dtype, *affine), backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous_input(backend):
    x, weight, bias = make_inputs((6, 4, 1000), torch.float32, True, True)
    x_t = x.detach().transpose(1, 2).contiguous().transpose(1, 2).requires_grad_()  # rows with stride 4
    assert not x_t.is_contiguous()
    check_against_reference(x_t, weight, bias, backend, eps=1e-3)


@pytest.mark.parametrize("affine", [(True, True), (False, False)], ids=["weight+bias", "none"])
def test_gradcheck_fallback(affine):
    inputs = make_inputs((3, 6), torch.float64, *affine)
    assert torch.autograd.gradcheck(lambda x, w, b: gpt2_kernels.layer_norm(x, w, b, backend="torch"), inputs)


@pytest.mark.parametrize("backend", BACKENDS)
def test_module(backend):
    ln = gpt2_kernels.LayerNorm(16, eps=1e-6, bias=False, backend=backend).to(DEVICE)
    assert ln.bias is None and ln.weight.shape == (16,) and list(ln.state_dict()) == ["weight"]
    with torch.no_grad():
        ln.weight.uniform_()
    x = torch.randn(2, 3, 16, device=DEVICE)
    torch.testing.assert_close(ln(x), reference_layer_norm(x, ln.weight, None, 1e-6).float())
    assert set(gpt2_kernels.LayerNorm(8).state_dict()) == {"weight", "bias"}


def test_bad_inputs_raise_clear_errors():
    x = torch.randn(2, 8)
    with pytest.raises(ValueError, match=r"weight has shape \(7,\), expected \(8,\)"):
        gpt2_kernels.layer_norm(x, torch.ones(7), None)


@requires_triton
def test_rows_too_long_for_the_triton_kernel_raise_a_clear_error():
    with pytest.raises(ValueError, match="rows of 1..8192"):
        gpt2_kernels.layer_norm(torch.randn(1, 8193, device=DEVICE), None, None, backend="triton")


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("shape", [(8, 1024, 768), (4, 512, 1600), (1000, 1000), (64, 8192)], ids=str)
def test_cuda_matches_reference(shape, dtype):
    check_against_reference(*make_inputs(shape, dtype, True, True, device="cuda"), "triton")
