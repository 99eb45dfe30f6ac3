"""csa_kernels.inspect: what the kernel compiles to for an NVIDIA target, checked without a GPU.

The compile runs in a subprocess because the test session interprets Triton kernels (TRITON_INTERPRET=1,
fixed when the kernel module is imported). The sm_90 test compiles twice (launch specialization and no
hints), the sm_80 one once (~5-12 s each on a 2-core machine).

What the launch-equivalent compile shows (Triton 3.9): the kernel loads K/V tiles through pointers, which
Triton pipelines with cp.async (LDGSTS) on sm_80 *and* sm_90 — TMA (UTMALDG) needs tensor descriptors,
which this kernel does not use — so both arches assert LDGSTS, 16 bytes wide, and no TMA.
"""

import json
import os
import subprocess
import sys

import pytest

from csa_kernels.inspect import _load_kind, _mma_kind, parse_sass, steady_loops

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCRIPT = r"""
import json, sys, torch
from csa_kernels.inspect import inspect_kernel
from csa_kernels.triton_kernel import fixed_config
arch = int(sys.argv[1])
config = fixed_config(64, torch.float16)
examples = ((4, 8, 1024, 512, 256), None)[: int(sys.argv[2])]
rows = [inspect_kernel(arch, 64, torch.float16, config, example=e) for e in examples]
print(json.dumps(rows))
"""


def run_python(*args: str) -> str:
    env = {key: val for key, val in os.environ.items() if key != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run([sys.executable, *args], env=env, capture_output=True, text=True, cwd=ROOT)
    if proc.returncode and "GPUTarget" in proc.stderr and "ImportError" in proc.stderr:
        pytest.skip("this Triton has no ahead-of-time NVIDIA compile API")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


@pytest.mark.parametrize(
    ("arch", "mma", "compare"),
    [
        (90, "wgmma", False),
        (80, "mma", False),
        # the no-hint comparison compiles a kernel no launch runs, only to show what the hints change
        pytest.param(90, "wgmma", True, marks=pytest.mark.slow, id="90-wgmma-vs-no-hints"),
    ],
)
def test_launch_compile_is_what_runs(arch, mma, compare):
    """``compare``: also compile without hints (once, on sm_90: the comparison is the same on every arch)."""
    rows = json.loads(run_python("-c", SCRIPT, str(arch), str(1 + compare)).strip().splitlines()[-1])
    launch = rows[0]
    assert launch["spill_bytes"] == 0 and launch["local_bytes"] == 0, launch
    assert launch["load"] == "cp.async.128", launch  # 16-byte cp.async, as a real launch (module docstring)
    assert launch["mma"] == mma, launch
    if compare:
        no_hints = rows[1]
        assert launch["registers"] < no_hints["registers"], (launch, no_hints)
        assert "cp.async" not in no_hints["load"], no_hints  # without the hints: loads through registers
    assert launch["loop_instructions"] > 0 and launch["instr_per_1k_scores"] > 0, launch
    assert len(launch["loops"]) >= 2, launch  # own tokens, then the borrowed ranges


def test_cli_writes_a_json_row(tmp_path):
    out = run_python(
        "-m", "csa_kernels.inspect", "--arch", "80", "--head-dim", "16", "--config", "64x32x4x2",
        "--out", str(tmp_path),
    )  # fmt: skip
    assert "instr_per_1k_scores" in out
    (path,) = tmp_path.iterdir()
    (row,) = json.loads(path.read_text())
    assert row["arch"] == 80 and row["config"] == "64x32x4x2" and row["head_dim"] == 16
    assert {"triton", "registers", "spill_bytes", "shared_bytes", "load", "mma"} <= row.keys()


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
