"""The kernel compiles for Hopper (sm_90) on a machine without a GPU, and uses its tensor-core path.

``compile_for_target`` compiles with the specialization a real launch of contiguous tensors gets (Triton's
own binder: 16-divisible strides and sizes, 16-byte-aligned pointers), so the PTX checked here is the code
that runs; without those hints Triton emits scalar 2-byte loads and ~1.6x the registers, which no launch
uses. 16-bit cases whose head dim is a multiple of 16 also check the K/V tiles arrive by 16-byte cp.async.

Each case compiles in its own subprocess because the test session interprets Triton kernels
(TRITON_INTERPRET=1), and Triton fixes that choice when the kernel module is imported. One subprocess per
case rather than one for all (measured: ~2 s more imports per case, against one ~30 s test): each test
costs ~8-12 CPU seconds with a cold Triton cache (less with a warm one), stays well under 30 s on a 2-core
machine, and a failure names its case. No subprocess timeout: a busy machine makes compiles slow, not wrong.

fp32 products are exact (ieee), which Triton lowers to FMAs; LLVM takes ~80 s over the unrolled FMA loops
of the D=160 tile, so that case runs only with ``--run-slow`` (marker ``slow``), and a D=16 tile keeps the
fp32 check (no tensor-core MMA of any kind) in the default run.
"""

import json
import os
import subprocess
import sys

import pytest

SCRIPT = r"""
import json, re, sys, torch
from csa_kernels.triton_kernel import compile_for_target
dtype, head_dim, kwargs = json.loads(sys.argv[1])
kernel = compile_for_target(getattr(torch, dtype), head_dim, **kwargs)
ptx = kernel.asm["ptx"]
print(json.dumps({
    "wgmma": "wgmma" in ptx,
    "any_mma": re.search(r"\b(?:wgmma|mma)\.", ptx) is not None,  # warpgroup or warp-level tensor cores
    "shared": kernel.metadata.shared,
    "cp_async_16": re.search(r"cp\.async\.cg\.shared\.global \[[^]]*\], \[[^]]*\], 0x10,", ptx) is not None,
}))
"""

CASES = [
    # fp16 at D=64 is also compiled by test_inspect.py (sm_90 and sm_80): slow tier here
    pytest.param(
        "float16",
        64,
        dict(block_m=128, block_n=64, num_warps=8, num_stages=3),
        id="fp16-D64",
        marks=pytest.mark.slow,
    ),
    pytest.param("bfloat16", 128, dict(block_m=128, block_n=64, num_warps=8, num_stages=2), id="bf16-D128"),
    pytest.param(
        "float16",
        40,
        dict(block_m=64, block_n=64, num_warps=4, num_stages=3, has_bank=False),
        id="fp16-D40-nobank",
    ),
    pytest.param(
        "float16",
        64,
        dict(block_m=128, block_n=64, num_warps=8, num_stages=3, has_row_range=True),
        id="fp16-D64-query-rows",
    ),
    pytest.param(
        "float32",
        16,
        dict(block_m=32, block_n=16, num_warps=4, num_stages=2),
        id="fp32-D16",
        marks=pytest.mark.slow,
    ),
    pytest.param(
        "float32",
        160,
        dict(block_m=64, block_n=32, num_warps=8, num_stages=2),
        id="fp32-D160",
        marks=pytest.mark.slow,
    ),
]


def compile_in_subprocess(dtype: str, head_dim: int, kwargs: dict) -> dict:
    env = {key: val for key, val in os.environ.items() if key != "TRITON_INTERPRET"}
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    case = json.dumps([dtype, head_dim, kwargs])
    proc = subprocess.run([sys.executable, "-c", SCRIPT, case], env=env, capture_output=True, text=True)
    if proc.returncode and "GPUTarget" in proc.stderr and "ImportError" in proc.stderr:
        pytest.skip("this Triton has no ahead-of-time NVIDIA compile API")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize(("dtype", "head_dim", "kwargs"), CASES)
def test_kernel_compiles_for_sm90(dtype, head_dim, kwargs):
    report = compile_in_subprocess(dtype, head_dim, kwargs)
    if dtype == "float32":
        # exact (ieee) products: FMAs, no tensor-core MMA at any precision (TF32 would be one; a tile this
        # small would take a warp-level mma.sync rather than wgmma, so "no wgmma" alone would not see it)
        assert not report["any_mma"], report
    else:
        assert report["wgmma"], report  # 16-bit inputs must reach Hopper's warpgroup MMA
    assert report["shared"] <= 227 * 1024, report  # H100 shared memory per block
    if dtype != "float32" and head_dim % 16 == 0:  # D=40: row stride 40 is not 16-divisible
        assert report["cp_async_16"], report  # 16-byte K/V loads, as the launch compiles them
