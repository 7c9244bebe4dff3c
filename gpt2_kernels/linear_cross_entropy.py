"""Fused linear + cross-entropy: mean cross-entropy of hidden @ weight.T, a chunk of tokens at a time.

The unfused `F.cross_entropy(F.linear(hidden, weight), targets)` holds N x V logits, and as many
again for their log-softmax and their gradient (GPT-2, 4096 tokens x 50257 words in fp32: 0.8 GB
each), while hidden is only N x C. Here the tokens go through a chunk of rows at a time, and each
chunk is finished in the forward pass (Liger-Kernel's FusedLinearCrossEntropy does the same):

    logits = hidden[rows] @ weight.T                        torch matmul (cuBLAS / the CPU BLAS)
    loss[rows], logits <- dlogits = (softmax - onehot) / n  one pass over the chunk, in place
    grad_hidden[rows] = dlogits @ weight                    torch matmul
    grad_weight (+)= dlogits.T @ hidden[rows]               torch matmul; the first chunk writes it

so only one chunk of logits exists at a time; the backward scales the saved gradients by the
upstream gradient (a training loss has grad_output 1: nothing to do).

How many rows a chunk holds is gpt2_kernels.memory_plan's rule (``loss_chunk_rows``): all of them
(one chunk, the plain computation, with no more memory than the logits themselves) where the logits
are small enough that chunking would save nothing worth its time; otherwise chunks large enough
that each matmul stays efficient and the weight gradient is added to only a few times (CPU, GPT-2's
head: chunks of 1024 rows; 63-row chunks took 1.15x the unfused time). ``save_memory="always"``
forces the smallest chunks (logits about the size of hidden), ``"never"`` one chunk.

With several chunks the weight gradient is accumulated in fp32 (in 16-bit every chunk's addition
would round the sum) inside the matmul itself (addmm, beta 1: no temporary, no separate pass; on a
CPU in 16-bit, which has no fp32-output 16-bit matmul, the chunk's product is added in place). With
one chunk it is one matmul in the weight's dtype, as the unfused backward computes it.

The per-chunk pass: on CUDA a Triton kernel, one program per row, walks the vocabulary in tiles of
CUDA_BLOCK_V with an online log-sum-exp (running max and rescaled sum of exp, fp32), then
walks it again writing the gradient over the logits. The PyTorch fallback computes the same with
torch ops on the chunk, in place in fp32 (no temporary the size of the chunk when it is fp32).

Semantics match `F.cross_entropy(..., ignore_index=ignore_index, reduction="mean")`: the loss is the
mean over targets != ignore_index; ignored rows contribute 0 and get zero gradient; with every target
ignored the mean over zero elements is nan (as PyTorch's) and the gradients are zero. The loss is
always fp32, accumulated in fp32 whatever the input dtype; the gradients have the inputs' dtypes.
Under autocast, hidden and weight are cast to the autocast dtype first, as `F.linear` would be.
"""

from __future__ import annotations

import torch

from gpt2_kernels.dispatch import jit, resolve_backend, tl
from gpt2_kernels.memory_plan import available_memory_bytes, loss_chunk_rows

CUDA_BLOCK_V, CUDA_NUM_WARPS = 4096, 8  # one vocabulary tile: 16 elements per thread
# On the interpreter: tiles small enough that the tests' small vocabularies cross tile edges.
INTERPRETER_BLOCK_V = 32


@jit
def _ce_rows_kernel(LOGITS, TARGETS, LOSS, stride_row, n_vocab, ignore_index, grad_scale,
                    BLOCK_V: tl.constexpr, WRITE_GRAD: tl.constexpr):
    """Row r of LOGITS (n_rows, n_vocab), stride_row apart: LOSS[r] = lse - logit[target] (0 if ignored)
    and, with WRITE_GRAD, LOGITS[r] <- (softmax - onehot(target)) * grad_scale (0 if ignored)."""
    row = tl.program_id(0).to(tl.int64)
    base = LOGITS + row * stride_row
    target = tl.load(TARGETS + row)
    valid = target != ignore_index
    offs = tl.arange(0, BLOCK_V)
    # Pass 1: running max m and sum s of exp(x - m), rescaled whenever the max grows.
    m = tl.max(tl.full([BLOCK_V], float("-inf"), dtype=tl.float32), axis=0)
    s = tl.sum(tl.zeros([BLOCK_V], dtype=tl.float32), axis=0)
    for start in range(0, n_vocab, BLOCK_V):
        cols = start + offs
        x = tl.load(base + cols, mask=cols < n_vocab, other=float("-inf")).to(tl.float32)
        m_new = tl.maximum(m, tl.max(x, axis=0))
        s = s * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new), axis=0)
        m = m_new
    lse = m + tl.log(s)
    # Read the target's logit before pass 2 overwrites the row (targets are checked on the host).
    target_logit = tl.load(base + target, mask=valid, other=0.0).to(tl.float32)
    tl.store(LOSS + row, tl.where(valid, lse - target_logit, 0.0))
    if WRITE_GRAD:
        scale = tl.where(valid, grad_scale, 0.0)
        for start in range(0, n_vocab, BLOCK_V):
            cols = start + offs
            in_row = cols < n_vocab
            p = tl.exp(tl.load(base + cols, mask=in_row, other=0.0).to(tl.float32) - lse)
            grad = tl.where(cols == target, p - 1.0, p) * scale
            tl.store(base + cols, grad.to(LOGITS.dtype.element_ty), mask=in_row)


