"""Window mode's run (long stories): all frames step together, chunk by chunk, swept forward and backward;
sliding-window consistency with memory-bounded, chunked denoising and resume.

The attention mode is ``consistency/window.py``; the step-synchronous denoiser this loop drives is
``runs/lockstep.py``, its checkpoints ``runs/checkpoint.py``.

The scheme (what ``storydiff generate --mode window`` runs):

* All frames advance together, one denoising step at a time; the UNet sees one chunk of ``chunk_size``
  consecutive frames at a time. The latents of the frames not in the UNet wait in host memory (64 KiB a
  frame at 1024²), their text conditioning is encoded again when their chunk comes, and every chunk has
  its own copy of the scheduler (schedulers keep per-step state). So GPU memory depends on the chunk size
  and the window, not on the story length.
* Consistency: in every consistent layer a frame that shows a character attends to its own tokens plus the
  sampled tokens (K/V, drawn per step, level and frame) of the frames within ``window`` of it that also
  show one ([NC] frames neither read nor offer tokens).
* Chunk boundaries: a chunk sees a neighbour outside it only if that neighbour's chunk was already computed
  at the current step; its sampled K/V wait in a cache that holds just the current step and just the frames
  some pending frame can still read (at most ``window`` frames per boundary). A neighbour not yet computed
  at this step is not seen at all: nothing from the previous step is kept, so no state crosses a step
  boundary and a checkpoint needs only latents and scheduler state. To keep the missing side from always
  being the same, the chunks are swept forward on even steps and backward on odd steps, so each boundary
  frame sees both sides on alternate steps.
* Key property (tested): with ``chunk_size >= frames`` there is one chunk per step and the computation is
  exactly the unchunked one.
* Resume: every ``checkpoint_every`` steps the latents, the schedulers, the step and the RNG state are
  written atomically to ``checkpoint.pt`` with a fingerprint of the run (prompts, seeds, settings, config,
  model); a resumed run checks the fingerprint and continues from the last checkpoint, producing the frames
  an uninterrupted run would. Frames are decoded and written one by one after the last step.
"""

from __future__ import annotations

import dataclasses

import torch

from ..consistency.state import ConsistencyState
from ..consistency.window import WindowMode
from ..families.registry import family_of
from ..models.ip_adapter import ReferenceImages
from ..support.progress import Progress, progress_bar
from .distributed import HaloExchange, check_frames_per_rank
from .lockstep import LockstepDenoiser, StepHook, run_lockstep
from .plan import Checkpointing, RunPlan, StoryRun


def chunk_order(num_frames: int, chunk_size: int, step: int) -> list[tuple[int, int]]:
    """Chunks [start, stop) in sweep order: forward on even steps, backward on odd ones."""
    chunks = [(a, min(a + chunk_size, num_frames)) for a in range(0, num_frames, chunk_size)]
    return chunks if step % 2 == 0 else chunks[::-1]


def run_window(
    pipe,
    state: ConsistencyState,
    plan: RunPlan,
    *,
    checkpointing: Checkpointing | None = None,
    references: ReferenceImages | None = None,
    progress: Progress = True,
    stats: dict | None = None,
    step_hook: StepHook | None = None,
) -> torch.Tensor:
    """Denoise every frame of ``plan`` in window mode; returns the final latents (host memory), story order.

    ``plan.active[i]``: frame i shows a character (takes part in consistency); ``plan.settings.chunk_size``
    frames go through the denoiser at a time. ``checkpointing``: a checkpoint is written every ``every``
    steps to ``path``, and ``resume`` continues from it. Over several processes (``plan.partition``) only
    this rank's block of frames is denoised, as one batch in step with the other ranks
    (``distributed.py``); only its latents are final. ``stats`` (a dict) receives ``halo_bytes_sent``, this
    rank's traffic. ``references``: reference images per character (``ip_adapter.ReferenceImages``), for a
    pipeline with an IP-Adapter. ``step_hook``: wrapped around every denoiser call (automatic subject
    masks: ``LockstepDenoiser``).
    """
    settings = plan.settings
    chunk_size = settings.chunk_size
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be an int >= 1, got {chunk_size!r}")
    default_side = family_of(pipe).default_size
    if settings.height is None or settings.width is None:
        settings = settings.replace(
            height=settings.height or default_side, width=settings.width or default_side
        )
        plan = dataclasses.replace(plan, settings=settings)
    checkpointing = checkpointing or Checkpointing()
    num_frames, partition, active = plan.num_frames, plan.partition, plan.active
    denoiser = LockstepDenoiser(pipe, plan, references=references, step_hook=step_hook)
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
        run_lockstep(denoiser, one_step, plan, state.config, checkpointing, progress)
    finally:
        state.end()
    if stats is not None and halo is not None:
        stats["halo_bytes_sent"] = halo.bytes_sent
    return denoiser.latents


def run_story_window(run: StoryRun) -> dict:
    """Window mode for a story: denoise, then decode and save this rank's frames. Returns this rank's
    traffic ({"halo_bytes_sent": n} over several ranks, else {})."""
    plan, stats = run.plan, {}
    latents = run_window(
        run.family.pipe,
        run.state,
        plan,
        checkpointing=run.checkpointing,
        references=run.references,
        progress=run.progress,
        stats=stats,
        step_hook=run.step_hook,
    )
    start, stop = plan.partition.block(plan.num_frames)
    bar = progress_bar(stop - start, "decoding frames", "frame", run.progress)
    for index in range(start, stop):
        run.finish(index, latents[index])
        bar.update()
    bar.close()
    return stats
