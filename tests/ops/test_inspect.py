"""csa_kernels.inspect: what the kernel compiles to for an NVIDIA target, checked without a GPU.

The compile runs in a subprocess because the test session interprets Triton kernels (TRITON_INTERPRET=1,
fixed when the kernel module is imported); one compile per test (~10-20 s on a 2-core machine).

What runs is what is checked: the default configs (``tuning.fixed_config``) of the path a launch on each
arch takes, compiled with a launch's specialization — on sm_90 the descriptor path (TMA loads, wgmma), on
sm_89 (and sm_80/86) the pointer path (16-byte cp.async, mma.sync) — with zero spills and shared memory
within the arch's limit, at head dims 64 and 128 in fp16 and bf16; the sm_90 ones also meet the issue's
bar of <= 255 (hd64) and <= 260 (hd128) SASS instructions per 1,000 scores in the steady loop.
"""

import json
import os
import subprocess
import sys

import pytest

from csa_kernels.inspect import _load_kind, _mma_kind, parse_sass, steady_loops
from csa_kernels.tuning import FIXED, shared_memory_limit

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCRIPT = r"""
import json, sys, torch
from csa_kernels.inspect import inspect_kernel
from csa_kernels.tuning import fixed_config
arch, dtype, head_dim, path, example, features = json.loads(sys.argv[1])
dtype = getattr(torch, dtype)
config = fixed_config(head_dim, dtype, path, int8=features.get("int8", False))
kwargs = {**features, **({} if example else {"example": None})}
row = inspect_kernel(arch, head_dim, dtype, config, path=path, **kwargs)
print(json.dumps(row))
"""


