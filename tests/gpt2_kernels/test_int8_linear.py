"""gpt2_kernels.int8_linear and quantize_int8 against float64 references, on both backends, the CPU C
kernel (gpt2_kernels.cpu_linear: shapes, threads, its build cache, the fallback without it), and the
sm_90 compile check of the int8 kernels.

On the CPU the Triton kernels run under the interpreter with 16/32-wide tiles, so the odd shapes
below cross every tile edge and M <= 16 goes through the split-K partial sums. Triton 3.9's
interpreter computes bf16 ``tl.dot`` wrongly, so bf16 runs on the PyTorch fallback here and on the
Triton kernel only on a GPU.
"""

import importlib
import json
import os
import subprocess
import sys

import pytest
import torch

import gpt2_kernels
from tests.conftest import requires_cuda
from tests.gpt2_kernels.conftest import BACKENDS, DEVICE
from gpt2_kernels.attention import H100_SHARED_MEMORY
from tests.conftest import ROOT

# (atol, rtol) against float64. fp32: sums of up to ~10^3 products in fp32; 16-bit: the output's
# rounding (and, on the fallback, the matmul result rounded to x's dtype before the scale).
TOLERANCES = {torch.float32: (1e-4, 1e-5), torch.float16: (1e-2, 1e-2), torch.bfloat16: (5e-2, 2e-2)}
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
DTYPE_IDS = ["fp32", "fp16", "bf16"]
int8_module = importlib.import_module("gpt2_kernels.int8_linear")  # `gpt2_kernels.int8_linear` is the function
BF16_INTERPRETER = "Triton 3.9's interpreter computes bf16 tl.dot wrongly; bf16 is tested on the fallback and on CUDA"

# (M rows, K inputs, N outputs): M = 1, 3, 17, 128 (decoding and prefill tiles), K and N off the tiles.
SHAPES = [(1, 100, 77), (3, 64, 33), (17, 129, 70), (128, 50, 65), (1, 20, 5)]


def quantized(N, K, seed=0, device=DEVICE):
    w = torch.randn(N, K, generator=torch.Generator().manual_seed(seed))
    weight_int8, scale = gpt2_kernels.quantize_int8(w)
    return weight_int8.to(device), scale.to(device)


def reference(x, weight_int8, scale, bias=None):
    """x @ (weight_int8 * scale).T + bias, every step in float64."""
    w = weight_int8.cpu().double() * scale.cpu().double()[:, None]
    y = x.detach().cpu().double() @ w.T
    return y if bias is None else y + bias.cpu().double()


def check(x, weight_int8, scale, bias, backend):
    y = gpt2_kernels.int8_linear(x, weight_int8, scale, bias, backend=backend)
    assert y.shape == (*x.shape[:-1], weight_int8.shape[0]) and y.dtype == x.dtype and y.device == x.device
    atol, rtol = TOLERANCES[x.dtype]
    torch.testing.assert_close(y.cpu().double(), reference(x, weight_int8, scale, bias), atol=atol, rtol=rtol)


def skip_bf16_on_interpreter(backend, dtype):
    if backend == "triton" and dtype == torch.bfloat16 and DEVICE == "cpu":
        pytest.skip(BF16_INTERPRETER)


