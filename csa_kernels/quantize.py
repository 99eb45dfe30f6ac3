"""The 8-bit path's quantization (``precision="int8"``, SageAttention-style): INT8 Q·Kᵀ with K smoothed,
P·V in the input's own type.

**Smoothing.** Every key of a call is shifted by one vector per head, ``m[h]``: the mean of the call's own
valid keys (every frame, every CFG group; padding past ``key_lengths`` left out) and its bank's keys.
Every key a query sees — its own frame's, the borrowed pool (gathered, re-positioned ``pool_k`` or an
explicit ``pool``) and its group's bank — is shifted by that same ``m``, so each score row moves by the
constant ``q·m``, which the softmax cancels: the attention is unchanged in exact arithmetic. What changes
is the quantization error: diffusion keys carry a large common component in a few channels (the outliers
SageAttention's smoothing is for), which would otherwise set every row's scale and leave the informative
part a few of the 255 levels. A per-frame mean would not do: frame i's query would see its own keys
shifted by m_i and a borrowed key of frame j by m_j, moving borrowed scores by q·(m_j − m_i) against its
own — a different softmax, a wrong output rather than a less accurate one. One vector for the whole call
(not one per CFG group) keeps that true whatever an explicit pool's ranges mix; the CFG halves share their
image tokens' statistics.

**Granularity: one scale per row** (per frame, head and token), for Q and for K: ``scale = absmax / 127``,
values ``round(x / scale)`` in [-127, 127] (round half to even), scales in float32. That is finer than
SageAttention's per-block scales, so never less accurate, and it is what borrowed keys need: a kernel's
key tile holds rows gathered from many frames (the pool) or from the bank, so a per-tile scale would depend
on which rows share a tile — on the autotuned tile size — and a pre-pass could not know the tiles; a row's
scale travels with the row wherever it is gathered. A score is ``(q8 · k8) · sq · sk``: the exact int32 dot
product of the row pair, scaled by the product of the two rows' scales (the softmax scale is applied after,
as on the 16-bit path).

**Where: one light pre-pass** (:func:`quantize_inputs`; on the kernels' path one Triton launch per tensor,
``triton_quantize.py``, the same codes and scales bit for bit): each of Q and K is read once (2 bytes a
value) and written as codes (1 byte) plus a float32 scale per row (4 bytes per D values), so at SDXL's
1/16 level (N = 4096 tokens, D = 64, BLOCK_M = 128) it moves 3.1 bytes per value once, against the 2 bytes
per value the 16-bit kernel reads K for each of its N / BLOCK_M = 32 query tiles — which the int8 kernel
then reads at 1 byte. Quantizing inside the kernel instead would redo K's absolute maxima, divisions and
roundings for every query tile that reads them (32 times here), and would need the call-wide mean before
the first tile anyway (a pass over K either way).

**Error contract** (``tests/ops/test_int8.py`` enforces it; the bounds are derived there): a per-row
absmax quantizer errs by at most ``scale / 2`` per element, so a score errs by at most
``(‖q‖₁·amax(k) + ‖k‖₁·amax(q)) / 254`` (plus a second-order term), relative to a score scale of
``‖q‖·‖k‖``: about ``D / 254 / √D ≈ 4.5 %`` of one row-pair's score scale at D = 128 in the worst case and
≈ 0.4 % typically (errors of independent channels add as a random walk). Smoothing keeps ``amax(k)``
that of K's informative part, not of its common offset.

The torch path runs the same quantization as its reference implementation: it dequantizes the rows
(``int8 · scale`` in float32) and attends in float32, so its scores are the kernel's up to float32
summation order (the int32 products are exact in float32: |q8 · k8| ≤ 127² · D < 2²⁴ for D ≤ 1040).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

#: the precisions ``consistent_attention`` takes: "native" (Q·Kᵀ in the inputs' dtype) or "int8"
PRECISIONS = ("native", "int8")
#: the largest magnitude of an int8 code (symmetric: -127 .. 127, so negation never overflows)
INT8_MAX = 127
#: the accuracy contract against the float64 reference, per input type (tests/ops/test_int8.py derives and
#: enforces it; the op suite gates its int8 rows on the Gaussian one): (least cosine similarity, most
#: relative L1, most max error). "gaussian": Gaussian q, k, v; "outlier": keys with a few ±20 channels;
#: "offset": those plus a different large offset per frame.
ACCURACY_CONTRACT = {
    "gaussian": (0.9999, 1.5e-2, 3e-2),
    "outlier": (0.9999, 1.5e-2, 3e-2),
    "offset": (0.9998, 2.5e-2, 5e-2),
}


def key_mean(
    k: torch.Tensor,
    key_lengths: torch.Tensor | None = None,
    extra: tuple[torch.Tensor | None, ...] = (),
) -> torch.Tensor:
    """(H, D) float32: the smoothing vector of a call — the mean over every frame's own valid keys of ``k``
    (B, H, N, D) (rows at or past ``key_lengths[b]`` are padding and left out) and the rows of ``extra``:
    keys from elsewhere that frames see too and whose distribution may differ from the frames' (a bank
    (G, H, M, D) written at another step; (R, H, D) rows are summed over R)."""
    keys = k.to(torch.float32)
    if key_lengths is None:
        valid = torch.ones(k.shape[0], k.shape[2], dtype=torch.bool, device=k.device)
    else:
        valid = torch.arange(k.shape[2], device=k.device) < key_lengths[:, None]  # [B, N]
    # padding may hold anything, NaN included: selected away, not multiplied by 0
    total = torch.where(valid[:, None, :, None], keys, 0.0).sum(dim=(0, 2))
    count = valid.sum().to(torch.float32)  # on the device: no host sync
    for rows in extra:
        if rows is not None and rows.numel():
            flat = rows.to(torch.float32).transpose(0, -3).flatten(1, -2) if rows.ndim == 4 else rows.float()
            # (G, H, M, D) -> (H, G·M, D); (R, H, D) stays: summed over its row dim either way
            total = total + (flat.sum(dim=1) if rows.ndim == 4 else flat.sum(dim=0))
            count = count + flat.shape[1 if rows.ndim == 4 else 0]
    return total / count.clamp_min(1)


def quantize_rows(x: torch.Tensor, mean: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row symmetric int8 codes of ``x`` (..., D) less ``mean`` (broadcast over its leading dims):
    (codes int8 (..., D), scales float32 (...)), ``x - mean ≈ codes · scales[..., None]``. A row of zeros
    gets scale 1 and codes 0 (no division by zero, and it dequantizes to zeros)."""
    rows = x.to(torch.float32)
    if mean is not None:
        rows = rows - mean
    amax = rows.abs().amax(dim=-1)
    scale = torch.where(amax > 0, amax / INT8_MAX, torch.ones_like(amax))
    codes = torch.round(rows / scale[..., None]).clamp_(-INT8_MAX, INT8_MAX).to(torch.int8)
    return codes, scale


