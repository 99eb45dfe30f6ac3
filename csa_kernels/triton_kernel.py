"""Fused Triton forward for consistent attention.

One program computes a BLOCK_M tile of queries of one (frame, head). It runs an online softmax
(FlashAttention-2 style, exp2 domain, fp32 statistics) over up to four contiguous key ranges:

  1. the frame's own N keys,
  2. pool rows of the visible frames before it,   } the reference pool (pool.py): (B·S, H, D),
  3. pool rows of the visible frames after it,    } frame j's tokens at rows j·S .. j·S + S - 1
  4. its group's M bank tokens.

Nothing is concatenated or masked per frame: each range is walked in full BLOCK_N tiles plus at most
one masked tail tile. Importing this module reads TRITON_INTERPRET (Triton decides at decoration time
whether kernels are compiled or interpreted on the CPU).

Ranges 2-4 are the *borrowed* keys. With a query-row range [row_start, row_end) (joint text + image
sequences: only image rows borrow, HAS_ROW_RANGE), a query tile entirely outside it skips them, a tile
entirely inside walks them as above, and a tile straddling a boundary walks them with a per-row mask.

Two per-frame loads change where ranges end, nothing else (triton_common.py): HAS_KEY_LENGTHS ends range 1
at min(N, key_lengths[b]) (padding past it is never loaded: the tail tile's mask stops there);
HAS_POOL_RANGES takes ranges 2 and 3 from the frame's row of ``pool_ranges`` over a caller's (R, H, D)
pool instead of computing them from the window. With both flags off the kernel compiles to the code it
had before they existed (the same SASS instructions, register numbering aside).

HAS_SEGMENTS (bounded attention) loads the query tile's int32 segment ids once, and each borrowed key tile's
ids beside the tile (the gathered pool's are the sampled tokens' ids, gathered with the pool): a key of
segment t scores -inf for rows of segment c unless t is 0 or c. Own keys are never masked. Flag off: the
same SASS instruction sequence as without it (checked on sm_90, both kernels).

Reads top to bottom: tile step → range walk → borrowed ranges → kernel → autotune configs → launcher.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from triton.runtime.interpreter import InterpretedFunction
from triton.tools.tensor_descriptor import TensorDescriptor

from .pool import new_output
from .quantize import quantize_inputs
from .triton_common import (
    _borrowing_rows,
    _int8_scores,
    _load_segments,
    _own_keys_end,
    _pool_rows,
    _program_frame,
    _softmax_update,
)
from .triton_gather import gather_pools
from .triton_quantize import quantize_rows_triton
from .triton_tma import (
    _consistent_attn_fwd_tma,
    describe,
    describe_pool,
    set_block_shapes,
    tma_compatible,
)
from .tuning import autotune_configs, fixed_config, prune, prune_tma

LOG2E = 1.4426950408889634


@triton.jit
def _attn_tile(
    acc,
    l_i,
    m_i,
    b_q,
    p_k,
    p_v,
    stride_kn,
    stride_vn,
    n0,
    end,
    m_rows,
    qk_scale,
    HEAD_DIM: tl.constexpr,
    HEAD_DIM_P: tl.constexpr,
    BLOCK_N: tl.constexpr,
    MASK_N: tl.constexpr,
    MASK_M: tl.constexpr,
    DOT_F32: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    p_seg=None,
    seg_q=None,
    MASK_SEG: tl.constexpr = False,
    p_ks=None,
    stride_ksn=0,
    b_qs=None,
    INT8: tl.constexpr = False,
):
    o_n = n0 + tl.arange(0, BLOCK_N)
    o_d = tl.arange(0, HEAD_DIM_P)
    m_k = o_d[:, None] < HEAD_DIM
    m_v = o_d[None, :] < HEAD_DIM
    if MASK_N:
        m_k = m_k & (o_n[None, :] < end)
        m_v = m_v & (o_n[:, None] < end)
    # [HEAD_DIM_P, BLOCK_N]: K loaded transposed so the dot needs no permute
    b_kt = tl.load(p_k + o_n[None, :] * stride_kn + o_d[:, None], mask=m_k, other=0.0)
    if DOT_F32 and not INT8:
        b_kt = b_kt.to(tl.float32)
    # [BLOCK_M, BLOCK_N]
    if INT8:  # int8 codes: exact int32 products, then the rows' scales (quantize.int8_scores)
        b_s = _int8_scores(b_q, b_kt, p_ks, stride_ksn, o_n, end, MASK_N)
        # each query row's scale, times the softmax scale (the launcher folds it in), in qk_scale's place
        qk_scale = b_qs
    else:
        b_s = tl.dot(b_q, b_kt, input_precision=INPUT_PRECISION)
    seg_k = _load_segments(p_seg, o_n, end, MASK_N) if MASK_SEG else o_n
    b_p, alpha, l_i, m_new = _softmax_update(
        b_s, m_i, l_i, o_n, end, m_rows, qk_scale, MASK_N, MASK_M, seg_k, seg_q, MASK_SEG, INT8
    )
    # [BLOCK_N, HEAD_DIM_P]
    b_v = tl.load(p_v + o_n[:, None] * stride_vn + o_d[None, :], mask=m_v, other=0.0)
    if DOT_F32:
        b_v = b_v.to(tl.float32)
    acc = tl.dot(b_p.to(b_v.dtype), b_v, acc * alpha[:, None], input_precision=INPUT_PRECISION)
    return acc, l_i, m_new


@triton.jit
def _attn_range(
    acc,
    l_i,
    m_i,
    b_q,
    p_k,
    p_v,
    stride_kn,
    stride_vn,
    start,
    end,
    m_rows,
    qk_scale,
    HEAD_DIM: tl.constexpr,
    HEAD_DIM_P: tl.constexpr,
    BLOCK_N: tl.constexpr,
    MASK_M: tl.constexpr,
    DOT_F32: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    p_seg=None,
    seg_q=None,
    MASK_SEG: tl.constexpr = False,
    p_ks=None,
    stride_ksn=0,
    b_qs=None,
    INT8: tl.constexpr = False,
):
    """Keys/values rows [start, end): full tiles unmasked, then one masked tail tile if needed.
    MASK_M: only the query rows where ``m_rows`` is true attend to them. MASK_SEG: only the query rows of
    segments ``seg_q`` a key's segment (at ``p_seg`` + row) shows it to. INT8: keys are int8 codes whose
    row scales sit at ``p_ks`` + row · ``stride_ksn`` (the queries': ``b_qs``)."""
    full_end = start + (end - start) // BLOCK_N * BLOCK_N
    for n0 in range(start, full_end, BLOCK_N):
        acc, l_i, m_i = _attn_tile(
            acc, l_i, m_i, b_q, p_k, p_v, stride_kn, stride_vn, n0, end, m_rows, qk_scale,
            HEAD_DIM, HEAD_DIM_P, BLOCK_N, False, MASK_M, DOT_F32, INPUT_PRECISION, p_seg, seg_q, MASK_SEG,
            p_ks, stride_ksn, b_qs, INT8,
        )  # fmt: skip
    if full_end < end:
        acc, l_i, m_i = _attn_tile(
            acc, l_i, m_i, b_q, p_k, p_v, stride_kn, stride_vn, full_end, end, m_rows, qk_scale,
            HEAD_DIM, HEAD_DIM_P, BLOCK_N, True, MASK_M, DOT_F32, INPUT_PRECISION, p_seg, seg_q, MASK_SEG,
            p_ks, stride_ksn, b_qs, INT8,
        )  # fmt: skip
    return acc, l_i, m_i


@triton.jit
def _attn_borrowed(
    acc,
    l_i,
    m_i,
    b_q,
    p_pk,
    p_pv,
    p_bk,
    p_bv,
    stride_pn,
    stride_bm,
    before_start,
    before_end,
    after_start,
    after_end,
    M,
    m_rows,
    qk_scale,
    HEAD_DIM: tl.constexpr,
    HEAD_DIM_P: tl.constexpr,
    BLOCK_N: tl.constexpr,
    HAS_BANK: tl.constexpr,
    MASK_M: tl.constexpr,
    DOT_F32: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    p_pseg=None,
    p_bseg=None,
    seg_q=None,
    HAS_SEGMENTS: tl.constexpr = False,
    p_pks=None,
    p_bks=None,
    stride_pks=0,
    b_qs=None,
    INT8: tl.constexpr = False,
):
    """The borrowed keys: the pool rows of the visible frames before and after this one, then the bank.
    HAS_SEGMENTS: each key tile's segment ids (pool rows' at ``p_pseg``, the bank's at ``p_bseg``) are
    compared with the query rows' ``seg_q``. INT8: the pool rows' scales at ``p_pks`` + row ·
    ``stride_pks``, the bank's at ``p_bks`` + row."""
    acc, l_i, m_i = _attn_range(
        acc, l_i, m_i, b_q, p_pk, p_pv, stride_pn, stride_pn, before_start, before_end, m_rows, qk_scale,
        HEAD_DIM, HEAD_DIM_P, BLOCK_N, MASK_M, DOT_F32, INPUT_PRECISION, p_pseg, seg_q, HAS_SEGMENTS,
        p_pks, stride_pks, b_qs, INT8,
    )  # fmt: skip
    acc, l_i, m_i = _attn_range(
        acc, l_i, m_i, b_q, p_pk, p_pv, stride_pn, stride_pn, after_start, after_end, m_rows, qk_scale,
        HEAD_DIM, HEAD_DIM_P, BLOCK_N, MASK_M, DOT_F32, INPUT_PRECISION, p_pseg, seg_q, HAS_SEGMENTS,
        p_pks, stride_pks, b_qs, INT8,
    )  # fmt: skip
    if HAS_BANK:
        acc, l_i, m_i = _attn_range(
            acc, l_i, m_i, b_q, p_bk, p_bv, stride_bm, stride_bm, 0, M, m_rows, qk_scale,
            HEAD_DIM, HEAD_DIM_P, BLOCK_N, MASK_M, DOT_F32, INPUT_PRECISION, p_bseg, seg_q, HAS_SEGMENTS,
            p_bks, 1, b_qs, INT8,
        )  # fmt: skip
    return acc, l_i, m_i


@triton.jit
def _consistent_attn_fwd(
    Q, K, V, PK, PV, BK, BV, Out,
    stride_qb, stride_qh, stride_qn,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_pn, stride_ph,
    stride_bg, stride_bh, stride_bm,
    stride_ob, stride_oh, stride_on,
    H, N, S, M, frames_per_group, window, row_start, row_end, qk_scale,
    KL, PR, P,  # key lengths (B,), pool ranges (B, 4), pool rows: read only under their flags
    SEG, PSEG, BSEG,  # int32 segment ids of tokens (B, N), pool rows (P,), banks (G, M): HAS_SEGMENTS only
    QS, KS, PKS, BKS,  # fp32 row scales of Q, K (B, H, N), pool keys (P, H), bank keys (G, H, M): INT8 only
    HEAD_DIM: tl.constexpr,
    HEAD_DIM_P: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    HAS_BANK: tl.constexpr,
    HAS_ROW_RANGE: tl.constexpr,
    DOT_F32: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    HAS_KEY_LENGTHS: tl.constexpr = False,
    HAS_POOL_RANGES: tl.constexpr = False,
    HAS_SEGMENTS: tl.constexpr = False,
    INT8: tl.constexpr = False,
):  # fmt: skip
    i_m = tl.program_id(0)
    # head-major: the frames of one head run next to each other and share its pool and bank rows in L2
    i_b, i_h, i_g, lo, hi = _program_frame(H, tl.num_programs(1) // H, frames_per_group, window)
    own_end = _own_keys_end(KL, i_b, N, HAS_KEY_LENGTHS)

    o_m = i_m * BLOCK_M + tl.arange(0, BLOCK_M)
    o_d = tl.arange(0, HEAD_DIM_P)
    m_q = (o_m[:, None] < N) & (o_d[None, :] < HEAD_DIM)
    # [BLOCK_M, HEAD_DIM_P]
    b_q = tl.load(
        Q + i_b * stride_qb + i_h * stride_qh + o_m[:, None] * stride_qn + o_d[None, :], mask=m_q, other=0.0
    )
    if DOT_F32 and not INT8:
        b_q = b_q.to(tl.float32)
    b_qs = o_m  # INT8: the query rows' scales (masked rows: 0, their scores are never stored)
    if INT8:
        b_qs = tl.load(QS + (i_b * H + i_h) * N + o_m, mask=o_m < N, other=0.0)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM_P], dtype=tl.float32)

    # Own tokens first: every query row then has a finite running max before any masked tile.
    acc, l_i, m_i = _attn_range(
        acc, l_i, m_i, b_q, K + i_b * stride_kb + i_h * stride_kh, V + i_b * stride_vb + i_h * stride_vh,
        stride_kn, stride_vn, 0, own_end, o_m, qk_scale,
        HEAD_DIM, HEAD_DIM_P, BLOCK_N, False, DOT_F32, INPUT_PRECISION, None, None, False,
        KS + (i_b * H + i_h) * N, 1, b_qs, INT8,
    )  # fmt: skip
    p_pk = PK + i_h * stride_ph
    p_pv = PV + i_h * stride_ph
    o_bank = i_g * stride_bg + i_h * stride_bh
    m_rows, borrow_all, borrow_any = _borrowing_rows(o_m, i_m * BLOCK_M, N, row_start, row_end, HAS_ROW_RANGE)
    # after the own keys' loop (the ranges need not stay live across it)
    before_start, before_end, after_start, after_end = _pool_rows(PR, i_b, lo, hi, S, P, HAS_POOL_RANGES)
    seg_q = _load_segments(SEG + i_b * N, o_m, N, True) if HAS_SEGMENTS else o_m
    p_bseg = BSEG + i_g * M
    if borrow_all:
        acc, l_i, m_i = _attn_borrowed(
            acc, l_i, m_i, b_q, p_pk, p_pv, BK + o_bank, BV + o_bank, stride_pn, stride_bm,
            before_start, before_end, after_start, after_end, M, m_rows, qk_scale,
            HEAD_DIM, HEAD_DIM_P, BLOCK_N, HAS_BANK, False, DOT_F32, INPUT_PRECISION,
            PSEG, p_bseg, seg_q, HAS_SEGMENTS, PKS + i_h, BKS + (i_g * H + i_h) * M, H, b_qs, INT8,
        )  # fmt: skip
    elif borrow_any:
        acc, l_i, m_i = _attn_borrowed(
            acc, l_i, m_i, b_q, p_pk, p_pv, BK + o_bank, BV + o_bank, stride_pn, stride_bm,
            before_start, before_end, after_start, after_end, M, m_rows, qk_scale,
            HEAD_DIM, HEAD_DIM_P, BLOCK_N, HAS_BANK, True, DOT_F32, INPUT_PRECISION,
            PSEG, p_bseg, seg_q, HAS_SEGMENTS, PKS + i_h, BKS + (i_g * H + i_h) * M, H, b_qs, INT8,
        )  # fmt: skip

    acc = acc / l_i[:, None]
    p_o = Out + i_b * stride_ob + i_h * stride_oh + o_m[:, None] * stride_on + o_d[None, :]
    tl.store(p_o, acc.to(Out.dtype.element_ty), mask=m_q)


