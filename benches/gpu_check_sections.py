"""The measuring sections of `benches/gpu_check.py`, each a generator of report rows.

Every section takes a `Context` (device, dtypes, shapes, deadline, the peaks measured earlier in the
run) and yields plain dicts as it goes, so the caller can write each row down before the next case
starts. A case that fails yields a row with status "failed" and the error; a case that does not fit
before the deadline yields a row with status "skipped". On the GPU the shapes are GPT-2's; the tests
run the same code on the CPU with `SHAPES["tiny"]` (see tests/benches/test_gpu_check.py).
"""

from __future__ import annotations

import math
import os
import socket
import time
import traceback
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

import gpt2_kernels
from benches.kernel_utils import make_call

SHAPES = {
    # attention (B, H, T, D) per T; rows x N for LayerNorm; GELU's tensor; (N, C, V) for the loss; the
    # int8 linear's (out, in) weights and row counts; the model (preset, vocabulary: None for GPT-2's),
    # batch, sequence and timed steps; decoding's prompt and new tokens; the peaks' matmul and copy.
    "gpt2": dict(attention=[(8, 12, 1024, 64), (2, 12, 4096, 64)], layer_norm=(8192, 768), gelu=(8, 1024, 3072),
                 cross_entropy=(8192, 768, 50257), int8=[(3072, 768), (50257, 768)], int8_rows=(1, 8, 2048),
                 preset="gpt2", vocab=None, batch=8, seq=1024, steps=5, prompt=16, new_tokens=128,
                 matmul=8192, copy_bytes=2**30),
    "tiny": dict(attention=[(1, 2, 40, 16)], layer_norm=(16, 32), gelu=(2, 8, 32), cross_entropy=(20, 16, 40),
                 int8=[(48, 32)], int8_rows=(1, 8), preset="tiny", vocab=256, batch=1, seq=16, steps=1, prompt=4,
                 new_tokens=4, matmul=128, copy_bytes=2**20),
}
MEASURE_SECONDS = 0.3  # timing budget per case after its warm-up (CUDA: 3..200 calls)


@dataclass
class Context:
    device: str = "cuda"
    dtypes: tuple = (torch.bfloat16, torch.float16)
    amp_dtype: torch.dtype = torch.bfloat16  # the training steps' autocast dtype
    shapes: str = "gpt2"
    backend: str = "triton"  # what "ours" runs with
    compile: bool = True  # torch.compile'd training steps too
    ddp_backend: str = "nccl"
    deadline: float = math.inf  # time.time() after which cases are skipped
    peaks: dict = field(default_factory=dict)  # "bf16_matmul_tflops", "copy_gbps" from the peaks section

    @property
    def shape(self) -> dict:
        return SHAPES[self.shapes]

    def time_left(self) -> float:
        return self.deadline - time.time()


def make_context(device: str = "cuda", shapes: str = "gpt2", **fields) -> Context:
    """The context gpu_check runs a section in. On the CPU (the tests' seam): fp32, Triton under the
    interpreter when it is on (else the fallbacks), no torch.compile, and gloo instead of NCCL."""
    if device == "cpu":
        from gpt2_kernels.dispatch import INTERPRETER

        # fp16 autocast: the interpreter computes bf16 matmuls wrongly (see gpt2_kernels.attention).
        fields = dict(dtypes=(torch.float32,), amp_dtype=torch.float16, backend="triton" if INTERPRETER else "torch",
                      compile=False, ddp_backend="gloo", **fields)
    return Context(device=device, shapes=shapes, **fields)


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def measure(fn, device: str, seconds: float = MEASURE_SECONDS, max_calls: int = 200, min_calls: int = 3,
            warmed: bool = False) -> tuple[float, float | None]:
    """(ms per call, peak MiB allocated during one call on CUDA else None). Unless `warmed`, one
    warm-up call first (Triton compiles and autotunes there); one more call gives the peak memory and
    how many calls fit in `seconds`."""
    if not warmed:
        fn()
        _sync(device)
    peak = None
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    start = time.perf_counter()
    fn()
    _sync(device)
    once = time.perf_counter() - start
    if device == "cuda":
        peak = (torch.cuda.max_memory_allocated() - base) / 2**20
    calls = max(min_calls, min(max_calls, int(seconds / max(once, 1e-9))))
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    _sync(device)
    return (time.perf_counter() - start) / calls * 1e3, peak


