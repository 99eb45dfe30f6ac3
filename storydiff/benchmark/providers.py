"""Ways to compute one consistent-attention layer call, timed side by side by the op suite.

Official variants A and B (and flex, on variant A's mask rule) come from the one oracle,
``consistency/official.py``: given the same token selection they compute the same function as ours, the way
the official StoryDiffusion code does it.

Joint text + image inputs (``inputs["query_rows"] = (a, b)``, the DiT cases) go to the same functions with
the same row range: variant A's dense mask over all frames' joint tokens keeps text rows to their own frame,
variant B's per-frame loop masks text rows from the concatenated borrowed keys, and flex's ``mask_mod``
applies the same rule. The official code has no DiT support; these are its algorithm on joint sequences.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable

import torch
import torch.nn.functional as F

from csa_kernels import attended_keys, consistent_attention, consistent_attention_reference
from csa_kernels.validation import TRITON_INSTALLED

from ..consistency.official import (
    borrowing_rows,
    keep_from_indices,
    official_a,
    official_a_mask,
    official_b,
    visible,
)


def _setup_official(name: str, inputs: dict) -> Callable[[], torch.Tensor]:
    """The oracle's op-level variants on our token selection, as the official keep mask.

    Built here, untimed: the keep mask (variant B draws one per layer call, an elementwise op next to its
    timed gather), variant A's dense mask and flex's block mask (the official code builds A's mask once
    per step and level, for all the level's layers).
    """
    q, k, v = inputs["q"], inputs["k"], inputs["v"]
    groups, bank_k, bank_v = inputs.get("groups", 1), inputs.get("bank_k"), inputs.get("bank_v")
    rows = inputs.get("query_rows")
    if inputs.get("window") is not None:
        raise NotImplementedError("the official code has no window")
    if inputs.get("segments") is not None:
        raise NotImplementedError("the official code has no segments (bounded attention)")
    keep = keep_from_indices(inputs["ref_idx"], q.shape[2], groups)
    if name == "official_b":
        return lambda: official_b(q, k, v, keep, groups=groups, bank_k=bank_k, bank_v=bank_v, query_rows=rows)
    if name == "flex":
        if bank_k is not None:
            raise NotImplementedError("the flex provider covers the official-A write mask (no bank)")
        return _setup_flex(q, k, v, keep, groups, rows)
    bank_keep = None if bank_k is None else torch.ones(bank_k.shape[2], dtype=torch.bool, device=q.device)
    mask = official_a_mask(keep, bank_keep=bank_keep, query_rows=rows)
    return lambda: official_a(q, k, v, mask, groups=groups, bank_k=bank_k, bank_v=bank_v)


@functools.cache
def _compiled_flex():
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False)


def _setup_flex(
    q, k, v, keep: torch.Tensor, groups: int, query_rows: tuple[int, int] | None = None
) -> Callable[[], torch.Tensor]:
    """FlexAttention over each CFG half's merged sequence, the official-A mask rule as its ``mask_mod``.

    Its block mask skips work only per 128 x 128 tile, so token sampling saves almost nothing here.
    """
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    batch, heads, tokens, dim = q.shape
    frames = batch // groups
    kept = (keep if keep.ndim == 3 else keep.expand(groups, -1, -1)).reshape(groups, -1).contiguous()
    rows = borrowing_rows(tokens, query_rows, q.device)

    def mask_mod(b, h, q_idx, kv_idx):
        borrows = None if rows is None else rows[q_idx % tokens]
        return visible(q_idx // tokens, kv_idx // tokens, kept[b, kv_idx], query_borrows=borrows)

    length = frames * tokens
    block_mask = create_block_mask(mask_mod, groups, None, length, length, device=q.device)

    def merge(x):  # [B, H, N, D] -> [G, H, F·N, D]
        return x.reshape(groups, frames, heads, tokens, dim).transpose(1, 2).flatten(2, 3)

    def run() -> torch.Tensor:
        if q.is_cuda:
            out = _compiled_flex()(merge(q), merge(k), merge(v), block_mask=block_mask)
        else:  # eager flex materializes the scores (and warns so): fine at CPU sizes
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)
                out = flex_attention(merge(q), merge(k), merge(v), block_mask=block_mask)
        return out.reshape(groups, heads, frames, tokens, dim).transpose(1, 2).flatten(0, 1)

    return run


def query_key_pairs(
    frames: int,
    tokens: int,
    refs: int,
    *,
    groups: int = 1,
    window: int | None = None,
    bank_tokens: int = 0,
    query_rows: tuple[int, int] | None = None,
) -> int:
    """(query, key) pairs of one head, summed over frames: every row sees its frame's own N keys, and the
    rows in ``query_rows`` (all by default) the borrowed ones too (other frames' refs and the bank)."""
    start, stop = query_rows or (0, tokens)
    keys = attended_keys(frames, tokens, refs, groups=groups, window=window, bank_tokens=bank_tokens)
    return frames * tokens * tokens + (stop - start) * (keys - frames * tokens)


def _dense_keys(inputs: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Random dense K/V with as many (query, key) pairs as the consistent call (own + visible refs + bank,
    the borrowed keys for the ``query_rows`` only), rounded up to whole keys per frame."""
    q, ref_idx = inputs["q"], inputs["ref_idx"]
    frames, heads, tokens, dim = q.shape
    pairs = query_key_pairs(
        frames,
        tokens,
        ref_idx.shape[1],
        groups=inputs.get("groups", 1),
        bank_tokens=0 if inputs.get("bank_k") is None else inputs["bank_k"].shape[2],
        query_rows=inputs.get("query_rows"),
    )
    length = -(-pairs // (frames * tokens))
    return torch.randn(2, frames, heads, length, dim, dtype=q.dtype, device=q.device).unbind(0)


def setup_provider(name: str, inputs: dict) -> Callable[[], torch.Tensor]:
    """A zero-argument callable computing the layer with provider ``name``; setup work is not timed."""
    if name == "sdpa_dense":  # speed of light: plain SDPA over dense keys of the same length
        k, v = _dense_keys(inputs)
        return lambda: F.scaled_dot_product_attention(inputs["q"], k, v)
    if name in ("official_a", "official_b", "flex"):
        return _setup_official(name, inputs)
    fn = {
        "reference": consistent_attention_reference,
        # timed as the library calls it: indices from the seeded sampler, no range check (no host sync)
        "ours_torch": functools.partial(consistent_attention, backend="torch", check_indices=False),
        "ours_triton": functools.partial(consistent_attention, backend="triton", check_indices=False),
    }[name]
    return lambda: fn(**inputs)


PROVIDERS = ("reference", "official_a", "official_b", "flex", "sdpa_dense", "ours_torch", "ours_triton")
UNGATED = {"sdpa_dense"}  # computes another function: timed as the ceiling, never compared


def unavailable(name: str, device: torch.device) -> str | None:
    """Why provider ``name`` cannot run on ``device`` (None: it can)."""
    import os

    if name == "ours_triton":
        if not TRITON_INSTALLED:
            return "needs Triton, which is not installed"
        if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
            return "needs a CUDA device (or TRITON_INTERPRET=1 to interpret the kernel on the CPU)"
    return None


def default_providers(device: torch.device, size: str = "cpu") -> list[str]:
    names = ["official_a", "official_b", "flex", "sdpa_dense", "ours_torch"]
    if device.type == "cuda":
        if TRITON_INSTALLED:  # optional (Linux wheels only): without it, "ours" is the torch path alone
            names.append("ours_triton")
        # flex compiles once per shape (~40 compiles would dominate the full suite; the DiT cases are few but
        # large, and the session's time is short), and torch.compile needs Triton to generate CUDA kernels
        if size in ("full", "dit") or not TRITON_INSTALLED:
            names.remove("flex")
    else:
        names.insert(0, "reference")  # cheap enough at CPU sizes, and slow to time on a GPU
    return names