_consistent_attn_fwd_tuned = triton.autotune(
    configs=autotune_configs(),
    # Tile shape depends on the per-frame token count and head dim, hardly on how many reference or bank
    # tokens follow: leaving S, M and the group size out avoids re-tuning for every story layout.
    key=[
        "N",
        "HEAD_DIM",
        "HAS_BANK",
        "HAS_ROW_RANGE",
        "HAS_KEY_LENGTHS",
        "HAS_POOL_RANGES",
        "HAS_SEGMENTS",
        "INT8",
    ],
    prune_configs_by={"early_config_prune": prune},
)(_consistent_attn_fwd)

_consistent_attn_fwd_tma_tuned = triton.autotune(
    configs=[
        triton.Config(c.kwargs, num_warps=c.num_warps, num_stages=c.num_stages, pre_hook=set_block_shapes)
        for c in autotune_configs("tma")
    ],
    key=[
        "N",
        "HEAD_DIM_P",
        "HAS_BANK",
        "HAS_ROW_RANGE",
        "HAS_KEY_LENGTHS",
        "HAS_POOL_RANGES",
        "HAS_SEGMENTS",
        "INT8",
    ],
    prune_configs_by={"early_config_prune": prune_tma},
)(_consistent_attn_fwd_tma)

# The interpreter runs programs one by one in numpy, paying per tile op: one fixed, fairly large tile
# keeps CPU tests fast. Tests shrink it to walk many full tiles plus tails on small shapes.
INTERPRETER_CONFIG = {"BLOCK_M": 64, "BLOCK_N": 64}
INTERPRETED = isinstance(_consistent_attn_fwd, InterpretedFunction)
# CSA_AUTOTUNE=0 skips autotuning (one fixed, safe config per head dim): for GPU test runs, where tuning every
# new shape would take longer than the tests themselves. Benchmarks leave it on.
AUTOTUNE = os.environ.get("CSA_AUTOTUNE", "1") != "0"
# CSA_KERNEL_PATH=pointer|tma forces a path (benchmarks compare them); unset: chosen per device (kernel_path).
FORCED_PATH = os.environ.get("CSA_KERNEL_PATH") or None
PATHS = ("pointer", "tma")