def _row(section: str, case: str, impl: str, **values) -> dict:
    return {"section": section, "case": case, "impl": impl, "status": "ok", **values}


def _guarded(ctx: Context, section: str, case: str, impl: str, body, seconds_needed: float = 1.0):
    """Run body() -> dict of values as one row; a failure or a passed deadline is a row too."""
    if ctx.time_left() < seconds_needed:
        return _row(section, case, impl, status="skipped", error="section time budget spent")
    try:
        return _row(section, case, impl, **body())
    except Exception as e:  # noqa: BLE001 - one failing case must not lose the others' figures
        return _row(section, case, impl, status="failed", error=f"{type(e).__name__}: {e}"[:500],
                    trace=traceback.format_exc(limit=-3)[-1500:])


def _throughput(ctx: Context, ms: float, flops: float | None = None, bytes_moved: float | None = None) -> dict:
    """TFLOP/s or GB/s of a call, and its fraction of the peak measured in the same run."""
    out = {}
    if flops is not None:
        out["tflops"] = flops / ms / 1e9
        if ctx.peaks.get("bf16_matmul_tflops"):
            out["pct_peak"] = 100 * out["tflops"] / ctx.peaks["bf16_matmul_tflops"]
    if bytes_moved is not None:
        out["gbps"] = bytes_moved / ms / 1e6
        if ctx.peaks.get("copy_gbps"):
            out["pct_peak"] = 100 * out["gbps"] / ctx.peaks["copy_gbps"]
    return out


