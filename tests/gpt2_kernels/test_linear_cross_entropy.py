"""gpt2_kernels.linear_cross_entropy against F.cross_entropy(F.linear(...)), on both backends.

On CPU the Triton kernel runs under the interpreter (tests/conftest.py sets TRITON_INTERPRET=1) with
32-wide vocabulary tiles, so vocabularies of 97 or 1000 words cross tile edges; token counts that
are not a multiple of the chunk (see gpt2_kernels.linear_cross_entropy.chunk_rows) leave a short last chunk.
"""

import pytest
import torch
import torch.nn.functional as F

import gpt2_kernels
from gpt2_kernels.linear_cross_entropy import chunk_rows
from tests.conftest import requires_cuda
from tests.gpt2_kernels.conftest import BACKENDS, DEVICE

# Relative tolerance on the loss and (atol, rtol) on gradients scaled to their largest entry: fp32
# is held to 1e-5 relative; 16-bit to what rounding the logits and gradients to 8 (bf16) or 11
# (fp16) bits allows, the loss itself being accumulated in fp32 either way.
TOLERANCES = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}

# (leading shape of hidden/targets, C, V): one token, a chunk of 1 row, N not a multiple of the chunk
# and V not a multiple of the tile, leading batch dims, V < C (a single chunk), a wide vocabulary.
SHAPES = [((1,), 8, 5), ((7,), 16, 97), ((37,), 16, 97), ((2, 19), 32, 100), ((13,), 64, 33), ((50,), 8, 1000)]