def kernel_path(q: torch.Tensor) -> str:
    """ "tma" (tensor descriptors) on GPUs of compute capability 9.0 and above, "pointer" before that and
    in the interpreter; CSA_KERNEL_PATH overrides."""
    if FORCED_PATH is not None:
        if FORCED_PATH not in PATHS:
            raise ValueError(f"CSA_KERNEL_PATH must be one of {', '.join(PATHS)}, got {FORCED_PATH!r}")
        return FORCED_PATH
    if INTERPRETED or q.device.type != "cuda":
        return "pointer"
    return "tma" if torch.cuda.get_device_capability(q.device)[0] >= 9 else "pointer"


def triton_consistent_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    ref_idx: torch.Tensor,
    groups: int,
    window: int | None,
    bank_k: torch.Tensor | None,
    bank_v: torch.Tensor | None,
    scale: float,
    query_rows: tuple[int, int] | None = None,
    pool_k: torch.Tensor | None = None,
    path: str | None = None,
    *,
    key_lengths: torch.Tensor | None = None,
    pool: tuple[torch.Tensor, torch.Tensor] | None = None,
    pool_ranges: torch.Tensor | None = None,
    segments: torch.Tensor | None = None,
    bank_segments: torch.Tensor | None = None,
    pool_segments: torch.Tensor | None = None,
    precision: str = "native",
) -> torch.Tensor:
    """Launch the fused forward. Inputs are assumed validated (see validation.py). ``pool_k``: (B, H, S, D)
    key pool to use instead of gathering k at ``ref_idx``. ``key_lengths`` (B,): frame b's own keys end at
    key_lengths[b]. ``pool`` ((R, H, D) keys, values) with ``pool_ranges`` (B, 4): the borrowed rows of each
    frame, in place of the pool gathered at ``ref_idx`` (then (B, 0)) and the window. ``segments`` (B, N),
    ``bank_segments`` (G, M), ``pool_segments`` (R,): segment ids (any of them given: HAS_SEGMENTS, the others
    zeros; the gathered pool's are ``segments`` at ``ref_idx``). ``path``: "pointer"
    or "tma" (tensor descriptors; falls back to "pointer" for tensors TMA cannot address); None:
    ``kernel_path(q)``. ``precision="int8"``: the pre-pass of ``quantize.py`` first, then either kernel
    with INT8 on int8 codes and float32 row scales (the softmax scale folded into the query rows')."""
    if q.device.type != "cuda" and not INTERPRETED:
        raise ValueError(
            f"backend='triton' needs CUDA tensors, or TRITON_INTERPRET=1 set before csa_kernels' Triton "
            f"kernel is first used to run on the CPU; got tensors on {q.device}"
        )
    out = new_output(q)
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    num_frames, num_heads, num_tokens, head_dim = q.shape
    num_refs = ref_idx.shape[1]
    int8 = precision == "int8"
    scales = (q, q, q, q)  # the row scales of Q, K, the pool's keys and the bank's: INT8 only
    dtype = q.dtype
    if int8:  # codes in place of Q and every key; the kernel reads their scales beside them
        q, k, pool_k, bank_k, pool, scales = _quantized(q, k, ref_idx, pool_k, bank_k, pool, key_lengths)
        scales = _fold_score_scale(scales, scale * LOG2E)
    # pool_k / pool_v: (rows, H, D) with one set of strides (the kernel reads both with it)
    if pool is not None:
        pool_k, pool_v = pool
        if pool_k.stride() != pool_v.stride() or pool_k.stride(-1) != 1:
            pool_k, pool_v = pool_k.contiguous(), pool_v.contiguous()
    elif num_refs:
        # [B, S, H, D], contiguous, both in one launch
        gathered_k, pool_v = gather_pools(k, v, ref_idx, gather_k=pool_k is None)
        # The kernel reads both pools with one set of strides: a given pool_k goes to the same layout.
        pool_k = gathered_k if pool_k is None else pool_k.transpose(1, 2).contiguous()
        pool_k, pool_v = pool_k.flatten(0, 1), pool_v.flatten(0, 1)
    else:
        pool_k = pool_v = None
    num_pool = 0 if pool_k is None else pool_k.shape[0]
    if num_pool == 0:  # never read (empty ranges); an empty tensor may have a null data pointer, which
        pool_k, pool_v = k[0].transpose(0, 1), v[0].transpose(0, 1)  # launchers reject: k, v's rows instead
    has_bank = bank_k is not None and bank_k.shape[2] > 0
    if has_bank:
        # The kernel takes one set of bank strides for K and V.
        if bank_k.stride() != bank_v.stride() or bank_k.stride(-1) != 1:
            bank_k, bank_v = bank_k.contiguous(), bank_v.contiguous()
    else:
        bank_k = bank_v = k  # never read: HAS_BANK=False
    num_bank = bank_k.shape[2] if has_bank else 0
    frames_per_group = num_frames // groups
    # (0, N) is every row: the kernel without a row range, bit-identical to query_rows=None.
    row_start, row_end = (0, num_tokens) if query_rows is None else query_rows
    has_row_range = (row_start, row_end) != (0, num_tokens)
    # per-frame data of the optional features: contiguous index tensors (or q, never read, when off)
    has_key_lengths, has_pool_ranges = key_lengths is not None, pool_ranges is not None
    key_lengths = key_lengths.contiguous() if has_key_lengths else q
    pool_ranges = pool_ranges.contiguous() if has_pool_ranges else q
    # int8 MMAs take K in steps of 32 (m16n8k32): the padded head dim of int8 codes is at least 32
    head_dim_p = max(32 if int8 else 16, triton.next_power_of_2(head_dim))
    # fp32 inputs get true fp32 products (ieee), not TF32, to stay within 2x of PyTorch's fp32 error.
    # The interpreter's tl.dot is wrong on bf16 operands (ARCHITECTURE.md §5): upcast there, loads stay bf16.
    input_precision = "ieee" if dtype == torch.float32 else "tf32"
    dot_f32 = INTERPRETED and dtype == torch.bfloat16
    if dot_f32:
        input_precision = "ieee"

    def grid(meta):
        return (triton.cdiv(num_tokens, meta["BLOCK_M"]), num_frames * num_heads)

    has_segments = any(t is not None for t in (segments, bank_segments, pool_segments))
    segment_ids = (q, q, q)  # never read without segments
    if has_segments:
        segment_ids = _segment_ids(
            q, ref_idx, segments, bank_segments, pool_segments, num_pool, groups, num_bank, pool
        )
    features = (key_lengths, pool_ranges, num_pool, *segment_ids, *scales)
    features += (has_key_lengths, has_pool_ranges, has_segments, int8)
    path = path or kernel_path(q)
    if path == "tma" and tma_compatible(q, k, v, pool_k, pool_v, bank_k, bank_v, out):
        args = (q, k, v, pool_k, pool_v, bank_k, bank_v, out, num_refs, num_bank, has_bank, has_row_range)
        args += (frames_per_group, window, row_start, row_end, scale, head_dim_p, dot_f32, input_precision)
        _launch_tma(*args, *features, grid)
        return out
    if INTERPRETED:
        kernel, extra = _consistent_attn_fwd, dict(INTERPRETER_CONFIG)
    elif AUTOTUNE:
        kernel, extra = _consistent_attn_fwd_tuned, {}
    else:
        kernel, extra = _consistent_attn_fwd, fixed_config(head_dim_p, dtype, int8=int8)
    kernel[grid](
        q, k, v, pool_k, pool_v, bank_k, bank_v, out,
        q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        pool_k.stride(0), pool_k.stride(1),
        bank_k.stride(0), bank_k.stride(1), bank_k.stride(2),
        out.stride(0), out.stride(1), out.stride(2),
        num_heads, num_tokens, num_refs, num_bank, frames_per_group,
        frames_per_group if window is None else window,
        row_start, row_end,
        scale * LOG2E,
        key_lengths, pool_ranges, num_pool, *segment_ids, *scales,
        HEAD_DIM=head_dim,
        HEAD_DIM_P=head_dim_p,
        HAS_BANK=has_bank,
        HAS_ROW_RANGE=has_row_range,
        DOT_F32=dot_f32,
        INPUT_PRECISION=input_precision,
        HAS_KEY_LENGTHS=has_key_lengths,
        HAS_POOL_RANGES=has_pool_ranges,
        HAS_SEGMENTS=has_segments,
        INT8=int8,
        **extra,
    )  # fmt: skip
    return out