def _max_diff(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return max((x.float() - y.float()).abs().max().item() for x, y in zip(a, b))


def _outputs(fn, inputs: list[torch.Tensor], mode: str) -> list[torch.Tensor]:
    """fn's output, and for "fwd+bwd" the gradients of its inputs under a fixed upstream gradient."""
    inputs = [t.detach().requires_grad_(mode != "fwd" and t.is_floating_point()) for t in inputs]
    out = fn(*inputs)
    if mode == "fwd":
        return [out.detach()]
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(out) if out.dim() else torch.ones_like(out)
    diff = [t for t in inputs if t.requires_grad]
    return [out.detach(), *torch.autograd.grad(out, diff, grad_out)]


def _compare(ctx: Context, section: str, case: str, ours, peers: dict, inputs: list[torch.Tensor], mode: str,
             flops: float | None = None, bytes_moved: float | None = None):
    """Rows for ours and each peer: time, throughput, peak memory; peers carry max |peer - ours|."""
    reference = None

    def run(fn, is_ours):
        nonlocal reference
        outs = _outputs(fn, inputs, mode)
        if is_ours:
            reference = outs
        call = make_call(fn, inputs, mode) if mode == "fwd" or outs[0].dim() else _scalar_call(fn, inputs)
        ms, peak = measure(call, ctx.device)
        values = {"mode": mode, "ms": ms, "peak_mib": peak, **_throughput(ctx, ms, flops, bytes_moved)}
        if not is_ours and reference is not None:
            values["max_abs_diff"] = _max_diff(outs, reference)
        return values

    yield _guarded(ctx, section, case, "ours", lambda: run(ours, True))
    for name, fn in peers.items():
        yield _guarded(ctx, section, case, name, lambda fn=fn: run(fn, False))


def _scalar_call(fn, inputs):
    """forward + backward of a scalar-valued fn (a loss), gradients for every floating input."""
    inputs = [t.detach().requires_grad_(t.is_floating_point()) for t in inputs]
    return lambda: torch.autograd.grad(fn(*inputs), [t for t in inputs if t.requires_grad])


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


# ---------------------------------------------------------------------------------------------- peaks


def peaks_section(ctx: Context):
    """The machine, and the peaks every other figure is put against: a large matmul and a device copy."""
    yield _row("peaks", "machine", "-", kind="machine", **machine_info(ctx.device))
    n = ctx.shape["matmul"]
    dtype = torch.bfloat16 if ctx.device == "cuda" else torch.float32
    a, b = (torch.randn(n, n, device=ctx.device, dtype=dtype) for _ in range(2))

    def matmul():
        ms, _ = measure(lambda: a @ b, ctx.device)
        return {"ms": ms, "tflops": 2 * n**3 / ms / 1e9, "dtype": _dtype_name(dtype)}

    row = _guarded(ctx, "peaks", f"matmul {n}x{n}x{n}", "torch", matmul)
    row.update(kind="peak", peak="bf16_matmul_tflops", unit="tflops")
    ctx.peaks["bf16_matmul_tflops"] = row.get("tflops")
    yield row
    del a, b
    src = torch.empty(ctx.shape["copy_bytes"], dtype=torch.uint8, device=ctx.device)
    dst = torch.empty_like(src)

    def copy():
        ms, _ = measure(lambda: dst.copy_(src), ctx.device)
        return {"ms": ms, "gbps": 2 * src.numel() / ms / 1e6}  # bytes read + written (STREAM's convention)

    row = _guarded(ctx, "peaks", f"device copy {src.numel() / 2**20:.0f} MiB", "torch", copy)
    row.update(kind="peak", peak="copy_gbps", unit="gbps")
    ctx.peaks["copy_gbps"] = row.get("gbps")
    yield row


def machine_info(device: str) -> dict:
    from importlib import metadata

    info = {"torch": torch.__version__, "cuda": torch.version.cuda, "cpu_count": os.cpu_count()}
    for package in ("triton", "transformers"):
        try:
            info[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            info[package] = None
    if device == "cuda":
        props = torch.cuda.get_device_properties(0)
        info.update(gpu=props.name, capability=f"{props.major}.{props.minor}", sms=props.multi_processor_count,
                    memory_gib=round(props.total_memory / 2**30, 1), gpus=torch.cuda.device_count())
    return info


# ---------------------------------------------------------------------------------------------- kernels


def _sdpa(backend_name: str):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backend = getattr(SDPBackend, backend_name)

    def attend(q, k, v):
        with sdpa_kernel(backend):
            return F.scaled_dot_product_attention(q, k, v, is_causal=True)

    return attend


def kernels_section(ctx: Context):
    """Every kernel against its PyTorch peer, forward and forward+backward, in each dtype."""
    g = torch.Generator(device=ctx.device).manual_seed(0)

    def randn(*shape, dtype):
        return torch.randn(*shape, device=ctx.device, dtype=dtype, generator=g)

    for dtype in ctx.dtypes:
        name = _dtype_name(dtype)
        for mode in ("fwd", "fwd+bwd"):
            for B, H, T, D in ctx.shape["attention"]:
                qkv = [randn(B, H, T, D, dtype=dtype) for _ in range(3)]
                flops = 4 * B * H * T * T * D / 2 * (1 if mode == "fwd" else 3.5)  # causal half, bwd 2.5x fwd
                peers = {f"sdpa {b.split('_')[0].lower()}": _sdpa(b)
                         for b in ("FLASH_ATTENTION", "EFFICIENT_ATTENTION", "MATH")}
                yield from _compare(ctx, "kernels", f"attention B{B} H{H} T{T} D{D} {name}",
                                    lambda q, k, v: gpt2_kernels.causal_attention(q, k, v, backend=ctx.backend),
                                    peers, qkv, mode, flops=flops)
                del qkv
            rows, n = ctx.shape["layer_norm"]
            x, w, b = randn(rows, n, dtype=dtype), randn(n, dtype=dtype), randn(n, dtype=dtype)
            passes = 2 if mode == "fwd" else 5  # x in, y out; + x, dy in, dx out
            yield from _compare(ctx, "kernels", f"layer_norm {rows}x{n} {name}",
                                lambda x, w, b: gpt2_kernels.layer_norm(x, w, b, backend=ctx.backend),
                                {"F.layer_norm": lambda x, w, b: F.layer_norm(x, (n,), w, b)}, [x, w, b], mode,
                                bytes_moved=passes * x.numel() * x.element_size())
            x = randn(*ctx.shape["gelu"], dtype=dtype)
            yield from _compare(ctx, "kernels", f"gelu {'x'.join(map(str, x.shape))} {name}",
                                lambda x: gpt2_kernels.gelu(x, backend=ctx.backend),
                                {"F.gelu tanh": lambda x: F.gelu(x, approximate="tanh")}, [x], mode,
                                bytes_moved=passes * x.numel() * x.element_size())
            del x, w, b
            N, C, V = ctx.shape["cross_entropy"]
            inputs = [randn(N, C, dtype=dtype), randn(V, C, dtype=dtype) * 0.02,
                      torch.randint(0, V, (N,), device=ctx.device, generator=g)]
            yield from _compare(ctx, "kernels", f"linear_cross_entropy N{N} C{C} V{V} {name}",
                                lambda h, w, t: gpt2_kernels.linear_cross_entropy(h, w, t, backend=ctx.backend),
                                {"F.cross_entropy(F.linear)": lambda h, w, t: F.cross_entropy(F.linear(h, w).float(), t)},
                                inputs, mode, flops=2 * N * C * V * (1 if mode == "fwd" else 3))
            del inputs
        yield from _int8_rows(ctx, dtype, randn)


def _int8_rows(ctx: Context, dtype: torch.dtype, randn):
    """gpt2_kernels.int8_linear (weight-only int8, issue 13) against F.linear on the dequantised weight,
    where `gpt2_kernels` has it: inference only, so forward only."""
    if not (hasattr(gpt2_kernels, "int8_linear") and hasattr(gpt2_kernels, "quantize_int8")):
        return
    for out_features, in_features in ctx.shape["int8"]:
        w8, scale = gpt2_kernels.quantize_int8(randn(out_features, in_features, dtype=torch.float32))
        w = (w8.float() * scale[:, None]).to(dtype)
        for rows in ctx.shape["int8_rows"]:
            x = randn(rows, in_features, dtype=dtype)
            weight_bytes = w8.numel() + 4 * scale.numel()
            moved = weight_bytes + (rows * (in_features + out_features)) * x.element_size()
            yield from _compare(ctx, "kernels", f"int8_linear {rows}x{in_features} -> {out_features} {_dtype_name(dtype)}",
                                lambda x, w8=w8, scale=scale: gpt2_kernels.int8_linear(x, w8, scale, backend=ctx.backend),
                                {f"F.linear {_dtype_name(dtype)}": lambda x, w=w: F.linear(x, w)}, [x], "fwd",
                                flops=2 * rows * in_features * out_features, bytes_moved=moved)


# ---------------------------------------------------------------------------------------------- model


def _model(ctx: Context, backend: str, seed: int = 0):
    from gpt import GPT, GPTConfig

    torch.manual_seed(seed)
    vocab = {"vocab_size": ctx.shape["vocab"]} if ctx.shape["vocab"] else {}
    return GPT(GPTConfig.from_preset(ctx.shape["preset"], backend=backend, **vocab)).to(ctx.device)


def _batch(ctx: Context, vocab_size: int):
    g = torch.Generator(device=ctx.device).manual_seed(1)
    shape = (ctx.shape["batch"], ctx.shape["seq"])
    idx = torch.randint(0, vocab_size, shape, device=ctx.device, generator=g)
    return idx, torch.roll(idx, -1, dims=1)


def train_section(ctx: Context):
    """One training step of the model under autocast (bf16 on the GPU; AdamW), backend triton vs torch,
    eager and torch.compile'd: tokens/s, peak memory, and the first step's loss (the same seed for all)."""
    variants = [(False, "torch"), (False, ctx.backend)] + ([(True, ctx.backend), (True, "torch")] if ctx.compile else [])
    B, T, steps = ctx.shape["batch"], ctx.shape["seq"], ctx.shape["steps"]
    first_losses = {}
    for compiled, backend in dict.fromkeys(variants):
        impl = f"{backend} {'compiled' if compiled else 'eager'}"

        def body(compiled=compiled, backend=backend, impl=impl):
            model = _model(ctx, backend)
            optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=ctx.device == "cuda")
            forward = torch.compile(model) if compiled else model
            idx, targets = _batch(ctx, model.config.vocab_size)

            def step():
                with torch.autocast(ctx.device, dtype=ctx.amp_dtype):
                    _, loss = forward(idx, targets)
                loss.backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                return loss.detach()

            first_losses[impl] = step().item()  # also the warm-up: compiles, autotunes
            ms, peak = measure(step, ctx.device, seconds=steps * 0.1, max_calls=steps, min_calls=steps, warmed=True)
            tokens = B * T
            config = model.config
            flops_per_token = 6 * model.num_parameters(non_embedding=True) + 12 * config.n_layer * config.n_embd * T
            values = {"ms": ms, "tokens_per_s": tokens / ms * 1e3, "peak_mib": peak, "loss": first_losses[impl],
                      **_throughput(ctx, ms, flops=flops_per_token * tokens)}
            if "torch eager" in first_losses and impl != "torch eager":
                values["max_abs_diff"] = abs(first_losses[impl] - first_losses["torch eager"])
            del model, optimizer, forward
            return values

        case = f"{ctx.shape['preset']} train step B{B} T{T} {_dtype_name(ctx.amp_dtype)} autocast"
        yield _guarded(ctx, "train", case, impl, body,
                       seconds_needed=60 if compiled else 5)
        if ctx.device == "cuda":
            torch.cuda.empty_cache()


def decode_section(ctx: Context):
    """gpt.generate tokens/s: batch 1, greedy, a short prompt, fixed number of new tokens."""
    from gpt import generate

    prompt, new = list(range(ctx.shape["prompt"])), ctx.shape["new_tokens"]
    for dtype in dict.fromkeys((ctx.dtypes[0], torch.float32)):  # bf16 and fp32 on the GPU
        for backend in dict.fromkeys((ctx.backend, "torch")):
            def body(dtype=dtype, backend=backend):
                model = _model(ctx, backend).to(dtype).eval()

                def run():
                    return generate(model, prompt, new, temperature=0, stop_tokens=())

                tokens = run()[0]  # warm-up: compiles and autotunes every key the cache lengths hit
                ms, peak = measure(run, ctx.device, seconds=1.0, max_calls=2, min_calls=1, warmed=True)
                return {"ms": ms, "tokens_per_s": new / ms * 1e3, "peak_mib": peak, "dtype": _dtype_name(dtype),
                        "note": f"first tokens {tokens[:8]}"}

            yield _guarded(ctx, "decode", f"{ctx.shape['preset']} generate B1 prompt {len(prompt)} + {new} greedy "
                           f"{_dtype_name(dtype)}", backend, body, seconds_needed=5)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ddp_section(ctx: Context):
    """One DistributedDataParallel training step in a one-process group (NCCL on the GPU)."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    def body():
        dist.init_process_group(ctx.ddp_backend, init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
        try:
            model = _model(ctx, ctx.backend)
            ddp = DistributedDataParallel(model, device_ids=[0] if ctx.device == "cuda" else None)
            optimizer = torch.optim.AdamW(ddp.parameters(), lr=1e-4)
            idx, targets = _batch(ctx, model.config.vocab_size)
            start = time.perf_counter()
            with torch.autocast(ctx.device, dtype=ctx.amp_dtype):
                _, loss = ddp(idx, targets)
            loss.backward()
            optimizer.step()
            _sync(ctx.device)
            ms = (time.perf_counter() - start) * 1e3
            if not math.isfinite(loss.item()):
                raise RuntimeError(f"the DDP step's loss is {loss.item()}")
            return {"ms": ms, "loss": loss.item(), "note": f"{ctx.ddp_backend}, world size 1, first step"}
        finally:
            dist.destroy_process_group()

    yield _guarded(ctx, "ddp", f"{ctx.shape['preset']} DDP step B{ctx.shape['batch']} T{ctx.shape['seq']}",
                   ctx.backend, body, seconds_needed=5)


SECTIONS = {"peaks": peaks_section, "kernels": kernels_section, "train": train_section, "decode": decode_section,
            "ddp": ddp_section}