def dequantize(codes: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """float32 rows ``codes · scale`` (the values the int8 path computes its scores from)."""
    return codes.to(torch.float32) * scale[..., None]


def int8_scores(
    q_codes: torch.Tensor, q_scale: torch.Tensor, k_codes: torch.Tensor, k_scale: torch.Tensor
) -> torch.Tensor:
    """(..., N, M) float32 scores ``(q8 · k8ᵀ) · sq · sk`` of (..., N, D) and (..., M, D) codes with their
    (..., N) and (..., M) scales: the int32 products exactly (integer matmul), then the scales — what the
    kernel's Q·Kᵀ computes, to compare it with bit for bit."""
    products = torch.matmul(q_codes.to(torch.int32), k_codes.to(torch.int32).transpose(-1, -2))
    return products.to(torch.float32) * q_scale[..., :, None] * k_scale[..., None, :]


@dataclass(frozen=True)
class QuantizedInputs:
    """Q and every key of a call as int8 codes and float32 per-row scales, K smoothed by ``mean`` (H, D).
    ``pool_k`` / ``bank_k`` / ``pool_keys``: those of the call's re-positioned borrowed keys, bank and
    explicit pool (None where the call has none)."""

    mean: torch.Tensor
    q: tuple[torch.Tensor, torch.Tensor]
    k: tuple[torch.Tensor, torch.Tensor]
    pool_k: tuple[torch.Tensor, torch.Tensor] | None = None
    bank_k: tuple[torch.Tensor, torch.Tensor] | None = None
    pool_keys: tuple[torch.Tensor, torch.Tensor] | None = None


def quantize_inputs(
    q: torch.Tensor,
    k: torch.Tensor,
    *,
    key_lengths: torch.Tensor | None = None,
    pool_k: torch.Tensor | None = None,
    bank_k: torch.Tensor | None = None,
    pool_keys: torch.Tensor | None = None,
    smooth: bool = True,
    rows: Callable[[torch.Tensor, torch.Tensor | None], tuple[torch.Tensor, torch.Tensor]] | None = None,
) -> QuantizedInputs:
    """The pre-pass: ``q`` (B, H, N, D) per row; ``k`` (B, H, N, D), ``pool_k`` (B, H, S, D), ``bank_k``
    (groups, H, M, D) and an explicit pool's keys ``pool_keys`` (R, H, D) per row after subtracting the
    call's key mean (:func:`key_mean` over the own valid keys and the bank; ``pool_k`` rows are frames'
    own keys re-positioned, an explicit pool's are other frames' keys, and rows of it no frame reads may
    hold anything, NaN included — they are left out, as reading the ranges would sync the host;
    ``smooth=False``: no subtraction, to show what smoothing buys). ``rows(x, mean)``: what quantizes the
    rows of a (…, H, rows, D) or (R, H, D) tensor less an (H, D) mean (None: none) — default
    :func:`quantize_rows`; the kernels' launcher passes its one-launch Triton version
    (``triton_quantize.py``: the same codes and scales)."""
    heads, dim = k.shape[1], k.shape[3]
    mean = key_mean(k, key_lengths, (bank_k,)) if smooth else torch.zeros(heads, dim, device=k.device)
    if rows is None:

        def rows(x: torch.Tensor, m: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
            # (…, H, rows, D): the (H, D) mean broadcast per head; (R, H, D): as it is
            return quantize_rows(x, None if m is None else (m if x.ndim == 3 else m[:, None, :]))

    return QuantizedInputs(
        mean=mean,
        q=rows(q, None),
        k=rows(k, mean),
        pool_k=None if pool_k is None else rows(pool_k, mean),
        bank_k=None if bank_k is None else rows(bank_k, mean),
        pool_keys=None if pool_keys is None else rows(pool_keys, mean),
    )
