"""Helpers for the story-run tests: reading a run's frames, killing a run after its first checkpoint, and
counting the bytes tensors hold on the CPU (tests that check memory does not grow)."""

from __future__ import annotations

import weakref
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