def _triton_rows(logits: torch.Tensor, targets: torch.Tensor, loss: torch.Tensor, ignore_index: int,
                 grad_scale: float, write_grad: bool) -> None:
    rows, V = logits.shape
    block_v = INTERPRETER_BLOCK_V if not logits.is_cuda else min(CUDA_BLOCK_V, 1 << (V - 1).bit_length())
    _ce_rows_kernel[(rows,)](logits, targets, loss, logits.stride(0), V, ignore_index, grad_scale,
                             BLOCK_V=block_v, WRITE_GRAD=write_grad, num_warps=CUDA_NUM_WARPS)


def _torch_rows(logits: torch.Tensor, targets: torch.Tensor, loss: torch.Tensor, ignore_index: int,
                grad_scale: float, write_grad: bool) -> None:
    """The kernel's contract in torch ops: fp32 math, in place on fp32 logits (a fp32 copy otherwise).
    The logits are the caller's scratch chunk, so the softmax is built in them: no chunk-sized temporary."""
    x = logits.float()  # the same tensor when logits are fp32
    valid = targets != ignore_index
    safe_targets = torch.where(valid, targets, 0)[:, None]
    row_max = x.amax(dim=1, keepdim=True)
    target_logit = x.gather(1, safe_targets)
    sum_exp = x.sub_(row_max).exp_().sum(dim=1, keepdim=True)  # x <- exp(x - max): no overflow
    loss.copy_(torch.where(valid, (row_max + sum_exp.log() - target_logit)[:, 0], 0.0))
    if write_grad:
        x.mul_(torch.where(valid[:, None], grad_scale / sum_exp, 0.0))  # softmax * scale
        x.scatter_add_(1, safe_targets, torch.where(valid, -grad_scale, 0.0)[:, None])  # - onehot * scale
        if x is not logits:
            logits.copy_(x)


def _add_product(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor, first: bool) -> None:
    """acc = a @ b (first) or acc += a @ b, acc in fp32 or a's dtype, with no acc-sized temporary
    where the BLAS can write fp32 itself (see the module docstring)."""
    if acc.dtype == a.dtype and first:
        torch.mm(a, b, out=acc)
    elif acc.dtype == a.dtype:
        acc.addmm_(a, b)
    elif acc.is_cuda:  # cuBLAS multiplies 16-bit inputs into a fp32 output (torch >= 2.8)
        if first:
            acc.zero_()
        torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)
    elif first:
        acc.copy_(a @ b)
    else:
        acc.add_(a @ b)


def _fused_forward(hidden, weight, targets, ignore_index, n_valid, rows_fn, step, need_hidden_grad, need_weight_grad):
    """Loss (fp32 scalar) and, as asked, grad_hidden (N, C) and grad_weight (V, C) for grad_output 1,
    ``step`` rows at a time."""
    N, C = hidden.shape
    V = weight.shape[0]
    write_grad = need_hidden_grad or need_weight_grad
    grad_scale = 1.0 / n_valid if n_valid else 0.0  # every row is ignored when n_valid is 0
    loss_rows = torch.empty(N, dtype=torch.float32, device=hidden.device)
    grad_hidden = torch.empty_like(hidden) if need_hidden_grad else None
    grad_weight = None
    if need_weight_grad:
        # Several chunks add up in fp32: in 16-bit every chunk's addition would round the sum.
        acc_dtype = weight.dtype if step >= N else torch.float32
        grad_weight = (torch.empty if N else torch.zeros)(V, C, dtype=acc_dtype, device=weight.device)
    for start in range(0, N, step):
        rows = slice(start, min(start + step, N))
        logits = hidden[rows] @ weight.T
        rows_fn(logits, targets[rows], loss_rows[rows], ignore_index, grad_scale, write_grad)
        if need_hidden_grad:
            torch.mm(logits, weight, out=grad_hidden[rows])
        if need_weight_grad:
            _add_product(grad_weight, logits.T, hidden[rows], first=start == 0)
        del logits  # before the next chunk's logits are allocated: at most one chunk alive
    if grad_weight is not None:
        grad_weight = grad_weight.to(weight.dtype)
    return loss_rows.sum() / n_valid, grad_hidden, grad_weight  # 0 / 0 = nan, as PyTorch's empty mean


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, ignore_index, n_valid, rows_fn, step):
        loss, grad_hidden, grad_weight = _fused_forward(hidden, weight, targets, ignore_index, n_valid, rows_fn, step,
                                                        ctx.needs_input_grad[0], ctx.needs_input_grad[1])
        # Saved (not kept as attributes) so autograd frees them right after the backward unless the
        # graph is retained, and can hand them on without a copy when grad_output is 1.
        ctx.save_for_backward(grad_hidden, grad_weight)
        return loss

    @staticmethod
    def backward(ctx, grad_output):
        grad_hidden, grad_weight = ctx.saved_tensors
        # A training loss is differentiated with grad_output 1: skip two full-size multiplications
        # (one host sync on CUDA, as Liger's). Out of place otherwise, so a retained graph stays valid.
        if not bool(grad_output == 1):
            grad_hidden = grad_hidden * grad_output.to(grad_hidden.dtype) if grad_hidden is not None else None
            grad_weight = grad_weight * grad_output.to(grad_weight.dtype) if grad_weight is not None else None
        return grad_hidden, grad_weight, None, None, None, None, None