def _quantized(q, k, ref_idx, pool_k, bank_k, pool, key_lengths):
    """The INT8 path's inputs (``quantize.quantize_inputs``): Q's and K's codes, the borrowed keys' codes
    in the layouts the launcher takes (``pool_k`` (B, H, S, D), ``bank_k`` (G, H, M, D), an explicit
    pool's keys (R, H, D)), and the kernel's four contiguous scale tensors: Q and K (B, H, N), the pool
    rows' (P, H) — the gathered pool's are K's at ``ref_idx``, as its rows are K's — and the bank's
    (G, H, M). A missing part's scales are Q's (never read)."""
    has_bank = bank_k is not None and bank_k.shape[2] > 0
    quantized = quantize_inputs(
        q,
        k,
        key_lengths=key_lengths,
        pool_k=pool_k,
        bank_k=bank_k if has_bank else None,
        pool_keys=None if pool is None else pool[0],
        rows=quantize_rows_triton,  # one launch per tensor, the same codes as the PyTorch pre-pass
    )
    (q_codes, q_scale), (k_codes, k_scale) = quantized.q, quantized.k
    pool_scale = q_scale
    if pool is not None:
        pool = (quantized.pool_keys[0], pool[1])
        pool_scale = quantized.pool_keys[1].contiguous()
    elif ref_idx.shape[1]:
        if pool_k is not None:
            pool_k, gathered = quantized.pool_k
        else:  # the kernel's pool rows are K's rows at ref_idx (gather_pools): so are their scales
            index = ref_idx[:, None, :].expand(-1, k_scale.shape[1], -1)
            gathered = k_scale.gather(2, index)
        pool_scale = gathered.transpose(1, 2).contiguous().flatten(0, 1)  # (B·S, H), as the pool rows
    bank_scale = q_scale
    if has_bank:
        bank_k, bank_scale = quantized.bank_k
        bank_scale = bank_scale.contiguous()
    scales = (q_scale.contiguous(), k_scale.contiguous(), pool_scale, bank_scale)
    return q_codes, k_codes, pool_k, bank_k, pool, scales


