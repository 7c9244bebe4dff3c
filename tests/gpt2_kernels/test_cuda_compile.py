"""The Triton kernels compile for an H100 (sm_90), checked on any machine, GPU or not.

The interpreter tests run the kernels' logic but not Triton's compiler, which rejects things the
interpreter lets through (loop-carried values changing type, tiles overflowing shared memory).
Triton compiles ahead of time for a named target with the ptxas it bundles, so this test compiles,
without needing the GPU itself:
- every tile config the attention autotuner may pick on an H100 (`attention._tile_space`, pruned
  with the H100's shared memory) for what the models run: bf16 and fp16 at head dim 64, fp32 at
  head dims 64 and 128 (the most registers per tile), each for training and for decoding;
- LayerNorm, GELU and the linear cross-entropy kernel with the block sizes they launch with.
Each must fit the H100's shared memory, and (where Triton shows ptxas' log) spill no registers; the
attention tiles must also stay within the shared memory `attention._footprint` predicts, which is
what makes the pruning safe on GPUs with less of it.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

COMPILE_ALL = r"""
import contextlib, importlib, io, json, re, sys, torch, triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

attention, layer_norm, gelu, lce = (importlib.import_module(f"gpt2_kernels.{m}")
                                    for m in ("attention", "layer_norm", "gelu", "linear_cross_entropy"))
TENSOR_POINTERS = {"Q", "K", "V", "O", "DO", "DQ", "DK", "DV", "LOGITS"}  # the others end in _ptr
FP32_POINTERS = {"LSE", "DELTA", "LOSS", "mean_ptr", "rstd_ptr", "dw_partial_ptr", "db_partial_ptr", "partial_ptr"}
INT64_POINTERS = {"TARGETS"}
FLOAT_SCALARS = {"eps", "qk_scale", "scale", "grad_scale"}
results, seen = [], {}

def compile_sm90(label, kernel, dtype, constexprs, num_warps, num_stages=3, estimate=None):
    key = (kernel.fn.__name__, dtype, tuple(sorted(constexprs.items())), num_warps, num_stages)
    if key in seen:  # the same kernel again (a decoding tile that is also a training tile)
        results.append([label, *seen[key][1:3], estimate])
        return
    ty = {torch.bfloat16: "*bf16", torch.float16: "*fp16", torch.float32: "*fp32"}[dtype]
    signature = {name: "constexpr" if name in constexprs else "*fp32" if name in FP32_POINTERS else
                 "*i64" if name in INT64_POINTERS else
                 ty if name in TENSOR_POINTERS or name.endswith("_ptr") else
                 "fp32" if name in FLOAT_SCALARS else "i32" for name in kernel.arg_names}
    log = io.StringIO()
    with contextlib.redirect_stdout(log):  # TRITON_DUMP_PTXAS_LOG=1: ptxas -v's report, printed
        compiled = triton.compile(ASTSource(kernel, signature, constexprs), target=GPUTarget("cuda", 90, 32),
                                  options={"num_warps": num_warps, "num_stages": num_stages})
    spills = re.findall(r"(\d+) bytes spill stores", log.getvalue())
    results.append([label, compiled.metadata.shared, int(spills[-1]) if spills else None, estimate])
    seen[key] = results[-1]

for dtype, head_dim in [(torch.bfloat16, 64), (torch.float16, 64), (torch.float32, 64), (torch.float32, 128)]:
    precision = "ieee" if dtype == torch.float32 else "tf32"
    elem = torch.empty((), dtype=dtype).element_size()
    for name, kernel, Tq in [("fwd", attention._attn_fwd_kernel, 1024), ("decode", attention._attn_fwd_kernel, 1),
                             ("dkdv", attention._attn_bwd_dkdv_kernel, 1024), ("dq", attention._attn_bwd_dq_kernel, 1024)]:
        for tile in attention._tile_space("fwd" if name == "decode" else name, head_dim, dtype, Tq=Tq):
            block_m, block_n, warps, stages = tile
            shared = attention._footprint(name, block_m, block_n, stages, head_dim, elem)[1]
            compile_sm90(f"attention {name} {dtype} D{head_dim} {tile}", kernel, dtype,
                         dict(HEAD_DIM=head_dim, BLOCK_M=block_m, BLOCK_N=block_n, PRECISION=precision),
                         warps, stages, estimate=shared)
    compile_sm90(f"attention delta {dtype} D{head_dim}", attention._attn_bwd_delta_kernel, dtype,
                 dict(HEAD_DIM=head_dim, BLOCK_M=64), 4)