def make_x(shape, dtype, device=DEVICE, seed=1):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)).to(device=device, dtype=dtype)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("has_bias", [True, False], ids=["bias", "no-bias"])
@pytest.mark.parametrize("M, K, N", SHAPES, ids=str)
def test_matches_reference(M, K, N, has_bias, dtype, backend):
    skip_bf16_on_interpreter(backend, dtype)
    weight_int8, scale = quantized(N, K)
    bias = make_x((N,), dtype, seed=2) if has_bias else None
    check(make_x((M, K), dtype), weight_int8, scale, bias, backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_batch_dims_and_strides(backend):
    weight_int8, scale = quantized(40, 72)
    bias = make_x((40,), torch.float32, seed=2)
    check(make_x((2, 3, 5, 72), torch.float32), weight_int8, scale, bias, backend)
    check(make_x((72,), torch.float32), weight_int8, scale, bias, backend)  # no batch dims at all
    x = make_x((72, 6), torch.float32).t()  # strides (1, 6): read in place by the kernel
    assert not x.is_contiguous()
    check(x, weight_int8, scale, None, backend)
    w_strided = torch.cat([weight_int8, weight_int8], dim=1)[:, ::2]  # weight read through its strides too
    check(make_x((3, 72), torch.float32), w_strided, scale, bias, backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_rows_and_empty_reduction(backend):
    weight_int8, scale = quantized(9, 33)
    assert gpt2_kernels.int8_linear(make_x((0, 33), torch.float32), weight_int8, scale, backend=backend).shape == (0, 9)
    empty_w = torch.zeros(9, 0, dtype=torch.int8, device=DEVICE)
    bias = make_x((9,), torch.float32, seed=2)
    y = gpt2_kernels.int8_linear(make_x((2, 0), torch.float32), empty_w, scale, bias, backend=backend)
    torch.testing.assert_close(y, bias.expand(2, 9))


@pytest.mark.parametrize("split_k", [1, 3, 4, 8])
def test_split_k_partial_sums(monkeypatch, split_k):
    """Decoding splits the reduction; 3 splits of K = 100 in 32-wide tiles round to 2 (64 + 36), and 8 is
    more splits than K tiles (4): each must still count every product exactly once."""
    if DEVICE != "cpu":
        pytest.skip("the interpreter's split is fixed; on CUDA the split follows the SM count")
    pytest.importorskip("triton")
    monkeypatch.setattr(int8_module, "INTERPRETER_SPLIT_K", split_k)
    weight_int8, scale = quantized(50, 100)
    check(make_x((5, 100), torch.float32), weight_int8, scale, make_x((50,), torch.float32, seed=2), "triton")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=DTYPE_IDS)
def test_quantize_round_trip_bound(dtype):
    w = (torch.randn(64, 300, generator=torch.Generator().manual_seed(3)) * torch.logspace(-3, 1, 64)[:, None])
    w[5] = 0.0  # an all-zero row
    w = w.to(dtype)
    weight_int8, scale = gpt2_kernels.quantize_int8(w)
    assert weight_int8.dtype == torch.int8 and weight_int8.shape == w.shape
    assert scale.dtype == torch.float32 and scale.shape == (64,)
    w64 = w.double()
    absmax = w64.abs().amax(dim=1)
    torch.testing.assert_close(scale.double(), absmax / 127, rtol=2**-23, atol=0)
    assert weight_int8.abs().max() <= 127 and (weight_int8.abs().amax(dim=1)[absmax > 0] == 127).all()
    assert scale[5] == 0 and (weight_int8[5] == 0).all()
    error = (w64 - weight_int8.double() * scale.double()[:, None]).abs()
    bound = scale.double()[:, None] * (0.5 + 2**-17)  # half a step, plus fp32 rounding of w / scale
    assert (error <= bound).all(), f"worst error {(error / scale.double()[:, None].clamp_min(1e-30)).max()} steps"
    assert (error.amax(dim=1)[absmax > 0] > scale.double()[absmax > 0] / 4).all()  # really rounded, not exact


def test_quantize_rejects_bad_weights():
    with pytest.raises(ValueError, match="inf or NaN"):
        gpt2_kernels.quantize_int8(torch.tensor([[1.0, float("nan")]]))
    with pytest.raises(ValueError, match="2-D"):
        gpt2_kernels.quantize_int8(torch.ones(3))
    with pytest.raises(ValueError, match="float"):
        gpt2_kernels.quantize_int8(torch.ones(2, 2, dtype=torch.int32))


def test_rejects_bad_inputs():
    weight_int8, scale = quantized(8, 16, device="cpu")
    x = torch.randn(2, 16)
    with pytest.raises(ValueError, match="scale must be \\(8,\\) float32"):
        gpt2_kernels.int8_linear(x, weight_int8, scale.bfloat16())
    with pytest.raises(ValueError, match="int8 tensor"):
        gpt2_kernels.int8_linear(x, weight_int8.float(), scale)
    with pytest.raises(ValueError, match="x must be \\(..., 16\\)"):
        gpt2_kernels.int8_linear(torch.randn(2, 15), weight_int8, scale)
    with pytest.raises(ValueError, match="x must be"):
        gpt2_kernels.int8_linear(x.double(), weight_int8, scale)
    with pytest.raises(ValueError, match="bias must be"):
        gpt2_kernels.int8_linear(x, weight_int8, scale, torch.zeros(7))


def test_bf16_on_the_interpreter_is_refused():
    if DEVICE != "cpu":
        pytest.skip("only the CPU interpreter refuses bf16")
    pytest.importorskip("triton")
    weight_int8, scale = quantized(8, 16)
    with pytest.raises(ValueError, match="interpreter"):
        gpt2_kernels.int8_linear(torch.randn(2, 16, dtype=torch.bfloat16), weight_int8, scale, backend="triton")


def test_quantized_linear_tracks_the_float_linear():
    """End to end: quantize a float layer and compare with F.linear on the original weights, within the
    bound of the module docstring (scale / 2 * sum |x| per output)."""
    w = torch.randn(96, 200, generator=torch.Generator().manual_seed(4)) * 0.02
    x = make_x((4, 200), torch.float32, device="cpu")
    weight_int8, scale = gpt2_kernels.quantize_int8(w)
    error = (gpt2_kernels.int8_linear(x, weight_int8, scale, backend="torch").double() - (x.double() @ w.double().T)).abs()
    bound = x.double().abs().sum(dim=1, keepdim=True) * scale.double()[None, :] / 2
    assert (error <= bound * 1.001 + 1e-6).all()
    assert error.max() > 0


# ---------------------------------------------------------------------------------------------- the CPU kernel

cpu_linear = importlib.import_module("gpt2_kernels.cpu_linear")


@pytest.fixture
def fresh_kernel(monkeypatch, tmp_path):
    """cpu_linear loaded again from scratch into an empty cache directory (it loads once per process)."""
    cpu_linear._load.cache_clear()
    monkeypatch.setenv(cpu_linear.CACHE_ENV, str(tmp_path))
    yield tmp_path
    cpu_linear._load.cache_clear()


def require_cpu_kernel():
    if not cpu_linear.available():
        pytest.skip(f"the CPU kernel cannot run here: {cpu_linear.unavailable_reason()}")


@pytest.mark.parametrize("has_bias", [True, False], ids=["bias", "no-bias"])
@pytest.mark.parametrize("M", [1, 2, 3, 4, 5, 7, 8, 9, cpu_linear.MAX_ROWS])
def test_cpu_kernel_matches_reference(M, has_bias):
    """Every row-block shape of cpu_linear.c (1, 2, 3-4 rows per tile, the rest) and odd sizes: K = 100 has a
    4-element tail after 8-wide vectors, N = 37 a partial block of weight rows. Two threads give the same
    bits as one (each output is summed by one thread in the same order)."""
    require_cpu_kernel()
    weight_int8, scale = quantized(37, 100, device="cpu")
    bias = make_x((37,), torch.float32, device="cpu", seed=2) if has_bias else None
    x = make_x((M, 100), torch.float32, device="cpu")
    y = cpu_linear.linear(x, weight_int8, scale, bias)
    atol, rtol = TOLERANCES[torch.float32]
    torch.testing.assert_close(y.double(), reference(x, weight_int8, scale, bias), atol=atol, rtol=rtol)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        assert torch.equal(cpu_linear.linear(x, weight_int8, scale, bias), y)
    finally:
        torch.set_num_threads(threads)


def test_cpu_kernel_is_the_eager_path_for_few_rows(monkeypatch):
    """int8_linear on the CPU: up to MAX_ROWS rows through the kernel (any activation dtype), more rows
    dequantise; without the kernel every size falls back, with the same values."""
    require_cpu_kernel()
    calls = []
    kernel = cpu_linear.linear
    monkeypatch.setattr(cpu_linear, "linear", lambda *a: calls.append(a[0].shape[0]) or kernel(*a))
    weight_int8, scale = quantized(33, 64, device="cpu")
    bias = make_x((33,), torch.float32, device="cpu", seed=2)
    for rows in (1, 8, cpu_linear.MAX_ROWS + 1):
        for dtype in DTYPES:
            check(make_x((rows, 64), dtype, device="cpu"), weight_int8, scale, bias.to(dtype), "torch")
    assert calls == [1] * 3 + [8] * 3
    x = make_x((2, 4, 64), torch.float32, device="cpu")
    y = gpt2_kernels.int8_linear(x, weight_int8, scale, bias, backend="torch")
    monkeypatch.setattr(cpu_linear, "available", lambda: False)
    torch.testing.assert_close(gpt2_kernels.int8_linear(x, weight_int8, scale, bias, backend="torch"), y, atol=1e-5, rtol=1e-5)
    assert calls[-1] == 8


def test_cpu_kernel_is_built_once_into_its_cache(fresh_kernel):
    require_cpu_kernel()
    (library,) = fresh_kernel.glob("cpu_linear-*.so")  # built atomically: no temporary file is left
    assert list(fresh_kernel.iterdir()) == [library]
    built = library.stat().st_mtime_ns
    cpu_linear._load.cache_clear()  # as a new process would: the library is found, not rebuilt
    assert cpu_linear.available() and library.stat().st_mtime_ns == built


def test_cpu_kernel_without_a_compiler_falls_back(fresh_kernel, monkeypatch):
    monkeypatch.setenv("CC", str(fresh_kernel / "no-such-cc"))
    monkeypatch.setenv("PATH", str(fresh_kernel))
    assert not cpu_linear.available()
    assert "compiler" in cpu_linear.unavailable_reason() or "AVX2" in cpu_linear.unavailable_reason()
    weight_int8, scale = quantized(9, 16, device="cpu")
    check(make_x((2, 16), torch.float32, device="cpu"), weight_int8, scale, None, "torch")
    with pytest.raises(RuntimeError, match="unavailable"):
        cpu_linear.linear(make_x((2, 16), torch.float32, device="cpu"), weight_int8, scale, None)


@pytest.mark.slow
def test_compiled_cpu_path_streams_int8_weights():
    """Compiled on the CPU (decoding rows), the fallback reads the int8 weights inside inductor's loop and
    never makes a float copy of them; the LayerNorm before it stays a separate kernel (not recomputed per
    weight row). Values as the eager path; rows above CPU_STREAM_MAX_ROWS take the dequantising path."""
    from torch._inductor.utils import run_and_get_code

    weight_int8, scale = quantized(96, 200, device="cpu")
    bias = make_x((96,), torch.float32, device="cpu", seed=2)
    ln_w, ln_b = make_x((200,), torch.float32, device="cpu", seed=3), make_x((200,), torch.float32, device="cpu", seed=4)

    def layer(x):
        h = torch.nn.functional.layer_norm(x, (200,), ln_w, ln_b)
        return gpt2_kernels.int8_linear(h, weight_int8, scale, bias, backend="torch")

    compiled = torch.compile(layer, fullgraph=True, dynamic=False)
    for rows in (1, int8_module.CPU_STREAM_MAX_ROWS, int8_module.CPU_STREAM_MAX_ROWS + 1):
        x = make_x((rows, 200), torch.float32, device="cpu")
        y, (code,) = run_and_get_code(compiled, x)
        h = torch.nn.functional.layer_norm(x, (200,), ln_w, ln_b)
        torch.testing.assert_close(y.double(), reference(h, weight_int8, scale, bias), **dict(zip(("atol", "rtol"), TOLERANCES[torch.float32])))
        streams = rows <= int8_module.CPU_STREAM_MAX_ROWS
        assert "const int8_t*" in code  # a generated C++ kernel reads the int8 weights, in both paths
        assert ("gpt2_kernels_int8_linear.materialize" in code) == streams
        # ... but only the dequantising path writes them out as floats first
        assert ("empty_strided_cpu((96, 200)" in code) != streams, f"{rows} rows, streaming {streams}"


@requires_cuda
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("M", [1, 8, 16, 17, 512])
@pytest.mark.parametrize("K, N", [(768, 2304), (3072, 768), (768, 50257)], ids=str)
def test_cuda_gpt2_shapes(K, N, M, dtype):
    weight_int8, scale = quantized(N, K, device="cuda")
    bias = make_x((N,), dtype, device="cuda", seed=2)
    x = make_x((M, K), dtype, device="cuda")
    y = gpt2_kernels.int8_linear(x, weight_int8, scale, bias, backend="triton")
    # relative to the output's scale: 16-bit activations round x and y, fp32 only sums in another order
    expected = reference(x, weight_int8, scale, bias)
    atol = {torch.float32: 1e-3, torch.float16: 5e-2, torch.bfloat16: 2e-1}[dtype]
    torch.testing.assert_close(y.double().cpu(), expected, atol=atol, rtol=TOLERANCES[dtype][1])


COMPILE_INT8 = r"""
import importlib, json, re, subprocess, tempfile, torch, triton
from triton.backends.compiler import GPUTarget
from triton.backends.nvidia.compiler import get_ptxas
from triton.compiler import ASTSource
m = importlib.import_module("gpt2_kernels.int8_linear")

TYPES = {torch.bfloat16: "*bf16", torch.float16: "*fp16", torch.float32: "*fp32"}
POINTERS = ("x_ptr", "w_ptr", "scale_ptr", "bias_ptr", "out_ptr", "partial_ptr")
# What the JIT specialises for contiguous, 16-byte aligned tensors with K a multiple of 16 (GPT-2's
# 768 and 3072): unit strides become constants, pointers and these ints get divisibility 16.
UNIT_STRIDES = dict(sx_k=1, sw_k=1, so_n=1)
ALIGNED = POINTERS + ("K", "k_per_split", "sx_m", "sw_n")
results = []

def spills(ptx):
    with tempfile.NamedTemporaryFile("w", suffix=".ptx") as f:
        f.write(ptx)
        f.flush()
        log = subprocess.run([get_ptxas(90).path, "-v", "--gpu-name=sm_90a", f.name, "-o", "/dev/null"],
                             capture_output=True, text=True, check=True).stderr
    return sum(int(n) for n in re.findall(r"(\d+) bytes spill (?:stores|loads)", log))

def compile_sm90(label, kernel, types, constexprs, num_warps, num_stages):
    names = kernel.arg_names
    signature = {name: "constexpr" if name in constexprs else types.get(name, "i32") for name in names}
    attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in ALIGNED if n in names and n not in constexprs}
    compiled = triton.compile(ASTSource(kernel, signature, constexprs, attrs), target=GPUTarget("cuda", 90, 32),
                              options={"num_warps": num_warps, "num_stages": num_stages})
    results.append([label, compiled.metadata.shared, spills(compiled.asm["ptx"])])

for (kind, sixteen_bit), (block_m, block_n, block_k, warps, stages) in m._CUDA_TILES.items():
    for dtype in ([torch.bfloat16, torch.float16] if sixteen_bit else [torch.float32]):
        ty = TYPES[dtype]
        for has_bias in (True, False):
            for split_k in ((1, 4) if kind == "decode" else (1,)):
                types = dict(x_ptr=ty, w_ptr="*i8", scale_ptr="*fp32", bias_ptr=ty, out_ptr=ty, partial_ptr="*fp32")
                constexprs = dict(HAS_BIAS=has_bias, SPLIT_K=split_k, BLOCK_M=block_m, BLOCK_N=block_n,
                                  BLOCK_K=block_k, PRECISION="tf32" if sixteen_bit else "ieee", **UNIT_STRIDES)
                constexprs.update({} if has_bias else {"bias_ptr": None})
                constexprs.update({"partial_ptr": None} if split_k == 1 else {"out_ptr": None, "scale_ptr": None, "bias_ptr": None})
                compile_sm90(f"int8_linear {kind} {dtype} bias={has_bias} split={split_k}", m._int8_linear_kernel,
                             types, constexprs, warps, stages)
for dtype, ty in TYPES.items():
    for has_bias in (True, False):
        compile_sm90(f"int8 split-k epilogue {dtype} bias={has_bias}", m._int8_splitk_epilogue_kernel,
                     dict(partial_ptr="*fp32", scale_ptr="*fp32", bias_ptr=ty, out_ptr=ty),
                     dict(HAS_BIAS=has_bias, SPLIT_K=4, BLOCK_N=m.EPILOGUE_BLOCK_N, so_n=1,
                          **({} if has_bias else {"bias_ptr": None})), 4, 1)
print(json.dumps(results))
"""


def test_int8_kernels_compile_for_h100():
    """Every tile config of _CUDA_TILES, for each activation dtype, with and without bias and split-K,
    compiles for sm_90 with Triton's bundled ptxas (no GPU needed), within the H100's shared memory and
    without register spills."""
    pytest.importorskip("triton.backends.nvidia", reason="Triton's NVIDIA backend is not installed")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # real JIT functions
    env.update(PYTHONPATH=str(ROOT), TRITON_DEFAULT_FP_FUSION="1")
    result = subprocess.run([sys.executable, "-c", COMPILE_INT8], env=env, cwd=ROOT, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    compiled = json.loads(result.stdout.splitlines()[-1])
    # decode 16-bit: 2 dtypes x 2 bias x 2 splits; decode fp32: 2 x 2; prefill 16-bit: 2 x 2; prefill fp32: 2;
    # the epilogue: 3 dtypes x 2 bias
    assert len(compiled) == 8 + 4 + 4 + 2 + 6
    for label, shared, spilled in compiled:
        assert shared <= H100_SHARED_MEMORY, f"{label} needs {shared} bytes of shared memory"
        assert spilled == 0, f"{label} spills {spilled} bytes of registers"