def _fold_score_scale(scales: tuple, qk_scale: float) -> tuple:
    """The INT8 kernel takes the softmax scale (times log2 e) in the query rows' scales: a score in the
    exp2 domain is then ``((q8 · k8) · sk) · (sq · qk_scale)`` (``_attn_tile``)."""
    q_scale, *rest = scales
    return (q_scale * qk_scale, *rest)


def _segment_ids(q, ref_idx, segments, bank_segments, pool_segments, num_pool, groups, num_bank, pool):
    """The kernel's int32 segment ids, contiguous: tokens (B, N), pool rows (the gathered pool's: frame j's
    sampled tokens' segments at rows j·S.., a caller pool's ``pool_segments``), banks (G, M); a part not
    given is zeros. Empty parts are the tokens' ids (never read; an empty tensor may have a null data
    pointer, which launchers reject)."""
    num_frames, _, num_tokens, _ = q.shape

    def ids(t, shape):
        if t is None:
            return torch.zeros(shape, dtype=torch.int32, device=q.device)
        return t.to(torch.int32).contiguous()

    seg = ids(segments, (num_frames, num_tokens))
    if num_pool == 0:
        pool_seg = seg
    elif pool is not None:
        pool_seg = ids(pool_segments, (num_pool,))
    else:
        pool_seg = seg.gather(1, ref_idx).flatten()
    bank_seg = ids(bank_segments, (groups, num_bank)) if num_bank else seg
    return seg, pool_seg, bank_seg


