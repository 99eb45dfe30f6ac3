"""Hopper path of the fused forward: every tile moves through tensor descriptors (TMA on sm_90+).

Same algorithm and key order as the pointer kernel (triton_kernel.py): one program per BLOCK_M queries of one
(frame, head), an online softmax over the frame's own keys, the pool rows of the visible frames before and
after it, then its group's bank. What differs is how tiles arrive: a tensor descriptor per operand, so the
copy engine (TMA) moves whole tiles into shared memory asynchronously — no per-thread address math, no
cp.async bookkeeping, fewer registers — and the out-of-bounds parts of a box arrive as zeros.

Every operand is seen as a 4-D tensor whose third dimension is the token axis, so one tile step serves all:
q/k/v/out (B, H, N, D) at [frame, head, n, 0], the bank (G, H, M, D) at [group, head, n, 0] and the pool,
(R, H, D) rows — the gathered (B·S, H, D) or a caller's pool of R rows — as (1, H, R, D) at [0, head, n, 0]
(the rows of consecutive frames are one block). Tails: every range's tail tile masks its scores and zeroes
its values past the range end in registers (past the descriptor's bound the box holds zeros anyway): a pool
range ends inside the pool and the own keys may end at a frame's key length before N, so a neighbour
frame's rows and a frame's padding are never mixed in, whatever they hold.

Chosen by triton_kernel.triton_consistent_attention on GPUs of compute capability 9.0 and above when the
tensors meet TMA's rules (16-byte aligned bases and strides, contiguous last dimension); the interpreter
runs it on the CPU for tests.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

from .triton_common import (
    _borrowing_rows,
    _int8_scores,
    _load_segments,
    _own_keys_end,
    _pool_rows,
    _program_frame,
    _softmax_update,
)


@triton.jit
def _tma_tile(
    acc,
    l_i,
    m_i,
    b_q,
    desc_k,
    desc_v,
    c0,
    c1,
    n0,
    end,
    m_rows,
    qk_scale,
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
    b_k = desc_k.load([c0, c1, n0, 0]).reshape(BLOCK_N, HEAD_DIM_P)
    if DOT_F32 and not INT8:
        b_k = b_k.to(tl.float32)
    o_n = n0 + tl.arange(0, BLOCK_N)
    if INT8:  # int8 codes: exact int32 products times the key rows' scales (triton_kernel._attn_tile)
        b_s = _int8_scores(b_q, b_k.T, p_ks, stride_ksn, o_n, end, MASK_N)
        qk_scale = b_qs  # each query row's scale times the softmax scale
    else:
        b_s = tl.dot(b_q, b_k.T, input_precision=INPUT_PRECISION)  # [BLOCK_M, BLOCK_N]
    seg_k = _load_segments(p_seg, o_n, end, MASK_N) if MASK_SEG else o_n
    b_p, alpha, l_i, m_new = _softmax_update(
        b_s, m_i, l_i, o_n, end, m_rows, qk_scale, MASK_N, MASK_M, seg_k, seg_q, MASK_SEG, INT8
    )
    b_v = desc_v.load([c0, c1, n0, 0]).reshape(BLOCK_N, HEAD_DIM_P)
    if MASK_N:  # rows past the range may belong to another frame: p is 0 there, and so must v be
        b_v = tl.where(o_n[:, None] < end, b_v, 0.0)
    if DOT_F32:
        b_v = b_v.to(tl.float32)
    acc = tl.dot(b_p.to(b_v.dtype), b_v, acc * alpha[:, None], input_precision=INPUT_PRECISION)
    return acc, l_i, m_new


@triton.jit
def _tma_range(
    acc,
    l_i,
    m_i,
    b_q,
    desc_k,
    desc_v,
    c0,
    c1,
    start,
    end,
    m_rows,
    qk_scale,
    HEAD_DIM_P: tl.constexpr,
    BLOCK_N: tl.constexpr,
    MASK_M: tl.constexpr,
    DOT_F32: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    WARP_SPECIALIZE: tl.constexpr = False,
    p_seg=None,
    seg_q=None,
    MASK_SEG: tl.constexpr = False,
    p_ks=None,
    stride_ksn=0,
    b_qs=None,
    INT8: tl.constexpr = False,
):
    """Token rows [start, end) at (c0, c1): full tiles unmasked, then one masked tail tile if needed.
    MASK_SEG: keys hidden from the query rows by segment (ids at ``p_seg`` + row, the rows' ``seg_q``).
    INT8: int8 key codes, their rows' scales at ``p_ks`` + row · ``stride_ksn`` (the queries': ``b_qs``)."""
    full_end = start + (end - start) // BLOCK_N * BLOCK_N
    # WARP_SPECIALIZE: producer warps issue the TMA loads while consumer warpgroups compute
    for n0 in tl.range(start, full_end, BLOCK_N, warp_specialize=WARP_SPECIALIZE):
        acc, l_i, m_i = _tma_tile(
            acc, l_i, m_i, b_q, desc_k, desc_v, c0, c1, n0, end, m_rows, qk_scale,
            HEAD_DIM_P, BLOCK_N, False, MASK_M, DOT_F32, INPUT_PRECISION, p_seg, seg_q, MASK_SEG,
            p_ks, stride_ksn, b_qs, INT8,
        )  # fmt: skip
    if full_end < end:
        acc, l_i, m_i = _tma_tile(
            acc, l_i, m_i, b_q, desc_k, desc_v, c0, c1, full_end, end, m_rows, qk_scale,
            HEAD_DIM_P, BLOCK_N, True, MASK_M, DOT_F32, INPUT_PRECISION, p_seg, seg_q, MASK_SEG,
            p_ks, stride_ksn, b_qs, INT8,
        )  # fmt: skip
    return acc, l_i, m_i


@triton.jit
def _tma_borrowed(
    acc, l_i, m_i, b_q, desc_pk, desc_pv, desc_bk, desc_bv, i_g, i_h,
    before_start, before_end, after_start, after_end, M, m_rows, qk_scale,
    HEAD_DIM_P: tl.constexpr,
    BLOCK_N: tl.constexpr,
    HAS_BANK: tl.constexpr,
    MASK_M: tl.constexpr,
    DOT_F32: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    WARP_SPECIALIZE: tl.constexpr = False,
    p_pseg=None,
    p_bseg=None,
    seg_q=None,
    HAS_SEGMENTS: tl.constexpr = False,
    p_pks=None,
    p_bks=None,
    stride_pks=0,
    b_qs=None,
    INT8: tl.constexpr = False,
):  # fmt: skip
    """The borrowed keys: the pool rows of the visible frames before and after this one, then the bank.
    HAS_SEGMENTS: each key tile's segment ids (pool rows' at ``p_pseg``, the bank's at ``p_bseg``) are
    compared with the query rows' ``seg_q``. INT8: the pool rows' scales at ``p_pks`` + row ·
    ``stride_pks``, the bank's at ``p_bks`` + row."""
    acc, l_i, m_i = _tma_range(
        acc, l_i, m_i, b_q, desc_pk, desc_pv, 0, i_h, before_start, before_end, m_rows, qk_scale,
        HEAD_DIM_P, BLOCK_N, MASK_M, DOT_F32, INPUT_PRECISION, WARP_SPECIALIZE, p_pseg, seg_q, HAS_SEGMENTS,
        p_pks, stride_pks, b_qs, INT8,
    )  # fmt: skip
    acc, l_i, m_i = _tma_range(
        acc, l_i, m_i, b_q, desc_pk, desc_pv, 0, i_h, after_start, after_end, m_rows, qk_scale,
        HEAD_DIM_P, BLOCK_N, MASK_M, DOT_F32, INPUT_PRECISION, WARP_SPECIALIZE, p_pseg, seg_q, HAS_SEGMENTS,
        p_pks, stride_pks, b_qs, INT8,
    )  # fmt: skip
    if HAS_BANK:
        acc, l_i, m_i = _tma_range(
            acc, l_i, m_i, b_q, desc_bk, desc_bv, i_g, i_h, 0, M, m_rows, qk_scale,
            HEAD_DIM_P, BLOCK_N, MASK_M, DOT_F32, INPUT_PRECISION, WARP_SPECIALIZE, p_bseg, seg_q,
            HAS_SEGMENTS, p_bks, 1, b_qs, INT8,
        )  # fmt: skip
    return acc, l_i, m_i


