"""Which tiles the fused forward may use: the autotune space, its pruning, and the fixed configs.

Every rule here comes from compiling the kernels for real targets and reading what ptxas reports
(``python -m csa_kernels.inspect``; rows in ``benchmarks/results/inspect_*.json``), fp16/bf16, Triton 3.9:

* Registers, descriptor path (sm_90, wgmma: Q, K and V tiles stay in shared memory). A thread holds its
  share of the fp32 accumulator (BLOCK_M·D/threads) and of the fp32 score tile (BLOCK_M·BLOCK_N/threads).
  Up to 160 such values stay spill-free (hd256 64x64, 4 warps: 160 values, 249 registers; hd128
  128x128, 8 warps: 128 values, 203 registers); 192 spill (hd128 128x64, 4 warps: 96 bytes; hd64 128x128,
  4 warps: 8 bytes).
* Registers, pointer path (mma.sync: the Q and K/V operands also sit in registers, two 16-bit values per
  register). Counting those too, up to 144 stay spill-free on sm_89 (hd128 128x64, 8 warps: 255
  registers, no spill); 160 spill (hd128 64x64, 4 warps: 1,600 bytes; 128x32, 4 warps: 1,312 bytes). And
  32-key tiles spill once a thread's accumulator share reaches 64 values (hd64 128x32, 4 warps: 96-128
  bytes; hd128 64x32, 4 warps: 408-440 bytes; hd64 64x32, 4 warps, 32 values: none).
* Shared memory: ``num_stages`` K and V tiles, plus the Q tile and 1 KiB of barriers on the descriptor
  path (both formulas equal ptxas's figures), must fit the per-block opt-in limit (sm_80 163 KiB,
  sm_86/89 99 KiB, sm_90 227 KiB), read from the device when there is one.
* Tutorial-class tiles: BLOCK_M 64 or 128, BLOCK_N 32 to 128, 4 or 8 warps (8 only for tiles of at least
  128x64, where each warp still owns 16 rows of an MMA), 2 to 4 stages.

fp32 inputs take exact (ieee) products, which Triton lowers to FMA loops that keep whole operand tiles in
registers: they spill at every tile of the space at hd >= 64 (e.g. 64x32, 4 warps, hd64: 9 KB). They are
the library's correctness path (the GPU runs fp16/bf16); their pruning keeps the smallest tiles only.

**The 8-bit path** (``precision="int8"``: int8 Q and K tiles, a 16-bit V tile, float32 row scales) has its
own register picture, so its space is the tile shapes that compiled spill-free, read off every (BLOCK_M,
BLOCK_N, warps) of the space at 2 stages, fp16, Triton 3.9 — the pointer kernel for sm_89 (its 99 KiB and
mma.sync registers are the tightest of sm_80/86/89), the descriptor kernel for sm_90
(``benchmarks/results/inspect_int8_space_sm89-pointer_sm90-tma_triton3.9.0.json``). Spilling there:
pointer hd64 128x128x4 (1,796 bytes); pointer hd128 128x128x4 (21,408), 128x128x8 (496), 128x32x4 (592),
128x64x4 (4,048), 64x128x4 (1,408); descriptor hd64 128x128x4 (436); descriptor hd128 128x128x4 (9,920),
128x64x4 (876). Shared memory is bounded above by ``(1 + itemsize)·D·BLOCK_N`` per stage (an int8 K and a
16-bit V tile; plus the Q tile and 1 KiB on the descriptor path): every compile's figure is below it.
"""

from __future__ import annotations

import torch
import triton

# per-block shared memory (opt-in maximum) by compute capability, for targets without a device to ask
SHARED_MEMORY_LIMIT = {80: 166912, 86: 101376, 87: 166912, 89: 101376, 90: 232448}
# register values per thread that stay spill-free, by path (module docstring)
REGISTER_VALUES = {"tma": 160, "pointer": 144}

# Fixed configs (CSA_AUTOTUNE=0), picked by the inspection's numbers: the fewest SASS instructions per 1,000
# scores among spill-free configs (sm_90 for the descriptor path, sm_89 for the pointer path; fp16 = bf16).
#   tma hd64      128x128x8x3: 155 regs, 0 spill, 113 KiB, 231 instr/1k (128x64x4x3: 255)
#   tma hd128     128x128x8x2: 203 regs, 0 spill, 161 KiB, 253 instr/1k (128x64x8x4: 356)
#   pointer hd64  128x128x8x2: 250 regs, 0 spill,  48 KiB, 293 instr/1k (128x64x8x2: 326)
#   pointer hd128 128x64x8x2:  255 regs, 0 spill,  64 KiB, 487 instr/1k (64x64x4x3: spills 1.6 KB)
FIXED = {
    ("tma", 64): {"BLOCK_M": 128, "BLOCK_N": 128, "num_warps": 8, "num_stages": 3},
    ("tma", 128): {"BLOCK_M": 128, "BLOCK_N": 128, "num_warps": 8, "num_stages": 2},
    ("pointer", 64): {"BLOCK_M": 128, "BLOCK_N": 128, "num_warps": 8, "num_stages": 2},
    ("pointer", 128): {"BLOCK_M": 128, "BLOCK_N": 64, "num_warps": 8, "num_stages": 2},
}
# head dims past 128 (padded to 256) and fp32 inputs: the smallest tiles of the space
SMALL = {"BLOCK_M": 64, "BLOCK_N": 32, "num_warps": 4, "num_stages": 2}