def _launch_tma(
    q, k, v, pool_k, pool_v, bank_k, bank_v, out, num_refs, num_bank, has_bank, has_row_range,
    frames_per_group, window, row_start, row_end, scale, head_dim_p, dot_f32, input_precision,
    key_lengths, pool_ranges, num_pool, seg, pool_seg, bank_seg, q_scale, k_scale, pool_scale, bank_scale,
    has_key_lengths, has_pool_ranges, has_segments, int8, grid,
) -> None:  # fmt: skip
    """The Hopper kernel over tensor descriptors (triton_tma.py); boxes sized for the config that runs."""
    if INTERPRETED:
        kernel, config = _consistent_attn_fwd_tma, dict(INTERPRETER_CONFIG)
    elif AUTOTUNE:
        kernel, config = _consistent_attn_fwd_tma_tuned, {}
    else:
        kernel, config = _consistent_attn_fwd_tma, fixed_config(head_dim_p, v.dtype, path="tma", int8=int8)
    block_m, block_n = config.get("BLOCK_M", 64), config.get("BLOCK_N", 64)  # autotune: set per config
    pools = (describe_pool(pool_k, block_n, head_dim_p), describe_pool(pool_v, block_n, head_dim_p))
    num_frames, num_heads, num_tokens, _ = q.shape
    kernel[grid](
        describe(q, block_m, head_dim_p), describe(k, block_n, head_dim_p), describe(v, block_n, head_dim_p),
        *pools, describe(bank_k, block_n, head_dim_p), describe(bank_v, block_n, head_dim_p),
        describe(out, block_m, head_dim_p),
        num_frames, num_heads, num_tokens, num_refs, num_bank, frames_per_group,
        frames_per_group if window is None else window,
        row_start, row_end,
        scale * LOG2E,
        key_lengths, pool_ranges, num_pool, seg, pool_seg, bank_seg,
        q_scale, k_scale, pool_scale, bank_scale,
        HEAD_DIM_P=head_dim_p,
        HAS_BANK=has_bank,
        HAS_ROW_RANGE=has_row_range,
        DOT_F32=dot_f32,
        INPUT_PRECISION=input_precision,
        HAS_KEY_LENGTHS=has_key_lengths,
        HAS_POOL_RANGES=has_pool_ranges,
        HAS_SEGMENTS=has_segments,
        INT8=int8,
        **config,
    )  # fmt: skip


