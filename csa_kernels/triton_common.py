"""Pieces both fused kernels share (the pointer kernel, triton_kernel.py; the descriptor kernel,
triton_tma.py): which frame and keys a program works on (own-key end, pool row ranges), which of its query
rows borrow, and the online softmax update of one tile of scores. Only how tiles arrive differs between the
kernels."""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _program_frame(H, num_frames, frames_per_group, window):
    """(frame, head, group, lo, hi) of this program. Grid axis 1 is head-major: the frames of one head run
    next to each other and share its pool and bank rows in L2. Visible frames: [lo, hi) of the group,
    clipped to the window (the frame itself is skipped by the caller)."""
    i_hb = tl.program_id(1)
    i_h = i_hb // num_frames
    i_b = i_hb % num_frames
    i_g = i_b // frames_per_group
    g_start = i_g * frames_per_group
    lo = tl.maximum(i_b - window, g_start)
    hi = tl.minimum(i_b + window + 1, g_start + frames_per_group)
    return i_b, i_h, i_g, lo, hi


@triton.jit
def _own_keys_end(KL, i_b, N, HAS_KEY_LENGTHS: tl.constexpr):
    """End of the frame's own key range: N, or with per-frame key lengths min(N, KL[i_b]) (rows past it are
    padding: the range's masked tail tile stops there, and nothing past it is read)."""
    return tl.minimum(tl.load(KL + i_b).to(tl.int32), N) if HAS_KEY_LENGTHS else N


@triton.jit
def _pool_rows(PR, i_b, lo, hi, S, P, HAS_POOL_RANGES: tl.constexpr):
    """(before_start, before_end, after_start, after_end): the pool rows this frame borrows. By default the
    visible frames' segments of the gathered pool (frame j's S rows at j·S): [lo·S, i·S) and
    [(i+1)·S, hi·S). HAS_POOL_RANGES: the frame's row of the (B, 4) pool_ranges tensor PR (contiguous),
    clamped to the P pool rows with end >= start, so no value makes a range read outside the pool."""
    if HAS_POOL_RANGES:
        p_r = PR + i_b * 4
        before_start = tl.minimum(tl.maximum(tl.load(p_r).to(tl.int32), 0), P)
        before_end = tl.minimum(tl.maximum(tl.load(p_r + 1).to(tl.int32), before_start), P)
        after_start = tl.minimum(tl.maximum(tl.load(p_r + 2).to(tl.int32), 0), P)
        after_end = tl.minimum(tl.maximum(tl.load(p_r + 3).to(tl.int32), after_start), P)
    else:
        before_start = lo * S
        before_end = i_b * S
        after_start = (i_b + 1) * S
        after_end = hi * S
    return before_start, before_end, after_start, after_end


@triton.jit
def _borrowing_rows(o_m, tile_start, N, row_start, row_end, HAS_ROW_RANGE: tl.constexpr):
    """(row mask, all rows borrow, any row borrows) of this query tile.

    Only query rows [row_start, row_end) borrow (rows past N are never stored, so they do not count when
    classifying the tile). A tile with no such row skips the borrowed keys; a tile of only such rows walks
    them unmasked, exactly as without a row range; a tile straddling row_start or row_end walks them for all
    BLOCK_M rows under a per-row mask. A straddling tile costs what a fully borrowing tile costs (the masked
    rows' dots are computed, then discarded) plus one select per score; at most two tiles per (frame, head)
    straddle, none when row_start and row_end are multiples of BLOCK_M."""
    if HAS_ROW_RANGE:
        m_rows = (o_m >= row_start) & (o_m < row_end)
        tile_end = tl.minimum(tile_start + o_m.shape[0], N)
        borrow_all = (row_start <= tile_start) & (tile_end <= row_end)
        borrow_any = tl.maximum(tile_start, row_start) < tl.minimum(tile_end, row_end)
    else:
        m_rows = o_m < N  # not read: every row borrows
        borrow_all = True
        borrow_any = True
    return m_rows, borrow_all, borrow_any


