"""Bank mode's run (as the official code): for each character, its identity frames (its first solo frames)
are denoised together and every consistent layer banks their sampled K/V per step; then every other frame
attends to its own tokens plus the banks of the characters it shows, ``read_batch_size`` frames per
denoiser call, whatever characters they show.

Both schedules go through one step-synchronous denoiser, so a chunk's frames are the same whatever the
schedule: "stored" runs each chunk through all steps in turn (every step's bank kept), "lockstep" advances
all chunks one step at a time (one step's bank alive). Over several ranks each reads its contiguous share of
the read batches (``RunPlan.read_batches``: the single-process batches, so every frame is bit-identical to
one process), and each character's bank is written by the rank its identity frames were dealt to and
broadcast ("broadcast"), or by every rank ("recompute", no traffic).
"""

from __future__ import annotations

import copy
from collections.abc import Callable

from ..consistency.modes import JointMode
from ..consistency.state import ConsistencyState
from ..families.base import Family
from ..support.progress import progress_bar
from .distributed import bank_owners, share_banks
from .lockstep import LockstepDenoiser, run_lockstep
from .plan import StoryRun
from .settings import RunSettings


def bank_signature(family: Family, state: ConsistencyState, settings: RunSettings) -> dict:
    """What a bank written by a run with ``settings`` records, and what a bank read by it must match."""
    scheduler = copy.deepcopy(family.pipe.scheduler)
    side = family.default_size  # FLUX's sigmas shift with the image size
    height, width = settings.height or side, settings.width or side
    timesteps = family.set_timesteps(scheduler, settings.num_inference_steps, height, width)
    return {
        **state.host,
        "num_inference_steps": settings.num_inference_steps,
        "timesteps": [round(float(t), 4) for t in timesteps],
        "cfg_groups": 2 if family.uses_cfg_batch(settings.guidance_scale) else 1,
    }


def run_bank(run: StoryRun, bank_metadata: Callable[[str], dict]) -> dict:
    """Bank mode; ``bank_metadata(name)``: what character ``name``'s bank records (description, model,
    signature). Returns this rank's traffic ({"bank_bytes_received": n} over several ranks, else {})."""
    plan, state = run.plan, run.state
    settings, partition = plan.settings, plan.partition
    identity = plan.identity
    identity_set = {i for frames in identity.values() for i in frames}
    reads = plan.read_batches()
    denoiser = LockstepDenoiser(run.family.pipe, plan, references=run.references, step_hook=run.step_hook)
    steps = settings.num_inference_steps
    owners = bank_owners(partition, list(identity), settings.bank_sharing)
    owned = {i for name, frames in identity.items() if owners[name] == partition.rank for i in frames}
    # "broadcast": a rank denoises only the identity frames of its characters and receives the other banks
    broadcast = partition.distributed and settings.bank_sharing == "broadcast"
    writing = {
        name: frames for name, frames in identity.items() if owners[name] == partition.rank or not broadcast
    }
    frame_characters = [frame.characters for frame in plan.story.frames]

    def write(name: str, frames: list[int], step: int) -> None:
        state.begin(JointMode(len(frames), writing=name), step=step, frames=frames)  # masks: per story frame
        denoiser.step(frames, step)

    def read(frames: list[int], step: int) -> None:
        state.begin_read([frame_characters[i] for i in frames], step=step, frames=frames)
        denoiser.step(frames, step)

    def finish(frames: list[int]) -> None:
        for i in frames:
            if i in identity_set and i not in owned:  # recomputed here, another rank's to decode
                continue
            run.finish(i, denoiser.latents[i])

    for name in identity:
        # also on resume: a lockstep run's bank holds one step, written again at the next step
        state.bank.start(name)
        state.bank.set_metadata(name, **bank_metadata(name))
    received = 0
    if settings.bank_schedule == "stored":
        made = sum(map(len, writing.values())) + sum(map(len, reads))  # the frames this rank denoises
        bar = progress_bar(made, "story frames", "frame", run.progress)
        for name, frames in writing.items():
            bar.set_postfix_str(f"identity of {name}")
            for step in range(steps):
                write(name, frames, step)
            finish(frames)
            bar.update(len(frames))
        if broadcast:
            received = share_banks(partition, state.bank, owners, segments=state.bank_segments)
        if settings.save_banks and run.output is not None and partition.leader:
            for name in identity:
                state.bank.save(name, run.output.bank_path(name))
        bar.set_postfix_str("story frames")
        for frames in reads:
            for step in range(steps):
                read(frames, step)
            finish(frames)
            bar.update(len(frames))
        bar.close()
        return {"bank_bytes_received": received} if broadcast else {}

    def one_step(step: int) -> None:
        nonlocal received
        for name, frames in writing.items():
            write(name, frames, step)
        if broadcast:
            received += share_banks(partition, state.bank, owners, step, state.bank_segments)
        for frames in reads:
            read(frames, step)
        state.bank.drop_step(step, identity)  # read by everyone: free it

    run_lockstep(denoiser, one_step, plan, state.config, run.checkpointing, run.progress)
    finish(sorted(identity_set) + [i for frames in reads for i in frames])
    return {"bank_bytes_received": received} if broadcast else {}