@triton.jit
def _consistent_attn_fwd_tma(
    desc_q, desc_k, desc_v, desc_pk, desc_pv, desc_bk, desc_bv, desc_o,
    B, H, N, S, M, frames_per_group, window, row_start, row_end, qk_scale,
    KL, PR, P,  # key lengths (B,), pool ranges (B, 4), pool rows: read only under their flags
    SEG, PSEG, BSEG,  # int32 segment ids of tokens (B, N), pool rows (P,), banks (G, M): HAS_SEGMENTS only
    QS, KS, PKS, BKS,  # fp32 row scales of Q, K (B, H, N), pool keys (P, H), bank keys (G, H, M): INT8 only
    HEAD_DIM_P: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    HAS_BANK: tl.constexpr,
    HAS_ROW_RANGE: tl.constexpr,
    DOT_F32: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    WARP_SPECIALIZE: tl.constexpr = False,
    HAS_KEY_LENGTHS: tl.constexpr = False,
    HAS_POOL_RANGES: tl.constexpr = False,
    HAS_SEGMENTS: tl.constexpr = False,
    INT8: tl.constexpr = False,
):  # fmt: skip
    i_m = tl.program_id(0)
    i_b, i_h, i_g, lo, hi = _program_frame(H, B, frames_per_group, window)
    own_end = _own_keys_end(KL, i_b, N, HAS_KEY_LENGTHS)

    m0 = i_m * BLOCK_M
    o_m = m0 + tl.arange(0, BLOCK_M)
    b_q = desc_q.load([i_b, i_h, m0, 0]).reshape(BLOCK_M, HEAD_DIM_P)
    if DOT_F32 and not INT8:
        b_q = b_q.to(tl.float32)
    b_qs = o_m  # INT8: the query rows' scales (rows past N: 0, never stored)
    if INT8:
        b_qs = tl.load(QS + (i_b * H + i_h) * N + o_m, mask=o_m < N, other=0.0)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM_P], dtype=tl.float32)

    # Own tokens first: every query row then has a finite running max before any masked tile.
    acc, l_i, m_i = _tma_range(
        acc, l_i, m_i, b_q, desc_k, desc_v, i_b, i_h, 0, own_end, o_m, qk_scale,
        HEAD_DIM_P, BLOCK_N, False, DOT_F32, INPUT_PRECISION, WARP_SPECIALIZE, None, None, False,
        KS + (i_b * H + i_h) * N, 1, b_qs, INT8,
    )  # fmt: skip
    m_rows, borrow_all, borrow_any = _borrowing_rows(o_m, m0, N, row_start, row_end, HAS_ROW_RANGE)
    # after the own keys' loop (the ranges need not stay live across it)
    before_start, before_end, after_start, after_end = _pool_rows(PR, i_b, lo, hi, S, P, HAS_POOL_RANGES)
    seg_q = _load_segments(SEG + i_b * N, o_m, N, True) if HAS_SEGMENTS else o_m
    p_bseg = BSEG + i_g * M
    if borrow_all:
        acc, l_i, m_i = _tma_borrowed(
            acc, l_i, m_i, b_q, desc_pk, desc_pv, desc_bk, desc_bv, i_g, i_h,
            before_start, before_end, after_start, after_end, M, m_rows, qk_scale,
            HEAD_DIM_P, BLOCK_N, HAS_BANK, False, DOT_F32, INPUT_PRECISION, WARP_SPECIALIZE,
            PSEG, p_bseg, seg_q, HAS_SEGMENTS, PKS + i_h, BKS + (i_g * H + i_h) * M, H, b_qs, INT8,
        )  # fmt: skip
    elif borrow_any:
        acc, l_i, m_i = _tma_borrowed(
            acc, l_i, m_i, b_q, desc_pk, desc_pv, desc_bk, desc_bv, i_g, i_h,
            before_start, before_end, after_start, after_end, M, m_rows, qk_scale,
            HEAD_DIM_P, BLOCK_N, HAS_BANK, True, DOT_F32, INPUT_PRECISION, WARP_SPECIALIZE,
            PSEG, p_bseg, seg_q, HAS_SEGMENTS, PKS + i_h, BKS + (i_g * H + i_h) * M, H, b_qs, INT8,
        )  # fmt: skip

    acc = acc / l_i[:, None]
    # the store's box is clipped at the descriptor's bounds: rows past N and columns past D are not written
    desc_o.store([i_b, i_h, m0, 0], acc.to(desc_o.dtype).reshape(1, 1, BLOCK_M, HEAD_DIM_P))