@triton.jit
def _load_segments(SEG, o, end, MASK: tl.constexpr):
    """Segment ids (int32) at offsets ``o`` of SEG; MASK: offsets at or past ``end`` read 0 (not loaded)."""
    if MASK:
        return tl.load(SEG + o, mask=o < end, other=0)
    return tl.load(SEG + o)


@triton.jit
def _softmax_update(
    b_s,
    m_i,
    l_i,
    o_n,
    end,
    m_rows,
    qk_scale,
    MASK_N: tl.constexpr,
    MASK_M: tl.constexpr,
    seg_k=None,
    seg_q=None,
    MASK_SEG: tl.constexpr = False,
    ROW_SCALE: tl.constexpr = False,
):
    """Raw scores [BLOCK_M, BLOCK_N] of keys ``o_n`` → (probabilities, rescale of the old accumulator, new row
    sums, new row maxima), exp2 domain. ``qk_scale``: the scores' scale into the exp2 domain, one
    number, or (ROW_SCALE) one per query row [BLOCK_M] (the 8-bit path: each row's quantization scale
    times the softmax scale, positive, so a row's maximum is still its largest raw score's). MASK_N:
    keys at or past ``end`` score -inf; MASK_M: so do all keys for rows outside ``m_rows`` — their
    running max comes from the own keys (always walked first), so p = 0 and alpha = 1: their acc and l_i
    stay bit-exact. MASK_SEG: so do keys of segment ``seg_k`` [BLOCK_N] for rows of segment ``seg_q``
    [BLOCK_M] unless seg_k is 0 or seg_q (bounded attention). Alone it selects the raw scores and keeps
    the unmasked arithmetic, so all-zero segments give its bits."""
    if MASK_SEG:
        m_seg = (seg_k[None, :] == 0) | (seg_k[None, :] == seg_q[:, None])
    scale_rows = qk_scale[:, None] if ROW_SCALE else qk_scale  # [BLOCK_M, 1] per row, or one number
    if MASK_N or MASK_M:
        m_s = o_n[None, :] < end
        if MASK_M:
            m_s = m_s & m_rows[:, None]
        if MASK_SEG:
            m_s = m_s & m_seg
        b_s = tl.where(m_s, b_s * scale_rows, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(b_s, 1))
        b_s = b_s - m_new[:, None]
    else:
        if MASK_SEG:
            b_s = tl.where(m_seg, b_s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(b_s, 1) * qk_scale)
        b_s = b_s * scale_rows - m_new[:, None]
    b_p = tl.math.exp2(b_s)
    alpha = tl.math.exp2(m_i - m_new)
    l_i = l_i * alpha + tl.sum(b_p, 1)
    return b_p, alpha, l_i, m_new


@triton.jit
def _int8_scores(b_q, b_kt, p_ks, stride_ksn, o_n, end, MASK_N: tl.constexpr):
    """Raw scores [BLOCK_M, BLOCK_N] of int8 query codes [BLOCK_M, D] and transposed key codes
    [D, BLOCK_N]: the exact int32 products times each key row's scale (loaded at ``p_ks`` + row ·
    ``stride_ksn`` for rows ``o_n``; MASK_N: rows at or past ``end`` read 0) — ``quantize.int8_scores``
    with unit query scales, bit for bit. The query rows' scales join the softmax scale
    (``_softmax_update``'s ROW_SCALE), which multiplies every raw score anyway: one multiply per score
    more than the 16-bit path, not two. Both kernels' tiles call it."""
    if MASK_N:
        b_ks = tl.load(p_ks + o_n * stride_ksn, mask=o_n < end, other=0.0)
    else:
        b_ks = tl.load(p_ks + o_n * stride_ksn)
    b_s = tl.dot(b_q, b_kt, out_dtype=tl.int32).to(tl.float32)
    return b_s * b_ks[None, :]