# The 8-bit path's spill-free (BLOCK_M, BLOCK_N, num_warps), by path and padded head dim (module docstring)
INT8_SPILL_FREE = {
    ("pointer", 64): {(64, 32, 4), (64, 64, 4), (64, 128, 4), (64, 128, 8), (128, 32, 4), (128, 64, 4),
                      (128, 64, 8), (128, 128, 8)},
    ("pointer", 128): {(64, 32, 4), (64, 64, 4), (64, 128, 8), (128, 64, 8)},
    ("tma", 64): {(64, 32, 4), (64, 64, 4), (64, 128, 4), (64, 128, 8), (128, 32, 4), (128, 64, 4),
                  (128, 64, 8), (128, 128, 8)},
    ("tma", 128): {(64, 32, 4), (64, 64, 4), (64, 128, 4), (64, 128, 8), (128, 32, 4), (128, 64, 8),
                   (128, 128, 8)},
}  # fmt: skip
# The 8-bit path's fixed configs: the fewest instructions per 1,000 scores among its spill-free ones
# (instructions per 1k scores, the 16-bit fixed config's in brackets):
#   pointer hd64  128x128x8x2: 225 regs, 337 (293)    tma hd64  64x128x4x2: 186 regs, 299 (231)
#   pointer hd128 128x64x8x2:  238 regs, 495 (487)    tma hd128 64x128x4x2: 244 regs, 323 (253)
FIXED_INT8 = {
    ("tma", 64): {"BLOCK_M": 64, "BLOCK_N": 128, "num_warps": 4, "num_stages": 2},
    ("tma", 128): {"BLOCK_M": 64, "BLOCK_N": 128, "num_warps": 4, "num_stages": 2},
    ("pointer", 64): {"BLOCK_M": 128, "BLOCK_N": 128, "num_warps": 8, "num_stages": 2},
    ("pointer", 128): {"BLOCK_M": 128, "BLOCK_N": 64, "num_warps": 8, "num_stages": 2},
}


def autotune_configs(path: str = "pointer") -> list[triton.Config]:
    """The search space before pruning (``prune``). The descriptor path also tries its loops
    warp-specialized (``WARP_SPECIALIZE``), which ``prune_tma`` keeps only where Triton applies it."""
    specialize = (False, True) if path == "tma" else (False,)
    return [
        triton.Config(
            {"BLOCK_M": bm, "BLOCK_N": bn, **({"WARP_SPECIALIZE": ws} if path == "tma" else {})},
            num_warps=w,
            num_stages=s,
        )
        for bm in (64, 128)
        for bn in (32, 64, 128)
        for w in (4, 8)
        for s in (2, 3, 4)
        for ws in specialize
    ]


def warp_specialization_applies() -> bool:
    """Whether Triton splits the descriptor kernel's loops into producer and consumer warps on the current
    device. Read off compiles (``inspect``'s ``warp_specialized``): Triton 3.6 and 3.9 do on sm_100
    (Blackwell), and on sm_90 accept the request but leave the loops as they are (identical SASS)."""
    return torch.cuda.is_available() and torch.cuda.get_device_capability()[0] >= 10


def shared_memory_limit(arch: int | None = None) -> int:
    """The per-block shared memory limit: of ``arch`` (e.g. 90), else of the current CUDA device."""
    if arch is None and torch.cuda.is_available():
        props = torch.cuda.get_device_properties(torch.cuda.current_device())
        limit = getattr(props, "shared_memory_per_block_optin", None)
        if limit:
            return int(limit)
        arch = props.major * 10 + props.minor
    return SHARED_MEMORY_LIMIT.get(arch or 90, min(SHARED_MEMORY_LIMIT.values()))


def shared_bytes(
    block_m: int, block_n: int, num_stages: int, head_dim_p: int, itemsize: int, path: str = "tma"
) -> int:
    """Shared memory of a config as ptxas reports it: the K/V pipeline, plus Q and barriers on the
    descriptor path."""
    pipeline = itemsize * head_dim_p * 2 * block_n * num_stages
    return pipeline + (itemsize * head_dim_p * block_m + 1024 if path == "tma" else 0)