def tma_compatible(*tensors: torch.Tensor | None) -> bool:
    """TMA's rules: 16-byte aligned base addresses and strides, a contiguous last dimension."""
    for t in tensors:
        if t is None:
            continue
        item = t.element_size()
        if t.stride(-1) != 1 or t.data_ptr() % 16 or any(s * item % 16 for s in t.stride()[:-1]):
            return False
    return True


def describe(t: torch.Tensor, block_n: int, head_dim_p: int) -> TensorDescriptor:
    """A (B, H, N, D) tensor as a descriptor of (1, 1, block_n, head_dim_p) boxes."""
    return TensorDescriptor(t, list(t.shape), list(t.stride()), [1, 1, block_n, head_dim_p])


def describe_pool(pool: torch.Tensor, block_n: int, head_dim_p: int) -> TensorDescriptor:
    """A (R, H, D) pool (last dim contiguous) as (1, H, R, D): all R rows on the token axis — the gathered
    pool's rows of consecutive frames, or a caller's pool of any row count. Boxes past R arrive as zeros."""
    rows, heads, dim = pool.shape
    stride_r, stride_h, _ = pool.stride()
    # the leading axis has one index: any 16-byte multiple is a valid stride for it
    return TensorDescriptor(
        pool, [1, heads, rows, dim], [rows * stride_r, stride_h, stride_r, 1], [1, 1, block_n, head_dim_p]
    )


def set_block_shapes(nargs: dict) -> None:
    """Autotune pre-hook: each config's tile sizes into the descriptors' boxes."""
    block_m, block_n = nargs["BLOCK_M"], nargs["BLOCK_N"]
    for name in ("desc_q", "desc_o"):
        nargs[name].block_shape = [1, 1, block_m, nargs["HEAD_DIM_P"]]
    for name in ("desc_k", "desc_v", "desc_pk", "desc_pv", "desc_bk", "desc_bv"):
        nargs[name].block_shape = [1, 1, block_n, nargs["HEAD_DIM_P"]]
