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
