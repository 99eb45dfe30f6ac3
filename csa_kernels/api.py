"""The public entry point: ``consistent_attention``."""

from __future__ import annotations

import torch

from .op import consistent_attention_op
from .torch_path import consistent_attention_torch, int8_attention_torch
from .validation import (
    TRITON_INSTALLED,
    check_inputs,
    check_int8_device,
    check_triton_inputs,
    triton_supports,
)


def consistent_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    ref_idx: torch.Tensor | None,
    *,
    groups: int = 1,
    window: int | None = None,
    bank_k: torch.Tensor | None = None,
    bank_v: torch.Tensor | None = None,
    scale: float | None = None,
    backend: str = "auto",
    query_rows: tuple[int, int] | None = None,
    pool_k: torch.Tensor | None = None,
    key_lengths: torch.Tensor | None = None,
    pool: tuple[torch.Tensor, torch.Tensor] | None = None,
    pool_ranges: torch.Tensor | None = None,
    check_indices: bool = True,
    segments: torch.Tensor | None = None,
    bank_segments: torch.Tensor | None = None,
    pool_segments: torch.Tensor | None = None,
    precision: str = "native",
) -> torch.Tensor:
    """Consistent self-attention: each frame attends to its own tokens plus sampled tokens of others.

    Args:
        q, k, v: (B, H, N, D) each, same dtype (float16, bfloat16 or float32; float64 on the torch path)
            and device, any strides.
            B frames, H heads, N tokens per frame, head dim D.
        ref_idx: (B, S) int64 token positions in [0, N): row j lists the tokens of frame j that other
            frames may attend to (see ``sample_reference_indices``). S may be 0. With ``key_lengths``,
            row j must sample only frame j's own keys (values < key_lengths[j]). With ``pool``: None or
            (B, 0) (the caller's pool replaces the sampled tokens).
        groups: B splits into ``groups`` contiguous groups (e.g. the uncond/cond halves under CFG); a
            frame sees reference tokens of frames in its own group only (with ``pool``: only picks the
            bank of the group).
        window: None: every other frame of the group; w >= 1: only frames j with 1 <= |i - j| <= w.
            Must be None with ``pool``.
        bank_k, bank_v: optional (groups, H, M, D) extra tokens that every frame of a group attends to
            (e.g. cached identity tokens). Given together or not at all; M may be 0.
        scale: softmax scale, default D ** -0.5.
        backend: "auto" (Triton for CUDA tensors when Triton is installed, the torch path otherwise),
            "triton" (CUDA tensors, or CPU tensors when TRITON_INTERPRET=1 was set before the kernel was
            first used; needs the triton package) or "torch".
        query_rows: None (every query row borrows) or (a, b) with 0 <= a <= b <= N: only query rows
            a <= r < b of every frame attend to the borrowed keys (pool and bank); every other row gets
            plain attention over its own frame's keys. For joint text + image sequences (FLUX: text
            first, SD3: image first), the image rows: text rows then never see other frames' prompts.
            Keys are not restricted: every row sees all of its own frame's keys.
        pool_k: None, or (B, H, S, D) (S = ref_idx.shape[1]), same dtype and device as k, any strides: the
            borrowed keys of each frame, in place of k gathered at ``ref_idx`` (e.g. re-positioned for
            RoPE: a rotation by Δ of an already rotated key is the key rotated to its position + Δ, so the
            caller re-positions only these S rows per frame). Values are still gathered from ``v``.
            Must be None with ``pool``.
        key_lengths: None (all N rows of a frame are its keys), or (B,) int32/int64 on q's device with
            1 <= key_lengths[b] <= N: frame b's own keys are only its rows [0, key_lengths[b]); rows at or
            past it are padding that no query row of frame b attends to (they are never read: any values,
            NaN included). Every query row still gets an output (padded rows' queries attend to the valid
            own keys plus what they borrow); borrowed keys (pool, bank) are unaffected. For batches of
            prompts of different lengths whose padding sits at the end of each frame's sequence (e.g.
            Qwen-Image's joint attention with the image tokens first).
        pool: None, or an explicit borrowed pool ``(keys, values)``, each (R, H, D) — R pool rows (any
            count, 0 included), heads, head dim; k's dtype and device, any strides (a last dim that is
            not contiguous, or keys and values with different strides, cost one copy) — given together
            with ``pool_ranges``. It replaces the pool gathered at ``ref_idx`` and the frame windows:
            e.g. a long story's window mode lays out, per CFG group, the sampled tokens of the visible
            frames contiguous in story order, so each frame's neighbours are one range before its own
            segment and one after it.
        pool_ranges: None, or (B, 4) int32/int64 on q's device: row b is [before_start, before_end,
            after_start, after_end], pool rows with 0 <= start <= end <= R (either range may be empty,
            may overlap the frame's own segment or the other range: rows are attended as listed, a row in
            both ranges twice). Frame b attends to its own keys, pool rows [before_start, before_end),
            pool rows [after_start, after_end), then its group's bank, in one softmax.
        segments: None, or (B, N) int32/int64 on q's device: the segment id of every token of every frame
            (bounded attention, StoryBooth-style: several characters in one frame kept apart). 0 is shared
            (background), c > 0 a character. It is both the segment of each query row and of each token
            other frames borrow (a sampled token's segment is its source token's, ``segments[j,
            ref_idx[j]]``; ``pool_k`` changes no segment). A borrowed key (sampled, pool or bank) of segment
            t is seen by a query row of segment c only when t == 0 or t == c: segment-0 rows see only
            segment-0 borrowed keys. A frame's own keys are seen by all of its rows whatever their segments
            (so no row is left with nothing to attend to). None, and all zeros, leave every key shown:
            bit for bit the result without segments.
        bank_segments: None (every bank token is segment 0), or (groups, M) int32/int64: the bank tokens'
            segments (e.g. each character's cached identity tokens). Only with a bank.
        pool_segments: None (every pool row is segment 0), or (R,) int32/int64: the segments of the rows
            of an explicit ``pool``. Only with ``pool``.
        check_indices: check the values of the index tensors (default): ``ref_idx`` in [0, N) and below
            ``key_lengths``, ``key_lengths`` in [1, N], ``pool_ranges`` inside the pool, segment ids in
            [0, 2**31). Reading them syncs the host with the GPU, so the check is skipped anyway while
            tracing or compiling, on fake tensors and during CUDA graph capture; callers whose indices come
            from ``sample_reference_indices`` (this library's processors) pass False, so a denoising step
            never waits for the GPU. With False, bad values are the caller's bug: an out-of-range ``ref_idx``
            makes the torch path raise and the kernel read garbage; ``key_lengths`` past N and
            ``pool_ranges`` outside the pool act as if clamped to them on every path (nothing outside is
            read); a length below 1 gives NaN rows.
        precision: "native" (default: Q·Kᵀ in the inputs' dtype) or "int8": the 8-bit path
            (``quantize.py``): Q and every key as int8 codes with one float32 scale per row, keys
            smoothed by the call's key mean (the same vector for every key a query sees: the softmax
            cancels it), the scores their exact int32 products scaled; softmax and P·V as on the native
            path. Forward only (autograd raises). Within the accuracy contract of ``quantize.py``.

    The keys and values of frame i are its own N tokens (the first ``key_lengths[i]``), plus
    ``k[j, :, ref_idx[j]]`` (or ``pool_k[j]``) / ``v[j, :, ref_idx[j]]`` for every visible frame j != i of its
    group (or, with ``pool``, the pool rows of its two ``pool_ranges``), plus the M bank tokens of its
    group; one softmax runs over that whole set (for the query rows in ``query_rows``; with segment ids, a
    row's set keeps only the borrowed keys of segment 0 and of its own segment).

    Autograd: the Triton path is forward-only. If grad is enabled and any input requires grad, the torch
    path is used whatever ``backend`` says, and gradients flow through it. "auto" also takes the torch path
    for head dims the kernel does not support (D > 256 or D % 8 != 0) and for float64; "triton" raises.

    Returns:
        (B, H, N, D) in the dtype of q.

    Raises:
        TypeError, ValueError: naming the argument and what was expected (shapes, dtypes, devices,
            ref_idx range, ``B % groups``, ``window``, bank shape, head dim, backend, ``query_rows``,
            ``pool_k``, ``key_lengths``, ``pool``, ``pool_ranges``, the segment ids and the combinations
            ``pool`` rules out).
        ModuleNotFoundError: ``backend="triton"`` without the triton package installed.
    """
    check_inputs(
        q, k, v, ref_idx, groups, window, bank_k, bank_v, scale, backend, query_rows, pool_k,
        key_lengths, pool, pool_ranges, segments, bank_segments, pool_segments, check_indices,
        precision=precision,
    )  # fmt: skip
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    pool_rows_k, pool_rows_v = (None, None) if pool is None else pool
    tensors = (q, k, v, bank_k, bank_v, pool_k, pool_rows_k, pool_rows_v)
    needs_grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)
    if precision == "int8" and needs_grad:
        raise ValueError("precision='int8' is forward-only: run it without autograd (torch.no_grad())")
    if backend == "triton" and not needs_grad:
        check_triton_inputs(q)
    use_triton = not needs_grad and (
        backend == "triton"
        or (backend == "auto" and q.device.type == "cuda" and TRITON_INSTALLED and triton_supports(q))
    )
    if use_triton and precision == "int8":
        check_int8_device(q.device)
    if use_triton:
        if ref_idx is None:  # with a pool: the op's schema takes a tensor
            ref_idx = torch.empty(q.shape[0], 0, dtype=torch.int64, device=q.device)
        rows = (None, None) if query_rows is None else tuple(query_rows)
        return consistent_attention_op(
            q, k, v, ref_idx, groups, window, bank_k, bank_v, scale, *rows, pool_k,
            key_lengths, pool_rows_k, pool_rows_v, pool_ranges, segments, bank_segments, pool_segments,
            precision,
        )  # fmt: skip
    options = {
        "groups": groups,
        "window": window,
        "scale": scale,
        "query_rows": query_rows,
        "key_lengths": key_lengths,
        "pool_ranges": pool_ranges,
        "segments": segments,
        "bank_segments": bank_segments,
        "pool_segments": pool_segments,
    }
    if precision == "int8":
        return int8_attention_torch(q, k, v, ref_idx, bank_k, bank_v, pool_k, pool, **options)
    return consistent_attention_torch(
        q, k, v, ref_idx, bank_k=bank_k, bank_v=bank_v, pool_k=pool_k, pool=pool, **options
    )
