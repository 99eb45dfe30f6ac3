"""Step-synchronous denoising: every frame advances one step at a time, a chunk of frames per call.

``LockstepDenoiser`` holds the latents of all frames (host memory: 64 KiB a frame at 1024²) and runs the
denoiser on any chunk of them at a given step, the way the model family's diffusers pipeline does
(``families/``: classifier-free guidance as [uncond; cond] halves, or FLUX's guidance embedding). Each
chunk has its own copy of the scheduler (schedulers keep per-step state). Text conditioning is encoded
when a chunk comes (a few ms against a denoiser step) instead of being kept for every frame; only the last
chunk's is kept, for a chunk that runs several steps in a row. So memory depends on the chunk size, not on
the number of frames. Reference images (``ip_adapter.ReferenceImages``) join a chunk's conditioning the
same way: each frame gets its own characters' images, whatever chunk it is in. Bank mode (both schedules)
and window mode drive it; frame i's starting noise comes from seed i alone, so results never depend on
chunking.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Protocol

import torch

from ..consistency.config import ConsistencyConfig
from ..families.base import Family
from ..families.registry import family_of
from ..models.ip_adapter import ReferenceImages, wants_image_inputs
from ..support.progress import Progress, progress_bar
from .checkpoint import load_checkpoint, save_checkpoint
from .distributed import gather_to_all
from .plan import Checkpointing, RunPlan


class StepHook(Protocol):
    """What a run may wrap around each denoiser call (``cross_attention_masks.AutoSubjectMasks``)."""

    def before(self, frames: list[int], step: int) -> None: ...

    def after(self, frames: list[int], step: int) -> None: ...

    def state_dict(self) -> dict: ...

    def load_state_dict(self, data: dict, device) -> None: ...


class LockstepDenoiser:
    """Latents, timesteps and per-chunk schedulers of frames that are denoised step by step together."""

    def __init__(
        self,
        pipe,
        plan: RunPlan,
        *,
        references: ReferenceImages | None = None,
        step_hook: StepHook | None = None,
    ) -> None:
        """The frames of ``plan`` (its prompts, negatives, seeds, steps, guidance and size: resolved).
        ``step_hook``: told before and after every denoiser call which frames take which step (``step``
        is the one place every mode calls the denoiser: automatic subject masks hook in here)."""
        self.step_hook = step_hook
        settings = plan.settings
        height, width = settings.height, settings.width
        self.pipe, self.prompts, self.negatives = pipe, plan.prompts, plan.negatives
        self.family: Family = family_of(pipe)
        self.family.check_size(height, width)
        self.family.prepare(plan)
        if references is None and wants_image_inputs(pipe):  # an IP-Adapter is loaded: it wants inputs
            references = ReferenceImages.none(pipe, plan.num_frames, self.family.device)
        self.references = references
        self.guidance_scale = settings.guidance_scale
        self.cfg = self.family.uses_cfg_batch(settings.guidance_scale)
        self.height, self.width = height, width
        steps = settings.num_inference_steps
        self.timesteps = self.family.set_timesteps(pipe.scheduler, steps, height, width)
        self.schedulers: dict[tuple[int, ...], object] = {}
        self._saved_schedulers: dict = {}
        shape = self.family.noise_shape(height, width)
        # frame i's starting noise comes from seed i alone: independent of chunking and story length
        seeds = plan.seeds
        noise = torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(s)) for s in seeds])
        self.latents = self.family.initial_latents(noise, height, width).to(self.family.latent_dtype)
        # the last chunk's conditioning: reused while one chunk runs step after step (the stored bank
        # schedule, or a story that fits in one chunk); other chunks encode again (memory stays bounded)
        self._last: tuple[tuple[int, ...], tuple] | None = None

    def _scheduler(self, key: tuple[int, ...]):
        if key not in self.schedulers:
            scheduler = copy.deepcopy(self.pipe.scheduler)
            scheduler.__dict__.update(self._saved_schedulers.get(key, {}))
            self.schedulers[key] = scheduler
        return self.schedulers[key]

    def _conditioning(self, frames: list[int]):
        key = tuple(frames)
        if self._last is None or self._last[0] != key:
            prompts = [self.prompts[i] for i in frames]
            negatives = [self.negatives[i] for i in frames]
            conditioning = self.family.encode_frames(
                frames, prompts, negatives, self.cfg, self.height, self.width
            )
            self._last = key, conditioning
        conditioning = self._last[1]
        if self.references is not None:  # the chunk's characters' reference images (ip_adapter.py)
            # built at every call: their masks may follow subject masks, which change between calls
            size = self.family.image_mask_size(self.height, self.width)
            embeds, masks = self.references.chunk(frames, self.cfg, size)
            conditioning = self.family.with_reference_images(conditioning, embeds, masks)
        return conditioning

    @torch.no_grad()
    def step(self, frames: list[int], step: int) -> None:
        """Advance ``frames`` (story indices, in batch order) by denoising step ``step``."""
        t = self.timesteps[step]
        key = tuple(frames)
        index = torch.tensor(frames)
        latents = self.latents[index].to(self.family.device)
        scheduler = self._scheduler(key)
        if self.step_hook is not None:  # first: it may change what the conditioning reads (subject masks)
            self.step_hook.before(frames, step)
        conditioning = self._conditioning(frames)
        noise = self.family.predict(scheduler, latents, t, conditioning, self.guidance_scale, self.cfg)
        updated = scheduler.step(noise, t, latents, return_dict=False)[0]
        self.latents[index] = updated.to(self.latents.device, self.latents.dtype)
        if self.step_hook is not None:
            self.step_hook.after(frames, step)

    # -- checkpoints ---------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """What a checkpoint keeps: latents, schedulers and the step hook's state (its maps so far)."""
        hook = None if self.step_hook is None else self.step_hook.state_dict()
        return {"latents": self.latents, "schedulers": self.schedulers, "hook": hook}

    def load_state_dict(self, latents: torch.Tensor, schedulers: dict, hook: dict | None = None) -> None:
        self.latents = latents
        self.schedulers, self._saved_schedulers = {}, dict(schedulers)
        if self.step_hook is not None:
            if hook is None:  # the fingerprint differs first; a hand-made file could still lack it
                raise ValueError("the checkpoint keeps no automatic subject masks (written without them)")
            self.step_hook.load_state_dict(hook, self.family.device)


