"""The paper's tiled formulation, composed from the op: overlapping tiles of frames, outputs averaged.

StoryDiffusion's pseudo-code splits the frame axis into windows ("tiles") of ``tile`` consecutive frames;
inside a tile every frame attends to the sampled tokens of the tile's other frames; a frame covered by
several tiles gets the mean of their outputs. The sliding ``window`` argument of ``consistent_attention``
is the cheaper alternative (one attention per frame); this exists for users who want the paper's form.
"""

from __future__ import annotations

import torch

from .api import consistent_attention
from .pool import index_tensor


def tile_starts(num_frames: int, tile: int, stride: int) -> list[int]:
    """Tile start frames: every ``stride`` frames, plus a last tile flush with the end."""
    if num_frames <= tile:
        return [0]
    starts = list(range(0, num_frames - tile + 1, stride))
    if starts[-1] != num_frames - tile:
        starts.append(num_frames - tile)
    return starts


def tiled_consistent_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    ref_idx: torch.Tensor,
    *,
    tile: int,
    stride: int = 1,
    groups: int = 1,
    scale: float | None = None,
    backend: str = "auto",
    check_indices: bool = True,
    precision: str = "native",
) -> torch.Tensor:
    """Tiled consistent attention over each of ``groups`` contiguous groups (e.g. CFG halves).

    Args follow ``consistent_attention``; ``tile`` >= 1 frames per tile, ``stride`` >= 1 frames between
    tile starts (stride < tile makes tiles overlap). ``check_indices`` and ``precision`` are passed on to
    every tile's call: check_indices=False (this library's window mode, whose indices come from the seeded
    sampler) reads no value back on the host, so a step never waits for the GPU; precision="int8" smooths
    each tile's keys by that tile's own mean (one call: the same vector for every key its queries see).
    """
    for name, value in (("tile", tile), ("stride", stride), ("groups", groups)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    if q.shape[0] % groups:
        raise ValueError(f"B % groups must be 0: B={q.shape[0]} frames do not split into groups={groups}")
    per_group = q.shape[0] // groups
    out = torch.zeros_like(q, dtype=torch.promote_types(q.dtype, torch.float32))  # sum tiles in >= fp32
    count = torch.zeros(q.shape[0], device=q.device)
    for start in tile_starts(per_group, tile, stride):
        members = [
            g * per_group + f for g in range(groups) for f in range(start, min(start + tile, per_group))
        ]
        frames = index_tensor(members, q.device)  # pinned and non-blocking: no host sync
        result = consistent_attention(
            q[frames],
            k[frames],
            v[frames],
            ref_idx[frames],
            groups=groups,
            scale=scale,
            backend=backend,
            check_indices=check_indices,
            precision=precision,
        )
        out.index_add_(0, frames, result.to(out.dtype))
        count.index_add_(0, frames, torch.ones(len(frames), device=q.device))
    return (out / count[:, None, None, None]).to(q.dtype)
