"""Helpers for the story-run tests: reading a run's frames, killing a run after its first checkpoint,
counting the bytes tensors hold on the CPU (tests that check memory does not grow), recording the latents
frames are decoded from, and the mutations (a wrong bank, a resume from another step) whose twins show that
an equality of latents is sharp (issue 26, item 1)."""

from __future__ import annotations

import weakref
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


class AllocationTracker(TorchDispatchMode):
    """Live and peak bytes of CPU tensor storages created while active (views share their storage)."""

    def __init__(self):
        super().__init__()
        self.refs, self.size, self.live, self.peak = {}, {}, 0, 0

    def _release(self, ptr):
        self.refs[ptr] -= 1
        if self.refs[ptr] == 0:
            self.live -= self.size.pop(ptr)
            del self.refs[ptr]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in tree_flatten(out)[0]:
            if isinstance(tensor, torch.Tensor) and tensor.untyped_storage().data_ptr():
                ptr = tensor.untyped_storage().data_ptr()
                if ptr not in self.refs:
                    self.refs[ptr], self.size[ptr] = 0, tensor.untyped_storage().nbytes()
                    self.live += self.size[ptr]
                    self.peak = max(self.peak, self.live)
                self.refs[ptr] += 1
                weakref.finalize(tensor, self._release, ptr)
        return out


def read_frames(folder: Path) -> list[np.ndarray]:
    """The frames of a story run's output folder, in story order."""
    return [np.asarray(Image.open(p)) for p in sorted((folder / "frames").glob("frame_*.png"))]


# ``python -c KILL_AFTER_FIRST_CHECKPOINT generate ...``: a run killed by SIGKILL (no cleanup, no exception
# handler) right after its first checkpoint is on disk — deterministic, whatever the machine's load.
KILL_AFTER_FIRST_CHECKPOINT = """
import os, signal, sys
import storydiff.runs.lockstep as lockstep
from storydiff.cli import main

save = lockstep.save_checkpoint

def save_then_die(*args, **kwargs):
    save(*args, **kwargs)
    os.kill(os.getpid(), signal.SIGKILL)

lockstep.save_checkpoint = save_then_die
sys.exit(main(sys.argv[1:]))
"""


# -- latents, and mutations that show a comparison of them is sharp (issue 26, item 1) -------------------
# Equality tests compare the latents each frame is decoded from (float, before the VAE and 8-bit PNGs): a
# wrong bank moves a tiny model's PNG by at most a grey level or two, its latents by far more. Each such
# test has a mutation twin (a bank of the previous step, the other rank's bank, rate 0, a resume from
# another step) whose max relative change ``relative_change`` must be at least MIN_RELATIVE_CHANGE.
MIN_RELATIVE_CHANGE = 1e-3


@contextmanager
def recorded_latents():
    """Yield a dict that fills, while active, with {frame index: the latent the frame is decoded from}
    for every story run in this process (``StoryRun.finish``, the one place frames are decoded)."""
    from storydiff.runs.plan import StoryRun

    latents: dict[int, torch.Tensor] = {}
    finish = StoryRun.finish

    def recording_finish(self, frame, latent):
        latents[frame] = latent.detach().to("cpu", torch.float32).clone()
        return finish(self, frame, latent)

    StoryRun.finish = recording_finish
    try:
        yield latents
    finally:
        StoryRun.finish = finish


def stacked(latents: dict[int, torch.Tensor]) -> torch.Tensor:
    """The recorded latents in story order, one row per frame."""
    return torch.stack([latents[i] for i in sorted(latents)])


def relative_change(mutant: torch.Tensor, reference: torch.Tensor) -> float:
    """max |mutant - reference| / max |reference|."""
    return ((mutant - reference).abs().max() / reference.abs().max()).item()


@contextmanager
def bank_of_the_previous_step():
    """Mutation: a read at step s gets the bank written at step s - 1 (the same step's where s - 1 wrote
    none, e.g. the first step after warm-up); lockstep runs keep every step's bank so that it exists."""
    from storydiff.consistency.bank import IdBank

    get, drop_step = IdBank.get, IdBank.drop_step

    def previous_get(self, characters, step, layer, device):
        previous = get(self, characters, step - 1, layer, device)
        return previous if previous is not None else get(self, characters, step, layer, device)

    IdBank.get, IdBank.drop_step = previous_get, lambda self, step, characters: None
    try:
        yield
    finally:
        IdBank.get, IdBank.drop_step = get, drop_step


@contextmanager
def resumed_from_another_step(shift: int = 1):
    """Mutation: a resume restarts the step loop ``shift`` steps away from the checkpoint's own step
    (latents and schedulers as saved): a checkpoint read as if written at another step."""
    import storydiff.runs.lockstep as lockstep

    load = lockstep.load_checkpoint

    def shifted_load(*args, **kwargs):
        data = load(*args, **kwargs)
        return {**data, "step": data["step"] + shift}

    lockstep.load_checkpoint = shifted_load
    try:
        yield
    finally:
        lockstep.load_checkpoint = load


@contextmanager
def banks_swapped(swap: dict[str, str] | None = None):
    """Mutation: a frame showing one character reads another's bank (default Bob <-> Alice; over two
    ranks that deal one character each, the other rank's bank)."""
    from storydiff.consistency.bank import IdBank

    swap = swap if swap is not None else {"Bob": "Alice", "Alice": "Bob"}
    get = IdBank.get

    def swapped_get(self, characters, step, layer, device):
        return get(self, tuple(swap.get(c, c) for c in characters), step, layer, device)

    IdBank.get = swapped_get
    try:
        yield
    finally:
        IdBank.get = get


MUTATIONS = {  # by name, for runs in other processes (tests/dist_helpers.py)
    "previous_step": bank_of_the_previous_step,
    "swapped": banks_swapped,
    "resumed_later": resumed_from_another_step,
}


def merged_latents(folder: Path, world: int) -> torch.Tensor:
    """The latents a run over ``world`` ranks decoded (each rank's ``latents-rank{r}.pt``, written by
    ``dist_helpers.stories_worker``), one row per frame in story order."""
    latents: dict[int, torch.Tensor] = {}
    for rank in range(world):
        part = torch.load(folder / f"latents-rank{rank}.pt")
        assert not set(part) & set(latents), "two ranks decoded the same frame"
        latents.update(part)
    return stacked(latents)


# ``python -c RECORD_LATENTS FOLDER generate ...`` (also as torchrun's command): the CLI, saving the latents
# of the frames this process decodes in FOLDER/latents-rank{RANK}.pt ({frame: latent}, as
# ``dist_helpers.stories_worker`` does; read with ``merged_latents``)
RECORD_LATENTS = """
import os, sys
from pathlib import Path
import torch
from storydiff.cli import main
from storydiff.runs.plan import StoryRun

latents, finish = {}, StoryRun.finish

def recording_finish(self, frame, latent):
    latents[frame] = latent.detach().to("cpu", torch.float32).clone()
    return finish(self, frame, latent)

StoryRun.finish = recording_finish
code = main(sys.argv[2:])
torch.save(latents, Path(sys.argv[1]) / f"latents-rank{os.environ.get('RANK', '0')}.pt")
sys.exit(code)
"""
