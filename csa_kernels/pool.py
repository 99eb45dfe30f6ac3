"""The reference pool: every frame's sampled K/V rows, gathered once per call.

Because K/V are per-token projections, a sampled token's key is just a row of its frame's K. Gathering
those rows once into a small contiguous pool lets each frame attend to [own K/V] plus a contiguous slice
of the pool, without per-frame concatenation, masks or re-projection.
"""

from __future__ import annotations

import torch


def gather_reference_pool(x: torch.Tensor, ref_idx: torch.Tensor) -> torch.Tensor:
    """(B, H, N, D) keys or values → (B, S, H, D) contiguous pool.

    Frame j's sampled token s sits at row j·S + s of the (B·S, H, D) view, so the pool tokens of a run
    of consecutive frames form one contiguous block of rows.
    """
    num_frames = x.shape[0]
    frames = torch.arange(num_frames, device=x.device)[:, None]
    return x.transpose(1, 2)[frames, ref_idx]  # advanced indexing → fresh contiguous (B, S, H, D)


def new_output(q: torch.Tensor) -> torch.Tensor:
    """The kernel's output buffer: q's memory layout when its last dim is contiguous (e.g. diffusers'
    (B, N, H, D) view), else contiguous. Shared by the Triton launcher and the op's fake implementation so
    strides always agree; it lives here, not in triton_kernel.py, so the fake needs no Triton."""
    return torch.empty_like(q) if q.stride(-1) == 1 else torch.empty(q.shape, dtype=q.dtype, device=q.device)


def visible_frame_range(frame: int, num_frames: int, groups: int, window: int | None) -> tuple[int, int]:
    """[lo, hi): the frames whose pool tokens ``frame`` may see are lo..hi-1 except ``frame`` itself."""
    per_group = num_frames // groups
    start = (frame // per_group) * per_group
    if window is None:
        return start, start + per_group
    return max(start, frame - window), min(start + per_group, frame + window + 1)


def to_device_async(t: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """A small host tensor (indices drawn or computed on the CPU) on ``device`` without a host sync: on
    CUDA it goes through pinned memory with a non-blocking copy (a pageable copy would wait for the GPU).
    The one way this library moves indices to a device (sampler draws, row sets, tiles, pool ranges)."""
    device = torch.device(device)
    if device.type != "cuda" or t.device.type != "cpu":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)


def index_tensor(values: list[int] | list[tuple[int, ...]], device: torch.device | str) -> torch.Tensor:
    """``torch.tensor(values)`` (int64; a list of ints, or of equal-length tuples for a 2-D table) on
    ``device``, copied without a host sync."""
    return to_device_async(torch.tensor(values, dtype=torch.int64), device)
