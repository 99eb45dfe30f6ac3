"""Seeded sampling of the reference tokens each frame offers to the others."""

from __future__ import annotations

import torch

from .pool import to_device_async


def sample_reference_indices(
    num_frames: int,
    num_tokens: int,
    rate: float,
    *,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Draw ``round(rate * num_tokens)`` token positions per frame, without replacement.

    Args:
        num_frames: frames B (>= 1).
        num_tokens: tokens per frame N (>= 1).
        rate: fraction of each frame's tokens offered as references, in [0, 1].
        generator: seeded ``torch.Generator`` for reproducible draws; the draw happens on its device.
        device: where the result lives (default: the generator's device, else CPU).

    Returns:
        (num_frames, S) int64, each row sorted ascending. A fixed S (instead of the official
        Bernoulli draw, which has the same expected size) keeps shapes static for torch.compile.
    """
    if isinstance(num_frames, bool) or not isinstance(num_frames, int) or num_frames < 1:
        raise ValueError(f"num_frames must be an int >= 1, got {num_frames!r}")
    if isinstance(num_tokens, bool) or not isinstance(num_tokens, int) or num_tokens < 1:
        raise ValueError(f"num_tokens must be an int >= 1, got {num_tokens!r}")
    if not isinstance(rate, (int, float)) or not 0.0 <= float(rate) <= 1.0:
        raise ValueError(f"rate must be a number in [0, 1], got {rate!r}")
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
    num_refs = round(rate * num_tokens)
    draw_device = generator.device if generator is not None else (device or "cpu")
    # Random keys + argsort = a uniform random permutation per row, vectorized over frames.
    keys = torch.rand(num_frames, num_tokens, generator=generator, device=draw_device)
    idx = keys.argsort(dim=1)[:, :num_refs].sort(dim=1).values
    return to_device_async(idx, device) if device is not None else idx  # CPU draws: pinned, non-blocking


def masked_sample_counts(num_tokens: int, rate: float, background_share: float) -> tuple[int, int]:
    """(inside, outside): how many of a frame's ``round(rate * num_tokens)`` draws
    ``sample_masked_reference_indices`` takes from its subject mask and from the rest of the frame."""
    count = round(rate * num_tokens)
    outside = round(background_share * count)
    return count - outside, outside


def sample_masked_reference_indices(
    masks: torch.Tensor,
    rate: float,
    background_share: float = 0.0,
    *,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Draw each frame's ``S = round(rate * N)`` reference tokens from its subject mask.

    Args:
        masks: (B, N) bool, a frame's subject tokens (the tokens of the characters it shows).
        rate: fraction of each frame's tokens offered as references, in [0, 1]: S is the same as
            ``sample_reference_indices``'s, so every shape downstream stays what it is without masks.
        background_share: fraction of the S draws taken from outside the mask, in [0, 1]:
            ``round(background_share * S)`` of them exactly (``masked_sample_counts``), the rest inside.
            Default 0.0: only subject tokens are offered — the point of masking (ConsiStory's subject-driven
            sharing), since borrowed background tokens pull every frame towards one scene; a small share
            (0.1) keeps some shared style and lighting at a little layout leakage. When the background
            holds fewer tokens than its share, the rest is taken inside.
        generator: seeded ``torch.Generator``; the draw happens on its device (CPU without one).

    Returns:
        (B, S) int64 token positions, each row sorted ascending, without repeats. A row whose mask holds
        fewer tokens than its inside share (an empty mask) is drawn uniformly from all N tokens instead,
        exactly as ``sample_reference_indices`` would draw it from the same generator state; the caller
        tells which rows those were by comparing ``masks.sum(1)`` with ``masked_sample_counts``.

    One (B, N) draw of uniform keys serves every row: a token's key decides its rank inside the mask,
    outside it and among all tokens, so an all-True mask with share 0 gives ``sample_reference_indices``'s
    draw exactly.
    """
    if not isinstance(masks, torch.Tensor) or masks.dtype != torch.bool or masks.ndim != 2:
        raise ValueError(f"masks must be a (B, N) bool tensor, got {getattr(masks, 'dtype', type(masks))}")
    num_frames, num_tokens = masks.shape
    if num_frames < 1 or num_tokens < 1:
        raise ValueError(f"masks must hold >= 1 frame of >= 1 token, got shape {tuple(masks.shape)}")
    if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not 0.0 <= float(rate) <= 1.0:
        raise ValueError(f"rate must be a number in [0, 1], got {rate!r}")
    share = background_share
    if isinstance(share, bool) or not isinstance(share, (int, float)) or not 0.0 <= float(share) <= 1.0:
        raise ValueError(f"background_share must be a number in [0, 1], got {share!r}")
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
    count = round(rate * num_tokens)
    draw_device = generator.device if generator is not None else torch.device("cpu")
    keys = torch.rand(num_frames, num_tokens, generator=generator, device=draw_device)
    masks = masks.to(draw_device)
    _, outside_n = masked_sample_counts(num_tokens, rate, share)
    background = (~masks).sum(1)
    # a background smaller than its share gives the rest of its draws to the subject
    outside = torch.clamp(background, max=outside_n)
    inside = count - outside
    fallback = masks.sum(1) < inside
    inf = torch.tensor(float("inf"), device=draw_device)
    # rank of each token among the subject tokens, then among the background tokens (ties impossible:
    # the masked-out tokens all sort last)
    in_order = torch.where(masks, keys, inf).argsort(dim=1)
    out_order = torch.where(masks, inf, keys).argsort(dim=1)
    uniform = keys.argsort(dim=1)[:, :count]
    take = torch.arange(count, device=draw_device)[None, :]  # [1, S]
    # draw j < inside[b]: the j-th subject token; else the (j - inside[b])-th background token
    from_inside = in_order.gather(1, torch.clamp(take, max=num_tokens - 1).expand(num_frames, -1))
    from_outside = out_order.gather(1, torch.clamp(take - inside[:, None], min=0, max=num_tokens - 1))
    picked = torch.where(take < inside[:, None], from_inside, from_outside)
    picked = torch.where(fallback[:, None], uniform, picked)
    return picked.sort(dim=1).values