def _check_inputs(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> None:
    if hidden.dim() < 1 or weight.dim() != 2 or hidden.shape[-1] != weight.shape[1]:
        raise ValueError(f"linear_cross_entropy: hidden must be (..., C) and weight (V, C) with the same C, got "
                         f"{tuple(hidden.shape)} and {tuple(weight.shape)}")
    if targets.shape != hidden.shape[:-1]:
        raise ValueError(f"linear_cross_entropy: targets must have hidden's leading shape {tuple(hidden.shape[:-1])}, "
                         f"got {tuple(targets.shape)}")
    if not hidden.is_floating_point() or hidden.dtype != weight.dtype:
        raise ValueError(f"linear_cross_entropy: hidden and weight must share a floating dtype, got {hidden.dtype} "
                         f"and {weight.dtype}")
    if targets.is_floating_point() or targets.is_complex() or targets.dtype == torch.bool:
        raise ValueError(f"linear_cross_entropy: targets must be integer class indices, got {targets.dtype}")
    if not (hidden.device == weight.device == targets.device):
        raise ValueError(f"linear_cross_entropy: hidden, weight and targets must be on one device, got "
                         f"{hidden.device}, {weight.device}, {targets.device}")


def _count_valid(targets: torch.Tensor, vocab_size: int, ignore_index: int) -> int:
    """Number of targets != ignore_index; a ValueError naming the first one outside [0, V)."""
    valid = targets != ignore_index
    bad = valid & ((targets < 0) | (targets >= vocab_size))
    n_valid, n_bad = torch.stack([valid.sum(), bad.sum()]).tolist()  # one host sync for both
    if n_bad:
        where = int(bad.nonzero()[0, 0])
        raise ValueError(f"linear_cross_entropy: target {int(targets[where])} at position {where} is outside "
                         f"[0, {vocab_size}) and is not ignore_index ({ignore_index})")
    return n_valid


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, *,
                         ignore_index: int = -100, backend: str = "auto", save_memory: str = "auto") -> torch.Tensor:
    """F.cross_entropy(F.linear(hidden, weight), targets, ignore_index=ignore_index) as a fp32 scalar,
    computed chunk by chunk (see the module docstring); hidden (..., C), weight (V, C), targets (...).
    Differentiable with respect to hidden and weight. ``save_memory`` ("auto", "always", "never";
    $GPT2_KERNELS_SAVE_MEMORY overrides "auto") picks the chunks: gpt2_kernels.memory_plan."""
    if torch.is_autocast_enabled(hidden.device.type):  # what F.linear would compute in
        dtype = torch.get_autocast_dtype(hidden.device.type)
        hidden, weight = hidden.to(dtype), weight.to(dtype)
    _check_inputs(hidden, weight, targets)
    rows_fn = _triton_rows if resolve_backend(backend, hidden) == "triton" else _torch_rows
    if rows_fn is _triton_rows and hidden.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"linear_cross_entropy: the Triton kernel takes float16/bfloat16/float32, got {hidden.dtype}; "
                         "use backend='torch'")
    hidden2 = hidden.reshape(-1, hidden.shape[-1])
    targets1 = targets.reshape(-1).long().contiguous()
    (N, C), V = hidden2.shape, weight.shape[0]
    step = loss_chunk_rows(N, C, V, hidden.dtype, hidden.device, save_memory=save_memory,
                           available_bytes=available_memory_bytes(hidden.device))
    n_valid = _count_valid(targets1, V, ignore_index)
    with torch.autocast(hidden.device.type, enabled=False):  # the chunk matmuls stay in the inputs' dtype
        if torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad):
            return _LinearCrossEntropy.apply(hidden2, weight, targets1, ignore_index, n_valid, rows_fn, step)
        # No graph to build (inference, evaluation): the loss alone, no gradient work.
        return _fused_forward(hidden2, weight, targets1, ignore_index, n_valid, rows_fn, step, False, False)[0]