def compile_for_target(
    dtype: torch.dtype,
    head_dim: int,
    *,
    block_m: int = 128,
    block_n: int = 64,
    num_warps: int = 8,
    num_stages: int = 3,
    has_bank: bool = True,
    has_row_range: bool = False,
    has_key_lengths: bool = False,
    has_pool_ranges: bool = False,
    has_segments: bool = False,
    arch: int = 90,
    example: tuple[int, int, int, int, int] | None = (4, 8, 1024, 512, 256),
    path: str = "pointer",
    warp_specialize: bool = False,
    int8: bool = False,
):
    """Compile the kernel ahead of time for an NVIDIA target (default sm_90, Hopper); needs no GPU.

    ``int8``: the 8-bit path (``precision="int8"``: int8 Q and keys with float32 row scales).

    ``path``: "pointer" (the kernel of every GPU before sm_90) or "tma" (tensor descriptors, triton_tma.py;
    needs ``example``: a descriptor's specialization comes from its tensor); ``warp_specialize``: its key
    loops warp-specialized (producer warps load, consumer warpgroups compute).

    ``example`` = (frames, heads, tokens, refs, bank tokens) of a representative launch (contiguous
    (B, H, N, D) tensors, one group, a full window, query rows (tokens // 4, tokens) when
    ``has_row_range``; int32 key lengths (``has_key_lengths``), pool ranges over the gathered pool's
    frames·refs rows (``has_pool_ranges``) and int32 segment ids (``has_segments``) when asked): the kernel
    gets the specialization that launch gets from the JIT — Triton's own binder decides which integer
    arguments are divisible by 16 and which pointers are 16-byte aligned (``tt.divisibility``), so the code
    is what such a launch runs (vector / cp.async loads). ``example=None`` compiles without those hints
    (scalar loads: not what any real launch runs; kept for comparison).

    Returns Triton's compiled kernel: ``.asm["ptx"]`` / ``.asm["ttgir"]`` / ``.asm["cubin"]`` show what the
    GPU would run (e.g. ``wgmma`` instructions on Hopper). Needs the compiled (not interpreted) kernel.
    """
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend

    if INTERPRETED:
        raise RuntimeError("compile_for_target needs TRITON_INTERPRET unset when csa_kernels is imported")
    constexprs = {
        "HEAD_DIM": head_dim,
        "HEAD_DIM_P": max(32 if int8 else 16, triton.next_power_of_2(head_dim)),
        "BLOCK_M": block_m,
        "BLOCK_N": block_n,
        "HAS_BANK": has_bank,
        "HAS_ROW_RANGE": has_row_range,
        "DOT_F32": False,
        "INPUT_PRECISION": "ieee" if dtype == torch.float32 else "tf32",
        "HAS_KEY_LENGTHS": has_key_lengths,
        "HAS_POOL_RANGES": has_pool_ranges,
        "HAS_SEGMENTS": has_segments,
    }
    if int8:  # left out otherwise: the 16-bit kernel compiles exactly as before the flag existed
        constexprs["INT8"] = True
    features = (has_key_lengths, has_pool_ranges, has_segments, int8)
    target = GPUTarget("cuda", arch, 32)
    options = {"num_warps": num_warps, "num_stages": num_stages}
    if path == "tma":
        if example is None:
            raise ValueError("path='tma' needs an example launch (its descriptors carry the shapes)")
        del constexprs["HEAD_DIM"]  # the descriptors' boxes carry it
        constexprs["WARP_SPECIALIZE"] = warp_specialize
        fn = _consistent_attn_fwd_tma
        args = _example_tma_args(dtype, head_dim, example, has_bank, has_row_range, block_m, block_n, int8)
        args += _example_feature_args(dtype, example, *features)
    elif example is None:
        pointer = {torch.float16: "*fp16", torch.bfloat16: "*bf16", torch.float32: "*fp32"}[dtype]
        names = _consistent_attn_fwd.arg_names
        signature = {name: "i32" for name in names}
        signature.update({name: pointer for name in ("Q", "K", "V", "PK", "PV", "BK", "BV", "Out")})
        signature.update(KL="*i32" if has_key_lengths else pointer, PR="*i32" if has_pool_ranges else pointer)
        signature.update({name: "*i32" if has_segments else pointer for name in ("SEG", "PSEG", "BSEG")})
        signature.update({name: "*fp32" if int8 else pointer for name in ("QS", "KS", "PKS", "BKS")})
        signature.update({name: "*i8" for name in ("Q", "K", "PK", "BK") if int8})
        signature.update({name: "constexpr" for name in constexprs}, qk_scale="fp32")
        source = ASTSource(
            fn=_consistent_attn_fwd,
            signature=signature,
            constexprs={(names.index(name),): value for name, value in constexprs.items()},
        )
        return triton.compile(source, target=target, options=options)
    else:
        fn = _consistent_attn_fwd
        args = _example_launch_args(dtype, head_dim, example, has_bank, has_row_range, int8)
        args += _example_feature_args(dtype, example, *features)
    # What JITFunction.run does for a launch (triton/runtime/jit.py): bind, specialize, pack.
    from triton.runtime.jit import create_function_from_signature

    backend = make_backend(target)
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    kwargs = {**constexprs, **options}
    bound, specialization, opts = binder(*args, **kwargs)
    opts, signature, consts, attrs = fn._pack_args(backend, kwargs, bound, specialization, opts)
    return triton.compile(ASTSource(fn, signature, consts, attrs), target=target, options=opts.__dict__)


