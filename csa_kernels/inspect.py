"""What the fused kernel compiles to on an NVIDIA target, without a GPU.

``python -m csa_kernels.inspect --arch 90 80 --head-dim 64 128 --dtype float16 bfloat16`` compiles the
kernel ahead of time (``compile_for_target``: the specialization a launch of contiguous tensors gets) and
reports per config:

- registers per thread and local memory (``cuobjdump -res-usage`` on the cubin), spill bytes (stores +
  loads, from ``ptxas -v`` run on the kernel's PTX with Triton's flags), Triton's shared memory;
- load kind in the steady loop: ``TMA`` (UTMALDG), ``cp.async`` (LDGSTS), ``ldg`` (LDG: scalar or vector
  loads through registers), with the widest access seen (e.g. ``cp.async.128``);
- MMA kind: ``wgmma`` (HGMMA, sm_90 warpgroup MMA), ``mma`` (HMMA, warp-level), or ``none`` (FMAs);
- SASS instructions per 1,000 scores in the steady loop (and in every steady loop: the borrowed ranges'
  loops are where an optional feature such as segment ids adds its work).

``--features segments`` (or row_range, key_lengths, pool_ranges) compiles those optional features on.
``--precision int8`` compiles the 8-bit path (int8 Q and keys, float32 row scales): its ``mma`` column then
names the integer MMA beside the 16-bit one (``mma.s8+mma``: IMMA on sm_80/89; ``wgmma.s8+wgmma``: IGMMA,
sm_90's warpgroup MMA on s8 operands).

**Steady loop.** The innermost loop in the SASS that holds MMA instructions: a backward branch (``BRA``
whose target address precedes it) closes a loop spanning [target, branch]; of those that contain an MMA,
the ones containing no smaller such loop are innermost. The kernel walks several key ranges (own tokens,
pool before / after the frame, bank), so there are several; the first (own tokens) is reported, and
``loops`` lists the instruction counts of all. One iteration of a warp executes the loop's instructions
once (predicated ones included, taken branches aside) and the block scores BLOCK_M × BLOCK_N pairs per
iteration, so: instructions per 1,000 scores = instructions × num_warps ÷ (BLOCK_M × BLOCK_N) × 1000.
It counts issue slots, not time: an HGMMA counts one like an IADD.

Tools: Triton's bundled ``cuobjdump`` and ``ptxas`` (``triton/backends/nvidia/bin``). Rows are device-free
(arch, Triton version, config, numbers); ``--out DIR`` writes them as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import tempfile

import torch

INSTR = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)([^;]*);")
CONFIG = re.compile(r"^(\d+)x(\d+)x(\d+)x(\d+)$")


def _tool(name: str) -> str:
    import triton

    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)


def _run(*cmd: str) -> str:
    return subprocess.run(cmd, check=True, capture_output=True, text=True).stdout


def parse_sass(sass: str) -> list[tuple[int, str, str]]:
    """(address, opcode, operands) per instruction of ``cuobjdump -sass`` output."""
    return [(int(a, 16), op, rest.strip()) for a, op, rest in INSTR.findall(sass)]


def _is_mma(op: str) -> bool:
    return op.split(".")[0] in ("HGMMA", "WGMMA", "HMMA", "IGMMA", "IMMA")


def steady_loops(instrs: list[tuple[int, str, str]]) -> list[list[tuple[int, str, str]]]:
    """The innermost loops holding MMA instructions, in program order (see the module docstring)."""
    loops = []
    for i, (addr, op, rest) in enumerate(instrs):
        target = re.match(r"0x([0-9a-f]+)", rest)
        if op.split(".")[0] == "BRA" and target and int(target.group(1), 16) < addr:
            body = [ins for ins in instrs[: i + 1] if ins[0] >= int(target.group(1), 16)]
            if any(_is_mma(ins[1]) for ins in body):
                loops.append(body)
    spans = [(body[0][0], body[-1][0]) for body in loops]
    inner = [
        body
        for body, (lo, hi) in zip(loops, spans, strict=True)
        if not any((a, b) != (lo, hi) and lo <= a and b <= hi for a, b in spans)
    ]
    return sorted(inner, key=lambda body: body[0][0])


def _load_kind(instrs) -> str:
    kinds = []
    for name, opcode in (("TMA", "UTMALDG"), ("cp.async", "LDGSTS"), ("ldg", "LDG")):
        ops = [op for _, op, _ in instrs if op.split(".")[0] == opcode]
        if ops:
            widths = [int(w) for op in ops for w in re.findall(r"\.(\d+)(?=\.|$)", op) if int(w) in (64, 128)]
            kinds.append(f"{name}.{max(widths)}" if widths else name)
    return "+".join(kinds) or "none"


def _mma_kind(instrs) -> str:
    """``wgmma`` (HGMMA), ``mma`` (HMMA) or ``none``; the 8-bit path's integer MMAs join it as
    ``wgmma.s8`` (IGMMA, sm_90's warpgroup MMA on s8 operands) or ``mma.s8`` (IMMA, sm_80/89), e.g.
    ``wgmma.s8+wgmma``: Q·Kᵀ in int8, P·V in 16 bits."""
    ops = {op.split(".")[0] for _, op, _ in instrs}
    kinds = [name for name, opcode in (("wgmma.s8", "IGMMA"), ("mma.s8", "IMMA")) if opcode in ops]
    kinds.append("wgmma" if ops & {"HGMMA", "WGMMA"} else "mma" if "HMMA" in ops else "none")
    return "+".join(kinds) if len(kinds) > 1 else kinds[0]


def _ptxas_spills(ptx: str, arch: int) -> int:
    from triton.backends.nvidia.compiler import get_ptxas, sm_arch_from_capability

    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        cmd = [get_ptxas(arch).path, "-lineinfo", "-v", "--regAllocOptLevel=2"]
        cmd += [f"--gpu-name={sm_arch_from_capability(arch)}", src, "-o", os.path.join(tmp, "k.o")]
        log = subprocess.run(cmd, check=True, capture_output=True, text=True).stderr
    return sum(int(n) for n in re.findall(r"(\d+) bytes spill (?:stores|loads)", log))


def inspect_kernel(arch: int, head_dim: int, dtype: torch.dtype, config: dict, **compile_kwargs) -> dict:
    """One device-free row for ``config`` = {BLOCK_M, BLOCK_N, num_warps, num_stages}."""
    import triton

    from csa_kernels.triton_kernel import compile_for_target

    bm, bn, warps, stages = (config[k] for k in ("BLOCK_M", "BLOCK_N", "num_warps", "num_stages"))
    tiles = dict(block_m=bm, block_n=bn, num_warps=warps, num_stages=stages)
    kernel = compile_for_target(dtype, head_dim, arch=arch, **tiles, **compile_kwargs)
    with tempfile.TemporaryDirectory() as tmp:
        cubin = os.path.join(tmp, "k.cubin")
        with open(cubin, "wb") as f:
            f.write(kernel.asm["cubin"])
        sass, usage = (_run(_tool("cuobjdump"), flag, cubin) for flag in ("-sass", "-res-usage"))
    res = dict(re.findall(r"\b(REG|STACK|LOCAL):(\d+)", usage))
    instrs = parse_sass(sass)
    loops = steady_loops(instrs)
    steady = loops[0] if loops else instrs
    return {
        "arch": arch,
        "triton": triton.__version__,
        "dtype": str(dtype).removeprefix("torch."),
        "head_dim": head_dim,
        "config": f"{bm}x{bn}x{warps}x{stages}",
        "path": compile_kwargs.get("path", "pointer"),
        **{k: v for k, v in compile_kwargs.items() if k not in ("example", "path")},
        "registers": int(res["REG"]),
        "spill_bytes": _ptxas_spills(kernel.asm["ptx"], arch),
        "local_bytes": int(res.get("LOCAL", 0)),
        "shared_bytes": kernel.metadata.shared,
        "load": _load_kind(steady),
        "mma": _mma_kind(instrs),
        # the loops really split into producer and consumer warps (a ttg.warp_specialize op), not just asked
        "warp_specialized": "ttg.warp_specialize" in kernel.asm["ttgir"],
        "loop_instructions": len(steady) if loops else None,
        "loops": [len(body) for body in loops],
        "instr_per_1k_scores": round(len(steady) * warps / (bm * bn) * 1000, 1) if loops else None,
        # every steady loop's (own tokens first, then the borrowed ranges': where HAS_SEGMENTS adds its work)
        "loops_instr_per_1k_scores": [round(len(body) * warps / (bm * bn) * 1000, 1) for body in loops],
    }


def _config(text: str) -> dict:
    match = CONFIG.match(text)
    if not match:
        raise argparse.ArgumentTypeError(f"config must be BMxBNxWxS (e.g. 128x64x8x2), got {text!r}")
    bm, bn, w, s = map(int, match.groups())
    return {"BLOCK_M": bm, "BLOCK_N": bn, "num_warps": w, "num_stages": s}


COLUMNS = (
    "arch",
    "path",
    "dtype",
    "head_dim",
    "config",
    "registers",
    "spill_bytes",
    "shared_bytes",
    "load",
    "mma",
)
COLUMNS += ("loop_instructions", "instr_per_1k_scores")
FEATURES = ("row_range", "key_lengths", "pool_ranges", "segments")  # compile_for_target's has_<feature> flags


def format_table(rows: list[dict]) -> str:
    cells = [[str(c) for c in COLUMNS]] + [[str(row[c]) for c in COLUMNS] for row in rows]
    widths = [max(len(line[i]) for line in cells) for i in range(len(COLUMNS))]
    return "\n".join("  ".join(c.rjust(w) for c, w in zip(line, widths, strict=True)) for line in cells)


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(prog="python -m csa_kernels.inspect", description=__doc__.split("\n")[0])
    parser.add_argument(
        "--arch", type=int, nargs="+", default=[90], help="compute capability, e.g. 80 86 89 90"
    )
    parser.add_argument("--head-dim", type=int, nargs="+", default=[64])
    parser.add_argument("--dtype", nargs="+", default=["float16"], choices=["float16", "bfloat16", "float32"])
    parser.add_argument(
        "--path",
        choices=["pointer", "tma"],
        help="kernel path (default: what a launch on the arch runs: tma from sm_90, pointer before)",
    )
    configs = parser.add_mutually_exclusive_group()
    configs.add_argument("--config", type=_config, nargs="+", help="BMxBNxWxS; default: fixed_config")
    configs.add_argument(
        "--pruned", action="store_true", help="every config of the pruned autotune space for the arch"
    )
    parser.add_argument(
        "--features",
        nargs="+",
        default=[],
        choices=FEATURES,
        help="optional kernel features compiled on (their flags: has_<feature>); default none",
    )
    parser.add_argument(
        "--precision",
        choices=["native", "int8"],
        default="native",
        help="the kernel's Q·Kᵀ: native (the inputs' 16-bit type) or int8 (the 8-bit path: int8 Q and keys "
        "with float32 row scales, P·V in the 16-bit type)",
    )
    parser.add_argument("--out", help="folder for a JSON file of the rows (default: none written)")
    args = parser.parse_args(argv)
    int8 = args.precision == "int8"
    from tqdm import tqdm

    from csa_kernels.tuning import allowed, as_dict, autotune_configs, fixed_config, shared_memory_limit

    jobs = []
    for arch in args.arch:
        path = args.path or ("tma" if arch >= 90 else "pointer")
        for dtype in map(lambda name: getattr(torch, name), args.dtype):
            for head_dim in args.head_dim:
                head_dim_p = max(16, 1 << (head_dim - 1).bit_length())
                if args.pruned:
                    limit = shared_memory_limit(arch)
                    space = [as_dict(c) for c in autotune_configs()]
                    chosen = [
                        c for c in space if allowed(c, head_dim_p, dtype.itemsize, limit, path, int8=int8)
                    ]
                else:
                    chosen = args.config or [fixed_config(head_dim_p, dtype, path, int8=int8)]
                jobs += [(arch, head_dim, dtype, config, path) for config in chosen]
    rows = []
    for arch, head_dim, dtype, config, path in tqdm(
        jobs, desc="compiling", unit="config", disable=len(jobs) < 4
    ):
        flags = {f"has_{feature}": True for feature in args.features}
        if int8:  # left out for native rows: their JSON stays as before the flag existed
            flags["int8"] = True
        rows.append(inspect_kernel(arch, head_dim, dtype, config, path=path, **flags))
    print(format_table(rows))
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        tag = "".join(f"_{feature}" for feature in args.features) + ("_int8" if int8 else "")
        path = os.path.join(args.out, f"inspect{tag}_triton{rows[0]['triton']}.json")
        with open(path + ".tmp", "w") as f:
            json.dump(rows, f, indent=1)
        os.replace(path + ".tmp", path)
        print(f"wrote {path}")
    return rows


if __name__ == "__main__":
    main()
