"""The Triton kernels compile for an H100 (sm_90), checked on any machine, GPU or not.

The interpreter tests run the kernels' logic but not Triton's compiler, which rejects things the
interpreter lets through (loop-carried values changing type, tiles overflowing shared memory).
Triton compiles ahead of time for a named target with the ptxas it bundles, so this test compiles
every kernel with the tile sizes `kernels` would launch on an H100 (16-bit at head dim 64, for
training and for decoding, and fp32 at head dim 128: the most registers per tile) without needing
the GPU itself.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
H100_SHARED_MEMORY = 227 * 1024  # bytes per block

COMPILE_ALL = r"""
import importlib, json, torch, triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

attention, layer_norm, gelu = (importlib.import_module(f"kernels.{m}") for m in ("attention", "layer_norm", "gelu"))
TENSOR_POINTERS = {"Q", "K", "V", "O", "DO", "DQ", "DK", "DV"}  # the others end in _ptr
FP32_POINTERS = {"LSE", "DELTA", "mean_ptr", "rstd_ptr", "dw_partial_ptr", "db_partial_ptr", "partial_ptr"}
FLOAT_SCALARS = {"eps", "qk_scale", "scale"}
results = []

def compile_sm90(label, kernel, dtype, constexprs, num_warps, num_stages=3):
    ty = {torch.bfloat16: "*bf16", torch.float16: "*fp16", torch.float32: "*fp32"}[dtype]
    signature = {name: "constexpr" if name in constexprs else "*fp32" if name in FP32_POINTERS else
                 ty if name in TENSOR_POINTERS or name.endswith("_ptr") else
                 "fp32" if name in FLOAT_SCALARS else "i32" for name in kernel.arg_names}
    compiled = triton.compile(ASTSource(kernel, signature, constexprs), target=GPUTarget("cuda", 90, 32),
                              options={"num_warps": num_warps, "num_stages": num_stages})
    results.append([label, compiled.metadata.shared])

for dtype, head_dim in [(torch.bfloat16, 64), (torch.float32, 128)]:
    tiles = attention._tiles(head_dim, dtype, torch.device("cuda"), Tq=1024)
    precision = "ieee" if dtype == torch.float32 else "tf32"
    for name, kernel in [("fwd", attention._attn_fwd_kernel), ("dkdv", attention._attn_bwd_dkdv_kernel),
                         ("dq", attention._attn_bwd_dq_kernel)]:
        block_m, block_n, warps, stages = tiles[name]
        compile_sm90(f"attention {name} {dtype} D{head_dim}", kernel, dtype,
                     dict(HEAD_DIM=head_dim, BLOCK_M=block_m, BLOCK_N=block_n, PRECISION=precision), warps, stages)
    compile_sm90(f"attention delta {dtype} D{head_dim}", attention._attn_bwd_delta_kernel, dtype,
                 dict(HEAD_DIM=head_dim, BLOCK_M=64), 4)
block_m, block_n, warps, stages = attention._tiles(64, torch.bfloat16, torch.device("cuda"), Tq=1)["fwd"]
compile_sm90("attention fwd decoding", attention._attn_fwd_kernel, torch.bfloat16,
             dict(HEAD_DIM=64, BLOCK_M=block_m, BLOCK_N=block_n, PRECISION="tf32"), warps, stages)
block_n = 2048
warps = layer_norm._num_warps(block_n)
compile_sm90("layer_norm fwd", layer_norm._ln_fwd_kernel, torch.bfloat16, dict(HAS_WEIGHT=True, HAS_BIAS=True, BLOCK_N=block_n), warps)
compile_sm90("layer_norm bwd", layer_norm._ln_bwd_dx_kernel, torch.bfloat16, dict(HAS_WEIGHT=True, HAS_BIAS=True, BLOCK_N=block_n), warps)
compile_sm90("layer_norm bwd no affine", layer_norm._ln_bwd_dx_kernel, torch.bfloat16,
             dict(HAS_WEIGHT=False, HAS_BIAS=False, BLOCK_N=block_n, w_ptr=None, dw_partial_ptr=None, db_partial_ptr=None), warps)
compile_sm90("layer_norm dw/db sum", layer_norm._sum_partials_kernel, torch.bfloat16, dict(BLOCK_G=32, BLOCK_N=layer_norm.DWDB_BLOCK_N), 4)
compile_sm90("gelu fwd", gelu._gelu_fwd_kernel, torch.bfloat16, dict(BLOCK=gelu.BLOCK_SIZE), 4)
compile_sm90("gelu bwd", gelu._gelu_bwd_kernel, torch.bfloat16, dict(BLOCK=gelu.BLOCK_SIZE), 4)
print(json.dumps(results))
"""


def test_kernels_compile_for_h100():
    pytest.importorskip("triton.backends.nvidia", reason="Triton's NVIDIA backend is not installed")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # real JIT functions
    env.update(PYTHONPATH=str(ROOT), TRITON_DEFAULT_FP_FUSION="1")  # (the default, without a warning)
    result = subprocess.run([sys.executable, "-c", COMPILE_ALL], env=env, cwd=ROOT, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    compiled = json.loads(result.stdout.splitlines()[-1])
    assert len(compiled) == 15
    for label, shared in compiled:
        assert shared <= H100_SHARED_MEMORY, f"{label} needs {shared} bytes of shared memory"