def register_values(config: dict, head_dim_p: int, itemsize: int, path: str) -> int:
    """Per-thread register values the module docstring's rules count for ``config``."""
    block_m, block_n, warps = config["BLOCK_M"], config["BLOCK_N"], config["num_warps"]
    threads = 32 * warps
    values = (block_m * head_dim_p + block_m * block_n) // threads  # fp32 accumulator + scores
    if path == "pointer":  # mma.sync operands: Q and a K/V tile, packed per register for 16-bit types
        values += (block_m + block_n) * head_dim_p * itemsize // (4 * threads)
    return values


def int8_shared_bytes(block_m: int, block_n: int, num_stages: int, head_dim_p: int, itemsize: int, path: str):
    """The 8-bit path's shared memory bound (module docstring): per stage an int8 K tile and a V tile of
    ``itemsize`` bytes, plus the int8 Q tile and 1 KiB on the descriptor path."""
    pipeline = (1 + itemsize) * head_dim_p * block_n * num_stages
    return pipeline + (head_dim_p * block_m + 1024 if path == "tma" else 0)


def allowed(
    config: dict, head_dim_p: int, itemsize: int, smem_limit: int, path: str = "tma", *, int8: bool = False
) -> bool:
    """Whether a config (BLOCK_M, BLOCK_N, num_warps, num_stages) passes the module docstring's rules
    (fp32: only ``SMALL``; ``int8``: the 8-bit path's spill-free tiles, ``itemsize`` then V's)."""
    block_m, block_n, warps, stages = (config[k] for k in ("BLOCK_M", "BLOCK_N", "num_warps", "num_stages"))
    if int8:
        tiles = INT8_SPILL_FREE.get((path, max(64, head_dim_p)), set())
        bound = int8_shared_bytes(block_m, block_n, stages, head_dim_p, itemsize, path)
        return (block_m, block_n, warps) in tiles and bound <= smem_limit
    if itemsize == 4 or head_dim_p > 128:
        return config == SMALL and shared_bytes(64, 32, 2, head_dim_p, itemsize, path) <= smem_limit
    accumulator = block_m * head_dim_p // (32 * warps)
    return (
        register_values(config, head_dim_p, itemsize, path) <= REGISTER_VALUES[path]
        and not (path == "pointer" and block_n < 64 and accumulator >= 64)
        and shared_bytes(block_m, block_n, stages, head_dim_p, itemsize, path) <= smem_limit
        and (warps == 4 or block_m * block_n >= 128 * 64)
    )


def as_dict(config: triton.Config) -> dict:
    """BLOCK_M, BLOCK_N, num_warps, num_stages of a config (what the rules look at)."""
    tiles = {k: v for k, v in config.kwargs.items() if k in ("BLOCK_M", "BLOCK_N")}
    return {**tiles, "num_warps": config.num_warps, "num_stages": config.num_stages}


def prune(configs, named_args, *, path: str = "pointer", **kwargs):
    """Autotune's early prune: the configs ``allowed`` for this launch's path, head dim, dtype (V's: the
    8-bit path's Q is int8), precision and device."""
    names = ("V", "desc_v", "Q", "desc_q")  # the 16-bit operand (on the 8-bit path Q is int8)
    first = next((named_args[name] for name in names if name in named_args), None)
    first = getattr(first, "base", first)  # a descriptor's tensor
    itemsize = first.element_size() if hasattr(first, "element_size") else 2
    limit = shared_memory_limit()
    int8 = bool(kwargs.get("INT8", False))
    kept = [c for c in configs if allowed(as_dict(c), kwargs["HEAD_DIM_P"], itemsize, limit, path, int8=int8)]
    return kept or [min(configs, key=lambda c: c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"] * c.num_stages)]


def prune_tma(configs, named_args, **kwargs):
    if not warp_specialization_applies():
        configs = [c for c in configs if not c.kwargs.get("WARP_SPECIALIZE")]
    return prune(configs, named_args, path="tma", **kwargs)


def fixed_config(head_dim_p: int, dtype: torch.dtype, path: str = "pointer", *, int8: bool = False) -> dict:
    """The config CSA_AUTOTUNE=0 runs: ``FIXED`` (``FIXED_INT8`` for the 8-bit path) for fp16/bf16 at
    head dims up to 128, else ``SMALL``; always inside the pruned space of its path (tested)."""
    if head_dim_p <= 128 and dtype != torch.float32:
        return dict((FIXED_INT8 if int8 else FIXED)[(path, 64 if head_dim_p <= 64 else 128)])
    return dict(SMALL)