block_n = 2048
warps = layer_norm._num_warps(block_n)
compile_sm90("layer_norm fwd", layer_norm._ln_fwd_kernel, torch.bfloat16, dict(HAS_WEIGHT=True, HAS_BIAS=True, BLOCK_N=block_n), warps)
compile_sm90("layer_norm bwd", layer_norm._ln_bwd_dx_kernel, torch.bfloat16, dict(HAS_WEIGHT=True, HAS_BIAS=True, BLOCK_N=block_n), warps)
compile_sm90("layer_norm bwd no affine", layer_norm._ln_bwd_dx_kernel, torch.bfloat16,
             dict(HAS_WEIGHT=False, HAS_BIAS=False, BLOCK_N=block_n, w_ptr=None, dw_partial_ptr=None, db_partial_ptr=None), warps)
compile_sm90("layer_norm dw/db sum", layer_norm._sum_partials_kernel, torch.bfloat16, dict(BLOCK_G=32, BLOCK_N=layer_norm.DWDB_BLOCK_N), 4)
compile_sm90("gelu fwd", gelu._gelu_fwd_kernel, torch.bfloat16, dict(BLOCK=gelu.BLOCK_SIZE), 4)
compile_sm90("gelu bwd", gelu._gelu_bwd_kernel, torch.bfloat16, dict(BLOCK=gelu.BLOCK_SIZE), 4)
for dtype in (torch.bfloat16, torch.float16, torch.float32):
    for write_grad in (True, False):
        compile_sm90(f"linear_cross_entropy rows {dtype} grad={write_grad}", lce._ce_rows_kernel, dtype,
                     dict(BLOCK_V=lce.CUDA_BLOCK_V, WRITE_GRAD=write_grad), lce.CUDA_NUM_WARPS)
print(json.dumps(results))
"""


def test_kernels_compile_for_h100(tmp_path):
    pytest.importorskip("triton.backends.nvidia", reason="Triton's NVIDIA backend is not installed")
    from gpt2_kernels import attention

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # real JIT functions
    # An empty cache, so that ptxas runs (and reports spills) for every kernel: from Triton's cache a
    # kernel comes back without its log.
    env.update(PYTHONPATH=str(ROOT), TRITON_DEFAULT_FP_FUSION="1",  # (the default, without a warning)
               TRITON_DUMP_PTXAS_LOG="1", TRITON_CACHE_DIR=str(tmp_path))
    result = subprocess.run([sys.executable, "-c", COMPILE_ALL], env=env, cwd=ROOT, capture_output=True, text=True,
                            timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    compiled = json.loads(result.stdout.splitlines()[-1])
    tiles = [label for label, *_ in compiled if label.startswith("attention") and "delta" not in label]
    # Every kernel and config was compiled: at least one tile per attention kernel, dtype and head dim.
    for kernel in ("fwd", "decode", "dkdv", "dq"):
        for case in ("torch.bfloat16 D64", "torch.float16 D64", "torch.float32 D64", "torch.float32 D128"):
            assert any(label.startswith(f"attention {kernel} {case} ") for label in tiles), (kernel, case)
    assert len(compiled) == len(tiles) + 4 + 6 + 6
    for label, shared, spills, estimate in compiled:
        assert shared <= attention.H100_SHARED_MEMORY, f"{label} needs {shared} bytes of shared memory"
        assert spills == 0, f"{label} spills {spills} bytes of registers (None: no ptxas log)"
        if estimate is not None:
            assert shared <= estimate, f"{label}: {shared} bytes of shared memory, predicted at most {estimate}"
