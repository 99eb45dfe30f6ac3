"""The baseline the Semantic Motion Predictor must beat: linear interpolation of the endpoint embeddings."""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["interpolation_weights", "linear_interpolation"]


def interpolation_weights(
    num_frames: int, *, device: torch.device | None = None, dtype: torch.dtype | None = None
) -> Tensor:
    """t_i = (i + 1) / (L + 1) for i < L: the L intermediate frames, exclusive of both endpoints."""
    return torch.arange(1, num_frames + 1, device=device, dtype=dtype) / (num_frames + 1)


def linear_interpolation(start: Tensor, end: Tensor, num_frames: int) -> Tensor:
    """Embeddings of ``num_frames`` intermediate frames on the straight line from ``start`` to ``end``.

    Args:
        start, end: (B, T, C) embeddings of the first and last frame (T tokens of C channels each).
        num_frames: L ≥ 1, the number of intermediate frames (endpoints excluded).

    Returns:
        (B, L, T, C): frame i is ``start + t_i · (end − start)`` with t_i = (i + 1) / (L + 1).
    """
    if num_frames < 1:
        raise ValueError(f"num_frames must be >= 1, got {num_frames}")
    if start.shape != end.shape:
        raise ValueError(
            f"start and end must have the same shape, got {tuple(start.shape)} and {tuple(end.shape)}"
        )
    t = interpolation_weights(num_frames, device=start.device, dtype=start.dtype).view(1, num_frames, 1, 1)
    return start.unsqueeze(1) + t * (end - start).unsqueeze(1)