def make_inputs(lead, C, V, dtype, device=DEVICE, seed=0, ignore_every=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(*lead, C, generator=g).to(device=device, dtype=dtype).requires_grad_()
    weight = (torch.randn(V, C, generator=g) * C**-0.5 * 4).to(device=device, dtype=dtype).requires_grad_()
    targets = torch.randint(0, V, lead, generator=g)
    if ignore_every:
        targets.view(-1)[::ignore_every] = -100
    return hidden, weight, targets.to(device)


def reference(hidden, weight, targets, ignore_index=-100):
    """Loss and gradients in float64 through PyTorch's own ops."""
    h, w = (t.detach().cpu().double().requires_grad_() for t in (hidden, weight))
    loss = F.cross_entropy(F.linear(h, w).flatten(0, -2), targets.cpu().flatten(), ignore_index=ignore_index)
    return loss, *torch.autograd.grad(loss, (h, w))


def check(hidden, weight, targets, backend, ignore_index=-100, grad_output=1.0):
    loss = gpt2_kernels.linear_cross_entropy(hidden, weight, targets, ignore_index=ignore_index, backend=backend)
    assert loss.dtype == torch.float32 and loss.dim() == 0
    grads = torch.autograd.grad(loss * grad_output if grad_output != 1.0 else loss, (hidden, weight))
    want_loss, *want_grads = reference(hidden, weight, targets, ignore_index)
    rtol = TOLERANCES[hidden.dtype]
    torch.testing.assert_close(loss.double().cpu(), want_loss.detach(), rtol=rtol, atol=rtol * 1e-3, equal_nan=True)
    for name, got, want, like in zip(("grad_hidden", "grad_weight"), grads, want_grads, (hidden, weight)):
        assert got.dtype == like.dtype and got.shape == like.shape, name
        want = want * grad_output
        scale = want.abs().max().item() or 1.0
        torch.testing.assert_close(got.cpu().double() / scale, want / scale, rtol=rtol, atol=rtol,
                                   msg=lambda m: f"{name}: {m}")
    return loss


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "N{}C{}V{}".format("x".join(map(str, s[0])), s[1], s[2]))
def test_matches_pytorch_fp32(shape, backend):
    check(*make_inputs(*shape, torch.float32), backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("shape", [((37,), 16, 97), ((2, 19), 32, 100)], ids=["N37V97", "N2x19V100"])
def test_matches_pytorch_16bit(shape, dtype, backend):
    # The Triton kernel only loads, reduces and stores here (no tl.dot), so the interpreter's bf16
    # matmul problem does not apply: bf16 runs under the interpreter too.
    check(*make_inputs(*shape, dtype, ignore_every=5), backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("ignore_index", [-100, 3])
def test_ignored_targets_contribute_nothing(backend, ignore_index):
    hidden, weight, targets = make_inputs((29,), 16, 40, torch.float32)
    targets[::3] = ignore_index
    check(hidden, weight, targets, backend, ignore_index=ignore_index)
    grad_hidden = torch.autograd.grad(
        gpt2_kernels.linear_cross_entropy(hidden, weight, targets, ignore_index=ignore_index, backend=backend), hidden)[0]
    assert grad_hidden[::3].abs().max().item() == 0.0


@pytest.mark.parametrize("backend", BACKENDS)
def test_all_ignored_is_nan_with_zero_gradients_like_pytorch(backend):
    hidden, weight, targets = make_inputs((6,), 8, 11, torch.float32)
    targets.fill_(-100)
    loss = gpt2_kernels.linear_cross_entropy(hidden, weight, targets, backend=backend)
    assert torch.isnan(loss) and torch.isnan(F.cross_entropy(F.linear(hidden, weight), targets))
    for grad in torch.autograd.grad(loss, (hidden, weight)):
        assert grad.abs().max().item() == 0.0


@pytest.mark.parametrize("backend", BACKENDS)
def test_upstream_gradient_scales_both_gradients(backend):
    check(*make_inputs((21,), 16, 50, torch.float32), backend, grad_output=-2.5)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("seed", range(12))
def test_random_sweep(seed, backend):
    # Shapes, ignore pattern, logit scale and dtype drawn per seed: catches combinations the
    # hand-picked shapes above do not.
    g = torch.Generator().manual_seed(1000 + seed)
    N, C, V = (int(torch.randint(lo, hi, (1,), generator=g)) for lo, hi in ((1, 80), (1, 48), (2, 300)))
    dtype = (torch.float32, torch.float16)[seed % 2]
    ignore_every = int(torch.randint(0, 4, (1,), generator=g))
    hidden, weight, targets = make_inputs((N,), C, V, dtype, seed=seed, ignore_every=ignore_every)
    check(hidden, weight, targets, backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_only_the_gradients_asked_for(backend):
    hidden, weight, targets = make_inputs((9,), 8, 30, torch.float32)
    weight.requires_grad_(False)
    loss = gpt2_kernels.linear_cross_entropy(hidden, weight, targets, backend=backend)
    (grad,) = torch.autograd.grad(loss, hidden)
    torch.testing.assert_close(grad.double().cpu(), reference(hidden, weight, targets)[1], rtol=1e-5, atol=1e-7)
    with torch.no_grad():  # no graph, the same loss
        torch.testing.assert_close(gpt2_kernels.linear_cross_entropy(hidden, weight, targets, backend=backend), loss.detach())


def test_chunks_hold_about_as_many_logits_as_hidden():
    for N, C, V in [(4096, 768, 50257), (1, 768, 50257), (100, 64, 64), (37, 16, 97), (8192, 1600, 50257)]:
        rows = chunk_rows(N, C, V)
        assert 1 <= rows <= N and rows * V <= N * C + V
    assert chunk_rows(4096, 768, 50257) == 63  # GPT-2: 66 chunks


def test_the_full_logits_never_exist():
    # Every matmul the fallback runs is seen by a dispatch mode: none may produce more than one
    # chunk of logits.
    from torch.utils._python_dispatch import TorchDispatchMode

    N, C, V = 200, 16, 300
    largest = []

    class Watch(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if isinstance(out, torch.Tensor):
                largest.append(out.numel())
            return out

    hidden, weight, targets = make_inputs((N,), C, V, torch.float32, device="cpu")
    with Watch():
        loss = gpt2_kernels.linear_cross_entropy(hidden, weight, targets, backend="torch")
        torch.autograd.grad(loss, (hidden, weight))
    assert max(largest) <= max(N * C + V, V * C) < N * V


def test_bad_inputs_raise_clear_errors():
    hidden, weight, targets = make_inputs((5,), 8, 10, torch.float32, device="cpu")
    with pytest.raises(ValueError, match=r"target 10 at position 2 is outside \[0, 10\)"):
        gpt2_kernels.linear_cross_entropy(hidden, weight, torch.tensor([1, 2, 10, 3, 4]))
    with pytest.raises(ValueError, match=r"target -3 at position 0"):
        gpt2_kernels.linear_cross_entropy(hidden, weight, torch.tensor([-3, 2, 1, 3, 4]))
    with pytest.raises(ValueError, match="same C"):
        gpt2_kernels.linear_cross_entropy(hidden, weight[:, :4], targets)
    with pytest.raises(ValueError, match="leading shape"):
        gpt2_kernels.linear_cross_entropy(hidden, weight, targets[:4])
    with pytest.raises(ValueError, match="share a floating dtype"):
        gpt2_kernels.linear_cross_entropy(hidden, weight.double(), targets)
    with pytest.raises(ValueError, match="integer class indices"):
        gpt2_kernels.linear_cross_entropy(hidden, weight, targets.float())
    with pytest.raises(ValueError, match="unknown kernels backend"):
        gpt2_kernels.linear_cross_entropy(hidden, weight, targets, backend="cuda")


def test_autocast_computes_in_the_autocast_dtype():
    hidden, weight, targets = make_inputs((12,), 16, 40, torch.float32, device="cpu")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = gpt2_kernels.linear_cross_entropy(hidden, weight, targets, backend="torch")
        want = F.cross_entropy(F.linear(hidden, weight).float(), targets)
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, want, rtol=2e-2, atol=0)
    grads = torch.autograd.grad(loss, (hidden, weight))
    assert grads[0].dtype == grads[1].dtype == torch.float32  # through the casts back to the fp32 leaves


@requires_cuda
def test_cuda_gpt2_shape_fp32_matches_pytorch():
    # GPT-2's head over 2 x 1024 tokens with a quarter of the targets ignored, against float64.
    check(*make_inputs((2, 1024), 768, 50257, torch.float32, device="cuda", ignore_every=4), "triton")


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_cuda_gpt2_shape_16bit_error_at_most_twice_pytorchs(dtype):
    # Over 50257 logits per row a fixed 16-bit tolerance is either loose or flaky, so (as the
    # attention tests do) our error against float64 must be at most twice that of PyTorch's unfused
    # loss in the same dtype (logits in 16-bit, softmax in fp32), plus a small floor.
    hidden, weight, targets = make_inputs((2, 1024), 768, 50257, dtype, device="cuda", ignore_every=4)
    exact = reference(hidden, weight, targets)
    ours = [gpt2_kernels.linear_cross_entropy(hidden, weight, targets, backend="triton")]
    ours += torch.autograd.grad(ours[0], (hidden, weight))
    pytorch = [F.cross_entropy(F.linear(hidden, weight).float(), targets)]
    pytorch += torch.autograd.grad(pytorch[0], (hidden, weight))
    for name, mine, theirs, want in zip(("loss", "grad_hidden", "grad_weight"), ours, pytorch, exact):
        our_error = (mine.detach().cpu().double() - want.detach()).abs().max().item()
        pytorch_error = (theirs.detach().cpu().double() - want.detach()).abs().max().item()
        floor = 1e-6 * want.abs().max().item()
        assert our_error <= 2 * pytorch_error + floor, f"{name}: error {our_error:.3g} vs PyTorch's {pytorch_error:.3g}"