def run_python(*args: str) -> str:
    env = {key: val for key, val in os.environ.items() if key != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run([sys.executable, *args], env=env, capture_output=True, text=True, cwd=ROOT)
    if proc.returncode and "GPUTarget" in proc.stderr and "ImportError" in proc.stderr:
        pytest.skip("this Triton has no ahead-of-time NVIDIA compile API")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def inspect_default(
    arch: int, dtype: str, head_dim: int, path: str, example: bool = True, features: dict | None = None
) -> dict:
    """``features``: compile_for_target's feature flags (has_key_lengths, has_pool_ranges), default off."""
    args = json.dumps([arch, dtype, head_dim, path, example, features or {}])
    return json.loads(run_python("-c", SCRIPT, args).splitlines()[-1])


# (arch, path, dtype, head dim, load kind, mma kind). bf16 and fp16 compile to the same tiles and
# instruction mix (only the MMA's type differs; every pruned config in both dtypes is in
# benchmarks/results/inspect_pruned_*.json), so the default run compiles sm_90 at hd64 (fp16) and hd128
# (bf16) and sm_89 at hd64; the other defaults run with --run-slow.
DEFAULTS = [
    (90, "tma", "float16", 64, "TMA", "wgmma"),
    (90, "tma", "bfloat16", 128, "TMA", "wgmma"),
    # sm_89's fp16 hd64 default compiles by default through the CLI (test_cli_writes_the_default_row)
    pytest.param(89, "pointer", "float16", 64, "cp.async.128", "mma", marks=pytest.mark.slow),
    pytest.param(89, "pointer", "bfloat16", 128, "cp.async.128", "mma", marks=pytest.mark.slow),
    pytest.param(90, "tma", "bfloat16", 64, "TMA", "wgmma", marks=pytest.mark.slow),
    pytest.param(90, "tma", "float16", 128, "TMA", "wgmma", marks=pytest.mark.slow),
    pytest.param(89, "pointer", "bfloat16", 64, "cp.async.128", "mma", marks=pytest.mark.slow),
    pytest.param(89, "pointer", "float16", 128, "cp.async.128", "mma", marks=pytest.mark.slow),
    pytest.param(80, "pointer", "float16", 128, "cp.async.128", "mma", marks=pytest.mark.slow),
]
SM90_BAR = {64: 255, 128: 260}  # SASS instructions per 1,000 scores (Triton's tutorial: ~255 / ~254)


@pytest.mark.parametrize(("arch", "path", "dtype", "head_dim", "load", "mma"), DEFAULTS)
def test_default_configs_compile_clean(arch, path, dtype, head_dim, load, mma):
    row = inspect_default(arch, dtype, head_dim, path)
    assert row["spill_bytes"] == 0 and row["local_bytes"] == 0, row
    assert row["load"] == load and row["mma"] == mma, row
    assert row["shared_bytes"] <= shared_memory_limit(arch), row
    assert len(row["loops"]) >= 2 and row["instr_per_1k_scores"] > 0, row  # own tokens, then borrowed
    if arch == 90:
        assert row["instr_per_1k_scores"] <= SM90_BAR[head_dim], row


@pytest.mark.parametrize(
    ("arch", "path", "dtype", "head_dim", "load", "mma"),
    [
        (90, "tma", "float16", 64, "TMA", "wgmma"),
        pytest.param(90, "tma", "bfloat16", 128, "TMA", "wgmma", marks=pytest.mark.slow),
        pytest.param(89, "pointer", "float16", 64, "cp.async.128", "mma", marks=pytest.mark.slow),
        pytest.param(89, "pointer", "bfloat16", 128, "cp.async.128", "mma", marks=pytest.mark.slow),
    ],
)
def test_key_lengths_and_pool_ranges_compile_clean(arch, path, dtype, head_dim, load, mma):
    """The default configs with both per-frame loads on (key lengths, pool ranges): still spill-free, the
    same load and MMA kinds, and on sm_90 the same bar — the loads happen once per program, outside the
    loops."""
    features = {"has_key_lengths": True, "has_pool_ranges": True}
    row = inspect_default(arch, dtype, head_dim, path, features=features)
    assert row["spill_bytes"] == 0 and row["local_bytes"] == 0, row
    assert row["load"] == load and row["mma"] == mma, row
    assert row["shared_bytes"] <= shared_memory_limit(arch), row
    assert row["has_key_lengths"] and row["has_pool_ranges"], row  # the flags reached the compile
    if arch == 90:
        assert row["instr_per_1k_scores"] <= SM90_BAR[head_dim], row


@pytest.mark.parametrize(
    ("arch", "path", "dtype", "head_dim", "load", "mma"),
    [
        (90, "tma", "float16", 128, "TMA+cp.async", "wgmma.s8+wgmma"),  # cp.async: the key scales
        pytest.param(90, "tma", "bfloat16", 64, "TMA+cp.async", "wgmma.s8+wgmma", marks=pytest.mark.slow),
        pytest.param(89, "pointer", "float16", 64, "cp.async.128", "mma.s8+mma", marks=pytest.mark.slow),
        pytest.param(89, "pointer", "bfloat16", 128, "cp.async.128", "mma.s8+mma", marks=pytest.mark.slow),
        pytest.param(80, "pointer", "float16", 128, "cp.async.128", "mma.s8+mma", marks=pytest.mark.slow),
    ],
)
def test_int8_default_configs_compile_clean(arch, path, dtype, head_dim, load, mma):
    """The 8-bit path's fixed configs: spill-free, integer MMAs for Q·Kᵀ (IGMMA on sm_90, IMMA before)
    beside the 16-bit MMAs of P·V, shared memory within the arch's limit and under the pruning bound."""
    import torch

    from csa_kernels.tuning import fixed_config, int8_shared_bytes

    row = inspect_default(arch, dtype, head_dim, path, features={"int8": True})
    assert row["int8"] and row["spill_bytes"] == 0 and row["local_bytes"] == 0, row
    assert row["load"] == load and row["mma"] == mma, row
    config = fixed_config(head_dim, getattr(torch, dtype), path, int8=True)
    bound = int8_shared_bytes(config["BLOCK_M"], config["BLOCK_N"], config["num_stages"], head_dim, 2, path)
    assert row["shared_bytes"] <= min(bound, shared_memory_limit(arch)), row
    assert len(row["loops"]) >= 2 and row["instr_per_1k_scores"] > 0, row


@pytest.mark.slow  # compiles a kernel no launch runs, only to show what the hints change
def test_launch_hints_change_the_code():
    launch = inspect_default(90, "float16", 64, "pointer")
    no_hints = inspect_default(90, "float16", 64, "pointer", example=False)
    assert launch["registers"] < no_hints["registers"], (launch, no_hints)
    assert launch["load"] == "cp.async.128" and "cp.async" not in no_hints["load"], (launch, no_hints)


def test_cli_writes_the_default_row(tmp_path):
    """`python -m csa_kernels.inspect --arch 89`: the path and config a launch there runs (pointers,
    the fixed hd64 config), spill-free with 16-byte cp.async and mma.sync, as a printed table and a JSON
    row."""
    out = run_python("-m", "csa_kernels.inspect", "--arch", "89", "--head-dim", "64", "--out", str(tmp_path))
    assert "instr_per_1k_scores" in out
    (path,) = tmp_path.iterdir()
    (row,) = json.loads(path.read_text())
    assert row["arch"] == 89 and row["path"] == "pointer" and row["head_dim"] == 64
    assert row["config"] == "{BLOCK_M}x{BLOCK_N}x{num_warps}x{num_stages}".format(**FIXED[("pointer", 64)])
    assert row["spill_bytes"] == 0 and row["local_bytes"] == 0, row
    assert row["load"] == "cp.async.128" and row["mma"] == "mma", row
    assert row["shared_bytes"] <= shared_memory_limit(89) and row["warp_specialized"] is False, row


SASS = """
        /*0000*/                   LDC R1, c[0x0][0x28] ;
        /*0010*/                   LDGSTS.E.BYPASS.128 [R107+0x4000], desc[UR10][R4.64], P4 ;
        /*0020*/                   HMMA.16816.F32 R24, R4, R8, RZ ;
        /*0030*/                   FADD R2, R2, R3 ;
        /*0040*/              @!P4 BRA 0x10 ;
        /*0050*/                   LDG.E.U16 R3, desc[UR10][R4.64] ;
        /*0060*/               @P3 BRA 0x0 ;
        /*0070*/                   EXIT ;
"""


def test_steady_loop_is_the_innermost_mma_loop():
    instrs = parse_sass(SASS)
    assert len(instrs) == 8 and instrs[4][1] == "BRA"
    (loop,) = steady_loops(instrs)  # [0x10, 0x40]; the outer [0x0, 0x60] holds it
    assert [addr for addr, _, _ in loop] == [0x10, 0x20, 0x30, 0x40]
    assert _load_kind(loop) == "cp.async.128" and _mma_kind(loop) == "mma"
    assert _load_kind(instrs) == "cp.async.128+ldg"