def _example_launch_args(dtype, head_dim, example, has_bank, has_row_range, int8=False) -> list:
    """The runtime arguments triton_consistent_attention passes for contiguous inputs of shape ``example``;
    tensors as Triton's MockTensor (its data pointer is 0: 16-byte aligned, as CUDA allocations are).
    ``int8``: Q and the keys (K, pool keys, bank keys) as int8 codes."""
    from triton.runtime.jit import MockTensor

    frames, heads, tokens, refs, bank = example
    bank = bank if has_bank else 0  # no bank: the launch passes k's strides and M = 0
    t = MockTensor(dtype)
    codes = MockTensor(torch.int8) if int8 else t
    qkvo = (heads * tokens * head_dim, tokens * head_dim, head_dim)  # (B, H, N, D) contiguous
    pool = (heads * head_dim, head_dim)  # (B, S, H, D) contiguous, strides of S and H
    bank_strides = (heads * bank * head_dim, bank * head_dim, head_dim) if bank else qkvo
    rows = (tokens // 4, tokens) if has_row_range else (0, tokens)
    return [
        codes, codes, t, codes, t, codes, t, t, *qkvo, *qkvo, *qkvo, *pool, *bank_strides, *qkvo,
        heads, tokens, refs, bank, frames, frames, *rows, 0.125 * LOG2E,
    ]  # fmt: skip


def _example_tma_args(
    dtype, head_dim, example, has_bank, has_row_range, block_m, block_n, int8=False
) -> list:
    """The runtime arguments _launch_tma passes for contiguous inputs of shape ``example``: descriptors over
    MockTensors (data pointer 0, 16-byte aligned), boxes of the compiled config. ``int8``: Q's and the
    keys' descriptors over int8 codes."""
    from triton.runtime.jit import MockTensor

    frames, heads, tokens, refs, bank = example
    bank = bank if has_bank else 0
    head_dim_p = max(32 if int8 else 16, triton.next_power_of_2(head_dim))
    t = MockTensor(dtype)
    codes = MockTensor(torch.int8) if int8 else t
    shape = [frames, heads, tokens, head_dim]
    strides = [heads * tokens * head_dim, tokens * head_dim, head_dim, 1]

    def desc(rows_shape, rows_strides, block, tensor=t):
        return TensorDescriptor(tensor, rows_shape, rows_strides, [1, 1, block, head_dim_p])

    rows = frames * refs
    pool_shape = [1, heads, rows, head_dim]
    pool_strides = [rows * heads * head_dim, head_dim, heads * head_dim, 1]
    pools = (desc(pool_shape, pool_strides, block_n, codes), desc(pool_shape, pool_strides, block_n))
    banks = (desc(shape, strides, block_n, codes), desc(shape, strides, block_n))  # no bank: k's, never read
    if bank:
        bank_shape, bank_strides = (
            [1, heads, bank, head_dim],
            [heads * bank * head_dim, bank * head_dim, head_dim, 1],
        )
        banks = (desc(bank_shape, bank_strides, block_n, codes), desc(bank_shape, bank_strides, block_n))
    row_range = (tokens // 4, tokens) if has_row_range else (0, tokens)
    return [
        desc(shape, strides, block_m, codes), desc(shape, strides, block_n, codes),
        desc(shape, strides, block_n), *pools, *banks, desc(shape, strides, block_m),
        frames, heads, tokens, refs, bank, frames, frames, *row_range, 0.125 * LOG2E,
    ]  # fmt: skip


def _example_feature_args(dtype, example, has_key_lengths, has_pool_ranges, has_segments, int8=False) -> list:
    """KL, PR, P, SEG, PSEG, BSEG of a launch: int32 index tensors where the feature is on, else q (never
    read); the pool's rows (frames·refs of the gathered pool); then QS, KS, PKS, BKS: float32 row scales
    with ``int8``, else q (never read)."""
    from triton.runtime.jit import MockTensor

    frames, _, _, refs, _ = example
    t, index = MockTensor(dtype), MockTensor(torch.int32)
    segment_ids = [index if has_segments else t] * 3
    args = [index if has_key_lengths else t, index if has_pool_ranges else t, frames * refs, *segment_ids]
    return [*args, *[MockTensor(torch.float32) if int8 else t] * 4]