def run_lockstep(
    denoiser: LockstepDenoiser,
    one_step: Callable[[int], None],
    plan: RunPlan,
    consistency: ConsistencyConfig,
    checkpointing: Checkpointing,
    progress: Progress = True,
) -> None:
    """Run ``one_step(step)`` for every step of ``plan`` (it advances every chunk by that step), writing a
    checkpoint every ``checkpointing.every`` steps; with ``checkpointing.resume`` it continues from
    ``checkpointing.path``, which must have been written for the same run (``RunPlan.checkpoint_summary``,
    or the layout a checkpoint from before 0.6 carries)."""
    summary = plan.checkpoint_summary(consistency)
    path, every = checkpointing.path, checkpointing.every
    num_inference_steps = plan.settings.num_inference_steps
    start = 0
    if checkpointing.resume and path is not None and path.exists():
        data = load_checkpoint(path, summary, legacy=plan.legacy_summaries(consistency))
        start = data["step"]
        denoiser.load_state_dict(data["latents"], data["schedulers"], data.get("hook"))
        torch.set_rng_state(data["rng"])
    partition = plan.partition
    if partition.distributed:  # ranks exchange tokens at every step: they must all continue from one step
        steps = gather_to_all(partition, start)
        if len(set(steps)) > 1:
            raise ValueError(
                f"the ranks' checkpoints stop at different steps ({', '.join(map(str, steps))}): they cannot "
                "resume together; start the run again in a new output folder"
            )
    bar = progress_bar(num_inference_steps, "denoising (all frames)", "step", progress, initial=start)
    try:
        for step in range(start, num_inference_steps):
            one_step(step)
            bar.update()
            if path is not None and every and (step + 1) % every == 0:
                save_checkpoint(path, step=step + 1, **denoiser.state_dict(), summary=summary)
    finally:
        bar.close()
