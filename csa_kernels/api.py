"""The public entry point: ``consistent_attention``."""

from __future__ import annotations

import torch

from .op import consistent_attention_op
from .torch_path import consistent_attention_torch
from .validation import TRITON_INSTALLED, check_inputs, check_triton_inputs, triton_supports


def consistent_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    ref_idx: torch.Tensor,
    *,
    groups: int = 1,
    window: int | None = None,
    bank_k: torch.Tensor | None = None,
    bank_v: torch.Tensor | None = None,
    scale: float | None = None,
    backend: str = "auto",
    query_rows: tuple[int, int] | None = None,
    pool_k: torch.Tensor | None = None,
    check_indices: bool = True,
) -> torch.Tensor:
    """Consistent self-attention: each frame attends to its own tokens plus sampled tokens of others.

    Args:
        q, k, v: (B, H, N, D) each, same dtype (float16, bfloat16 or float32; float64 on the torch path)
            and device, any strides.
            B frames, H heads, N tokens per frame, head dim D.
        ref_idx: (B, S) int64 token positions in [0, N): row j lists the tokens of frame j that other
            frames may attend to (see ``sample_reference_indices``). S may be 0.
        groups: B splits into ``groups`` contiguous groups (e.g. the uncond/cond halves under CFG); a
            frame sees reference tokens of frames in its own group only.
        window: None: every other frame of the group; w >= 1: only frames j with 1 <= |i - j| <= w.
        bank_k, bank_v: optional (groups, H, M, D) extra tokens that every frame of a group attends to
            (e.g. cached identity tokens). Given together or not at all; M may be 0.
        scale: softmax scale, default D ** -0.5.
        backend: "auto" (Triton for CUDA tensors when Triton is installed, the torch path otherwise),
            "triton" (CUDA tensors, or CPU tensors when TRITON_INTERPRET=1 was set before the kernel was
            first used; needs the triton package) or "torch".
        query_rows: None (every query row borrows) or (a, b) with 0 <= a <= b <= N: only query rows
            a <= r < b of every frame attend to the borrowed keys (pool and bank); every other row gets
            plain attention over its own frame's N keys. For joint text + image sequences (FLUX: text
            first, SD3: image first), the image rows: text rows then never see other frames' prompts.
            Keys are not restricted: every row sees all N of its own frame's tokens.
        pool_k: None, or (B, H, S, D) (S = ref_idx.shape[1]), same dtype and device as k, any strides: the
            borrowed keys of each frame, in place of k gathered at ``ref_idx`` (e.g. re-positioned for
            RoPE: a rotation by Δ of an already rotated key is the key rotated to its position + Δ, so the
            caller re-positions only these S rows per frame). Values are still gathered from ``v``.
        check_indices: check that ``ref_idx`` values lie in [0, N) (default). Reading them syncs the
            host with the GPU, so the check is skipped anyway while tracing or compiling, on fake tensors
            and during CUDA graph capture; callers whose indices come from ``sample_reference_indices``
            (this library's processors) pass False, so a denoising step never waits for the GPU. With
            False, out-of-range indices are the caller's bug (the torch path raises, the kernel reads
            garbage).

    The keys and values of frame i are its own N tokens, plus ``k[j, :, ref_idx[j]]`` (or ``pool_k[j]``) /
    ``v[j, :, ref_idx[j]]`` for every visible frame j != i of its group, plus the M bank tokens of its
    group; one softmax runs over that whole set (for the query rows in ``query_rows``).

    Autograd: the Triton path is forward-only. If grad is enabled and any input requires grad, the torch
    path is used whatever ``backend`` says, and gradients flow through it. "auto" also takes the torch path
    for head dims the kernel does not support (D > 256 or D % 8 != 0) and for float64; "triton" raises.

    Returns:
        (B, H, N, D) in the dtype of q.

    Raises:
        TypeError, ValueError: naming the argument and what was expected (shapes, dtypes, devices,
            ref_idx range, ``B % groups``, ``window``, bank shape, head dim, backend, ``query_rows``,
            ``pool_k``).
        ModuleNotFoundError: ``backend="triton"`` without the triton package installed.
    """
    check_inputs(
        q, k, v, ref_idx, groups, window, bank_k, bank_v, scale, backend, query_rows, pool_k, check_indices
    )
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    tensors = (q, k, v, bank_k, bank_v, pool_k)
    needs_grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)
    if backend == "triton" and not needs_grad:
        check_triton_inputs(q)
    use_triton = not needs_grad and (
        backend == "triton"
        or (backend == "auto" and q.device.type == "cuda" and TRITON_INSTALLED and triton_supports(q))
    )
    if use_triton:
        rows = (None, None) if query_rows is None else tuple(query_rows)
        return consistent_attention_op(q, k, v, ref_idx, groups, window, bank_k, bank_v, scale, *rows, pool_k)
    return consistent_attention_torch(
        q,
        k,
        v,
        ref_idx,
        groups=groups,
        window=window,
        bank_k=bank_k,
        bank_v=bank_v,
        scale=scale,
        query_rows=query_rows,
        pool_k=pool_k,
    )
