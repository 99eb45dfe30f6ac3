"""The reference pools of K and V gathered in one launch (pool.py describes the layout).

``gather_reference_pool`` is one PyTorch indexing kernel per tensor; on the GPU each launch costs more than
the copy of a few thousand rows, so the fused forward gathers both pools with this single Triton kernel:
one program copies BLOCK_S sampled rows of one (frame, head) from K and from V.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _gather_pools(
    K, V, IDX, PK, PV,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_ib,
    H, S,
    HEAD_DIM: tl.constexpr,
    HEAD_DIM_P: tl.constexpr,
    BLOCK_S: tl.constexpr,
    GATHER_K: tl.constexpr,
):  # fmt: skip
    i_s = tl.program_id(0)
    i_bh = tl.program_id(1)
    i_b = i_bh // H
    i_h = i_bh % H
    o_s = i_s * BLOCK_S + tl.arange(0, BLOCK_S)
    o_d = tl.arange(0, HEAD_DIM_P)
    m_s = o_s < S
    mask = m_s[:, None] & (o_d[None, :] < HEAD_DIM)
    rows = tl.load(IDX + i_b * stride_ib + o_s, mask=m_s, other=0)
    # pool (B, S, H, D) contiguous: frame b's sample s of head h at ((b·S + s)·H + h)·D
    o_pool = ((i_b * S + o_s[:, None]) * H + i_h) * HEAD_DIM + o_d[None, :]
    p_v = V + i_b * stride_vb + i_h * stride_vh + rows[:, None] * stride_vn + o_d[None, :]
    tl.store(PV + o_pool, tl.load(p_v, mask=mask), mask=mask)
    if GATHER_K:
        p_k = K + i_b * stride_kb + i_h * stride_kh + rows[:, None] * stride_kn + o_d[None, :]
        tl.store(PK + o_pool, tl.load(p_k, mask=mask), mask=mask)


def gather_pools(
    k: torch.Tensor, v: torch.Tensor, ref_idx: torch.Tensor, gather_k: bool = True
) -> tuple[torch.Tensor | None, torch.Tensor]:
    """(B, S, H, D) contiguous pools of ``k`` (unless ``gather_k`` is False: None) and ``v`` at ``ref_idx``,
    equal to ``gather_reference_pool`` of each, in one launch. Last dims must be contiguous."""
    frames, heads, _, head_dim = v.shape
    samples = ref_idx.shape[1]
    pool_v = torch.empty(frames, samples, heads, head_dim, dtype=v.dtype, device=v.device)
    pool_k = torch.empty(pool_v.shape, dtype=k.dtype, device=k.device) if gather_k else None  # int8 codes too
    ref_idx = ref_idx if ref_idx.stride(-1) == 1 else ref_idx.contiguous()
    block_s = 32
    grid = (triton.cdiv(samples, block_s), frames * heads)
    _gather_pools[grid](
        k, v, ref_idx, pool_k if gather_k else pool_v, pool_v,
        k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        ref_idx.stride(0),
        heads, samples,
        HEAD_DIM=head_dim,
        HEAD_DIM_P=max(16, triton.next_power_of_2(head_dim)),
        BLOCK_S=block_s,
        GATHER_K=gather_k,
    )  # fmt: skip
    return pool_k, pool_v
