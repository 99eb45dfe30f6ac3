"""The kernel a Hopper launch runs (the descriptor path, triton_tma.py) compiles for sm_90 on a machine
without a GPU in the variants test_inspect.py's default configs do not cover: a head dim that is not a
power of two without a bank (D=40: 80-byte rows, boxes padded to 64 columns), and query-row ranges (joint
DiT sequences). ``compile_for_target`` compiles with the specialization a real launch of contiguous tensors
gets, so the PTX checked here is the code that runs: TMA tile loads (``cp.async.bulk.tensor``), wgmma.

Each case compiles in its own subprocess because the test session interprets Triton kernels
(TRITON_INTERPRET=1), and Triton fixes that choice when the kernel module is imported. No subprocess
timeout: a busy machine makes compiles slow, not wrong.

fp32 products are exact (ieee), which Triton lowers to FMAs; LLVM takes long over the unrolled FMA loops
of a D=160 tile, so the fp32 cases run only with ``--run-slow`` (marker ``slow``).
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
    "tma": "cp.async.bulk.tensor" in ptx,
}))
"""

CASES = [
    pytest.param(
        "float16",
        40,
        dict(block_m=128, block_n=128, num_warps=8, num_stages=3, has_bank=False),
        id="fp16-D40-nobank",
    ),
    pytest.param(
        "bfloat16",
        64,
        dict(block_m=128, block_n=128, num_warps=8, num_stages=3, has_row_range=True),
        id="bf16-D64-query-rows",
        marks=pytest.mark.slow,  # the row range's code runs under the interpreter in test_tma_path.py
    ),
    pytest.param(
        "float32",
        16,
        dict(block_m=64, block_n=32, num_warps=4, num_stages=2),
        id="fp32-D16",
        marks=pytest.mark.slow,
    ),
    pytest.param(
        "float32",
        160,
        dict(block_m=64, block_n=32, num_warps=4, num_stages=2),
        id="fp32-D160",
        marks=pytest.mark.slow,
    ),
]


def compile_in_subprocess(dtype: str, head_dim: int, kwargs: dict) -> dict:
    env = {key: val for key, val in os.environ.items() if key != "TRITON_INTERPRET"}
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    case = json.dumps([dtype, head_dim, {**kwargs, "path": "tma"}])
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
    assert report["tma"], report  # tiles arrive by TMA, as a Hopper launch loads them


WS_SCRIPT = r"""
import json, sys, torch
from csa_kernels.triton_kernel import compile_for_target
arch = int(sys.argv[1])
kernel = compile_for_target(
    torch.float16, 64, block_m=128, block_n=128, num_warps=8, num_stages=3, path="tma", arch=arch,
    warp_specialize=True,
)
print(json.dumps({"split": "ttg.warp_specialize" in kernel.asm["ttgir"]}))
"""


@pytest.mark.parametrize(
    ("arch", "split"),
    [
        # ~20 s of compile each; the facts are also in README and benchmarks/results/inspect_*: slow tier
        pytest.param(100, True, marks=pytest.mark.slow, id="100-split"),
        pytest.param(90, False, marks=pytest.mark.slow, id="90-not-split"),
    ],
)
def test_warp_specialization_where_triton_applies_it(arch, split):
    """The descriptor kernel's loops, asked to warp-specialize: Triton splits them into producer and
    consumer warps on Blackwell (sm_100) and leaves them as they are on Hopper (sm_90), which is why the
    autotuner tries the split only from sm_100 (``tuning.warp_specialization_applies``)."""
    env = {key: val for key, val in os.environ.items() if key != "TRITON_INTERPRET"}
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run(
        [sys.executable, "-c", WS_SCRIPT, str(arch)], env=env, capture_output=True, text=True
    )
    if proc.returncode and "GPUTarget" in proc.stderr and "ImportError" in proc.stderr:
        pytest.skip("this Triton has no ahead-of-time NVIDIA compile API")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(proc.stdout.strip().splitlines()[-1])["split"] is split
