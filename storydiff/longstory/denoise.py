"""The long-story loop: all frames step together, chunk by chunk, swept forward and backward."""

from __future__ import annotations

from pathlib import Path

import torch

from ..distributed import HaloExchange, Partition, check_frames_per_rank
from ..families import family_of
from ..ip_adapter import ReferenceImages
from ..lockstep import LockstepDenoiser, run_lockstep
from ..progress import Progress
from ..state import ConsistencyState
from .window import WindowMode


def chunk_order(num_frames: int, chunk_size: int, step: int) -> list[tuple[int, int]]:
    """Chunks [start, stop) in sweep order: forward on even steps, backward on odd ones."""
    chunks = [(a, min(a + chunk_size, num_frames)) for a in range(0, num_frames, chunk_size)]
    return chunks if step % 2 == 0 else chunks[::-1]


def denoise_long_story(
    pipe,
    state: ConsistencyState,
    *,
    prompts: list[str],
    negatives: list[str],
    active: list[bool],
    seeds: list[int],
    num_inference_steps: int,
    guidance_scale: float,
    height: int | None,
    width: int | None,
    chunk_size: int,
    checkpoint_path: Path | None = None,
    checkpoint_every: int | None = None,
    resume: bool = False,
    run_summary: dict | None = None,
    progress: Progress = True,
    partition: Partition | None = None,
    stats: dict | None = None,
    references: ReferenceImages | None = None,
) -> torch.Tensor:
    """Denoise every frame in window mode; returns the final latents (host memory), story order.

    ``active[i]``: frame i shows a character (takes part in consistency). With ``checkpoint_path``, a
    checkpoint is written every ``checkpoint_every`` steps and ``resume=True`` continues from it.
    ``partition`` (several processes): only this rank's block of frames is denoised, as one batch in step
    with the other ranks (``distributed.py``); only its latents are final. ``stats`` (a dict) receives
    ``halo_bytes_sent``, this rank's traffic. ``references``: reference images per character
    (``ip_adapter.ReferenceImages``), for a pipeline with an IP-Adapter.
    """
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be an int >= 1, got {chunk_size!r}")
    default_side = family_of(pipe).default_size
    height, width = height or default_side, width or default_side
    num_frames = len(prompts)
    summary = {
        **(run_summary or {}),
        "prompts": prompts,
        "negatives": negatives,
        "seeds": seeds,
        "steps": num_inference_steps,
        "guidance": guidance_scale,
        "height": height,
        "width": width,
        "chunk_size": chunk_size,
        "consistency": state.config.to_dict(),
    }
    denoiser = LockstepDenoiser(
        pipe,
        prompts=prompts,
        negatives=negatives,
        seeds=seeds,
        num_inference_steps=num_inference_steps,
        guidance_scale=guidance_scale,
        height=height,
        width=width,
        references=references,
    )
    partition = partition or Partition()
    halo = None
    if partition.distributed:
        window = state.config.window or 0
        check_frames_per_rank(partition, num_frames, window)
        block = partition.block(num_frames)
        if chunk_size < block[1] - block[0]:
            raise ValueError(
                f"over {partition.world} ranks each rank denoises its block of up to {block[1] - block[0]} "
                f"frames as one batch: chunk_size must be at least that, got {chunk_size} (or use more ranks)"
            )
        halo = HaloExchange(partition, active, window)
        summary.update(world_size=partition.world, rank=partition.rank)
    mode = WindowMode(active, window=state.config.window, tile=state.config.tile, halo=halo)

    def chunks(step: int) -> list[tuple[int, int]]:
        if partition.distributed:
            return [partition.block(num_frames)]
        return chunk_order(num_frames, chunk_size, step)

    def one_step(step: int) -> None:
        state.set_step(step)
        for a, b in chunks(step):
            mode.begin_chunk(a, b)
            denoiser.step(list(range(a, b)), step)
            mode.end_chunk()

    state.begin(mode)
    try:
        run_lockstep(
            denoiser,
            one_step,
            num_inference_steps=num_inference_steps,
            checkpoint_path=checkpoint_path,
            checkpoint_every=checkpoint_every,
            summary=summary,
            resume=resume,
            progress=progress,
        )
    finally:
        state.end()
    if stats is not None and halo is not None:
        stats["halo_bytes_sent"] = halo.bytes_sent
    return denoiser.latents
