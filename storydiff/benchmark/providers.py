"""Ways to compute one consistent-attention layer call, timed side by side by the op suite.

Official variants A and B (and flex, on variant A's mask rule) come from the one oracle,
``storydiff.official``: given the same token selection they compute the same function as ours, the way
the official StoryDiffusion code does it.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable

import torch
import torch.nn.functional as F

from csa_kernels import attended_keys, consistent_attention, consistent_attention_reference
from csa_kernels.validation import TRITON_INSTALLED

from ..official import keep_from_indices, official_a, official_a_mask, official_b, visible


def _setup_official(name: str, inputs: dict) -> Callable[[], torch.Tensor]:
    """The oracle's op-level variants on our token selection, as the official keep mask.

    Built here, untimed: the keep mask (variant B draws one per layer call, an elementwise op next to its
    timed gather), variant A's dense mask and flex's block mask (the official code builds A's mask once
    per step and level, for all the level's layers).
    """
    q, k, v = inputs["q"], inputs["k"], inputs["v"]
    groups, bank_k, bank_v = inputs.get("groups", 1), inputs.get("bank_k"), inputs.get("bank_v")
    if inputs.get("window") is not None:
        raise NotImplementedError("the official code has no window")
    keep = keep_from_indices(inputs["ref_idx"], q.shape[2], groups)
    if name == "official_b":
        return lambda: official_b(q, k, v, keep, groups=groups, bank_k=bank_k, bank_v=bank_v)
    if name == "flex":
        if bank_k is not None:
            raise NotImplementedError("the flex provider covers the official-A write mask (no bank)")
        return _setup_flex(q, k, v, keep, groups)
    bank_keep = None if bank_k is None else torch.ones(bank_k.shape[2], dtype=torch.bool, device=q.device)
    mask = official_a_mask(keep, bank_keep=bank_keep)
    return lambda: official_a(q, k, v, mask, groups=groups, bank_k=bank_k, bank_v=bank_v)


@functools.cache
def _compiled_flex():
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False)


def _setup_flex(q, k, v, keep: torch.Tensor, groups: int) -> Callable[[], torch.Tensor]:
    """FlexAttention over each CFG half's merged sequence, the official-A mask rule as its ``mask_mod``.

    Its block mask skips work only per 128 x 128 tile, so token sampling saves almost nothing here.
    """
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    batch, heads, tokens, dim = q.shape
    frames = batch // groups
    kept = (keep if keep.ndim == 3 else keep.expand(groups, -1, -1)).reshape(groups, -1).contiguous()

    def mask_mod(b, h, q_idx, kv_idx):
        return visible(q_idx // tokens, kv_idx // tokens, kept[b, kv_idx])

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


def _dense_keys(inputs: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Random dense K/V as long as the longest key set of a frame (own + visible refs + bank)."""
    q, ref_idx = inputs["q"], inputs["ref_idx"]
    frames, heads, tokens, dim = q.shape
    keys = attended_keys(
        frames,
        tokens,
        ref_idx.shape[1],
        groups=inputs.get("groups", 1),
        bank_tokens=0 if inputs.get("bank_k") is None else inputs["bank_k"].shape[2],
    )
    length = -(-keys // frames)
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
        "ours_torch": functools.partial(consistent_attention, backend="torch"),
        "ours_triton": functools.partial(consistent_attention, backend="triton"),
    }[name]
    return lambda: fn(**inputs)


PROVIDERS = ("reference", "official_a", "official_b", "flex", "sdpa_dense", "ours_torch", "ours_triton")
UNGATED = {"sdpa_dense"}  # computes another function: timed as the ceiling, never compared


def default_providers(device: torch.device, size: str = "cpu") -> list[str]:
    names = ["official_a", "official_b", "flex", "sdpa_dense", "ours_torch"]
    if device.type == "cuda":
        if TRITON_INSTALLED:  # optional (Linux wheels only): without it, "ours" is the torch path alone
            names.append("ours_triton")
        # flex compiles once per shape (~40 compiles would dominate the full suite), and torch.compile needs
        # Triton to generate CUDA kernels
        if size == "full" or not TRITON_INSTALLED:
            names.remove("flex")
    else:
        names.insert(0, "reference")  # cheap enough at CPU sizes, and slow to time on a GPU
    return names
