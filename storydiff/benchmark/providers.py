"""Ways to compute one consistent-attention layer call, timed side by side by the op suite.

Official variants A and B are written from DESIGN.md §2 (not copied): given the same token selection
they compute the same function as ours, the way the official StoryDiffusion code does it.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable

import torch
import torch.nn.functional as F

from csa_kernels import attended_keys, consistent_attention, consistent_attention_reference
from csa_kernels.validation import TRITON_INSTALLED


def _sampled(ref_idx: torch.Tensor, tokens: int) -> torch.Tensor:
    """(B, N) bool: which tokens each frame offers (the official code's per-token draw, as a mask)."""
    sampled = torch.zeros(ref_idx.shape[0], tokens, dtype=torch.bool, device=ref_idx.device)
    return sampled.scatter_(1, ref_idx, True)


def official_a(q, k, v, ref_idx, *, groups=1, window=None, bank_k=None, bank_v=None):
    """Variant A: all frames of a CFG half in one SDPA call with a dense (F·N)² boolean mask."""
    if window is not None or bank_k is not None:
        raise NotImplementedError("official variant A has no window and no bank at op level")
    frames, heads, tokens, dim = q.shape
    per_group = frames // groups
    sampled = _sampled(ref_idx, tokens)
    frame_of = torch.arange(per_group * tokens, device=q.device) // tokens
    # a frame sees all its own tokens and the sampled tokens of every frame of its half
    own = frame_of[:, None] == frame_of[None, :]
    mask = own[None] | sampled.reshape(groups, 1, per_group * tokens)  # [G, F·N, F·N]

    def merge(x):  # [B, H, N, D] -> [G, H, F·N, D]: one sequence per CFG half
        return x.reshape(groups, per_group, heads, tokens, dim).transpose(1, 2).flatten(2, 3)

    out = F.scaled_dot_product_attention(merge(q), merge(k), merge(v), attn_mask=mask[:, None])
    return out.reshape(groups, heads, per_group, tokens, dim).transpose(1, 2).flatten(0, 1)


def official_b(q, k, v, ref_idx, *, groups=1, window=None, bank_k=None, bank_v=None):
    """Variant B: a Python loop over frames, gathering the others' sampled tokens and concatenating."""
    if window is not None or bank_k is not None:
        raise NotImplementedError("official variant B has no window and no bank at op level")
    frames = q.shape[0]
    per_group = frames // groups
    outs = []
    for i in range(frames):
        g0 = (i // per_group) * per_group
        others = [j for j in range(g0, g0 + per_group) if j != i]
        keys = torch.cat([k[i]] + [k[j][:, ref_idx[j]] for j in others], dim=1)
        values = torch.cat([v[i]] + [v[j][:, ref_idx[j]] for j in others], dim=1)
        outs.append(F.scaled_dot_product_attention(q[i], keys, values))
    return torch.stack(outs)


@functools.cache
def _compiled_flex():
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False)


def flex(q, k, v, ref_idx, *, groups=1, window=None, bank_k=None, bank_v=None):
    """FlexAttention over each CFG half's merged sequence, the official-A mask as a ``mask_mod``.

    Its block mask skips work only per 128 x 128 tile, so token sampling saves almost nothing here.
    """
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    if window is not None or bank_k is not None:
        raise NotImplementedError("the flex provider covers the official-A mask (no window, no bank)")
    frames, heads, tokens, dim = q.shape
    per_group = frames // groups
    sampled = _sampled(ref_idx, tokens).reshape(groups, per_group * tokens)

    def mask_mod(b, h, q_idx, kv_idx):
        return (q_idx // tokens == kv_idx // tokens) | sampled[b, kv_idx]

    length = per_group * tokens
    block_mask = create_block_mask(mask_mod, groups, None, length, length, device=q.device)

    def merge(x):  # [B, H, N, D] -> [G, H, F·N, D]
        return x.reshape(groups, per_group, heads, tokens, dim).transpose(1, 2).flatten(2, 3)

    if q.is_cuda:
        out = _compiled_flex()(merge(q), merge(k), merge(v), block_mask=block_mask)
    else:  # eager flex materializes the scores (and warns so): fine at CPU sizes
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            out = flex_attention(merge(q), merge(k), merge(v), block_mask=block_mask)
    return out.reshape(groups, heads, per_group, tokens, dim).transpose(1, 2).flatten(0, 1)


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
    fn = {
        "reference": consistent_attention_reference,
        "official_a": official_a,
        "official_b": official_b,
        "flex": flex,
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
