"""The 8-bit path's pre-pass as one Triton launch per tensor: ``quantize.quantize_rows`` fused.

``quantize_rows`` in PyTorch is a chain of elementwise kernels over the whole tensor (upcast, subtract the
mean, absolute value, row maximum, divide, round, clamp, cast: about eight launches, each reading and
writing the full rows); on the GPU that chain would cost more than the attention it feeds at small shapes.
Here one program reads BLOCK_R rows of one head once, subtracts that head's mean, takes each row's absolute
maximum, and writes the int8 codes and the float32 scale: the same arithmetic in the same order
(float32 throughout, IEEE-rounded divisions, ties rounded to even as ``torch.round``), so the codes and
scales equal ``quantize_rows``' bit for bit (tested under the interpreter).

Rows are addressed as (row, head, D) with any row and head strides and a contiguous last dimension, which
covers every operand the launcher quantizes: Q and K (B, H, N, D) as (B·N rows per head), a re-positioned
``pool_k`` (B, H, S, D), the bank (G, H, M, D) and an explicit pool (R, H, D).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .quantize import INT8_MAX


@triton.jit
def _round_half_even(y):
    """``torch.round`` of float32 values of magnitude <= 127 (exact here: y + 0.5 and floor lose nothing
    below 2**23): the nearest integer, ties to the even one."""
    r = tl.floor(y + 0.5)
    tie = (r - y) == 0.5
    odd = (r - 2.0 * tl.floor(r * 0.5)) != 0.0
    return tl.where(tie & odd, r - 1.0, r)


@triton.jit
def _quantize_rows_kernel(
    X, MEAN, CODES, SCALES,
    rows_per_outer, stride_xo, stride_xr, stride_xh,  # X: (outer, rows, H, D) with a contiguous D
    stride_co, stride_cr, stride_ch,  # codes: the same layout as X (int8)
    stride_so, stride_sr, stride_sh,  # scales: (outer, rows, H)
    HEAD_DIM: tl.constexpr,
    HEAD_DIM_P: tl.constexpr,
    BLOCK_R: tl.constexpr,
    HAS_MEAN: tl.constexpr,
):  # fmt: skip
    i_r = tl.program_id(0)
    i_o = tl.program_id(1)
    i_h = tl.program_id(2)
    o_r = i_r * BLOCK_R + tl.arange(0, BLOCK_R)
    o_d = tl.arange(0, HEAD_DIM_P)
    m_r = o_r < rows_per_outer
    m_d = o_d < HEAD_DIM
    mask = m_r[:, None] & m_d[None, :]
    x = tl.load(
        X + i_o * stride_xo + o_r[:, None] * stride_xr + i_h * stride_xh + o_d[None, :], mask=mask, other=0.0
    ).to(tl.float32)
    if HAS_MEAN:
        x = x - tl.load(MEAN + i_h * HEAD_DIM + o_d, mask=m_d, other=0.0)[None, :]
        x = tl.where(mask, x, 0.0)  # padded columns stay out of the row maximum
    amax = tl.max(tl.abs(x), axis=1)
    # IEEE-rounded divisions (div_rn), as torch's: a plain "/" may lower to an approximate division on GPUs
    scale = tl.where(amax > 0, tl.math.div_rn(amax, tl.full(amax.shape, 127.0, tl.float32)), 1.0)
    codes = _round_half_even(tl.math.div_rn(x, tl.broadcast_to(scale[:, None], x.shape)))
    codes = tl.minimum(tl.maximum(codes, -127.0), 127.0).to(tl.int8)
    tl.store(
        CODES + i_o * stride_co + o_r[:, None] * stride_cr + i_h * stride_ch + o_d[None, :], codes, mask=mask
    )
    tl.store(SCALES + i_o * stride_so + o_r * stride_sr + i_h * stride_sh, scale, mask=m_r)


def quantize_rows_triton(x: torch.Tensor, mean: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """``quantize.quantize_rows`` of ``x`` less ``mean`` in one launch: ``x`` (B, H, N, D) (or (G, H, M, D))
    or (R, H, D), ``mean`` (H, D) float32 or None (``quantize_inputs``' ``rows``). Returns (int8 codes
    shaped like ``x``, contiguous; float32 scales (x.shape[:-1]), contiguous)."""
    assert INT8_MAX == 127  # the kernel's constant
    if x.stride(-1) != 1:
        x = x.contiguous()
    codes = torch.empty(x.shape, dtype=torch.int8, device=x.device)
    scales = torch.empty(x.shape[:-1], dtype=torch.float32, device=x.device)
    # (outer, rows, H, D) views: the rows before the head axis (none for (B, H, N, D): outer = B, rows = N
    # after it) — every operand here is either (outer, H, rows, D) or (rows, H, D)
    if x.ndim == 4:
        x4, c4, s4 = x.transpose(1, 2), codes.transpose(1, 2), scales.transpose(1, 2)
    elif x.ndim == 3:
        x4, c4, s4 = x[None], codes[None], scales[None]
    else:
        raise ValueError(f"quantize_rows_triton takes (B, H, N, D) or (R, H, D), got {tuple(x.shape)}")
    outer, rows, heads, dim = x4.shape
    if rows == 0 or outer == 0:
        return codes, scales
    block_r = 32
    has_mean = mean is not None
    mean = mean.contiguous() if has_mean else scales  # never read without a mean
    grid = (triton.cdiv(rows, block_r), outer, heads)
    _quantize_rows_kernel[grid](
        x4, mean, c4, s4, rows,
        x4.stride(0), x4.stride(1), x4.stride(2),
        c4.stride(0), c4.stride(1), c4.stride(2),
        s4.stride(0), s4.stride(1), s4.stride(2),
        HEAD_DIM=dim,
        HEAD_DIM_P=max(16, triton.next_power_of_2(dim)),
        BLOCK_R=block_r,
        HAS_MEAN=has_mean,
    )  # fmt: skip
    return codes, scales
