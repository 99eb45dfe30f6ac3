"""Training checkpoints: ``checkpoint-<step>/`` = model (``save_pretrained``) + ``training_state.pt``.

``training_state.pt`` holds what the weights alone cannot restore: optimizer and LR-scheduler state, the
torch RNG states (dropout), the step and the loss history. Each checkpoint is written into a temporary
folder and renamed into place (``support/atomic.py``), so a run killed mid-write never leaves a
checkpoint that looks complete.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path
from typing import Any

import torch

from ..support.atomic import atomic_path
from .model import SemanticMotionPredictor

__all__ = ["STATE_FILE", "latest_checkpoint", "load_checkpoint", "save_checkpoint"]

STATE_FILE = "training_state.pt"
_NAME = re.compile(r"^checkpoint-(\d+)$")


def _checkpoints(out_dir: Path) -> list[tuple[int, Path]]:
    if not out_dir.is_dir():
        return []
    found = []
    for p in out_dir.iterdir():
        match = _NAME.match(p.name)
        # A folder without the state file is not a checkpoint (renaming is the last step of writing one).
        if match and (p / STATE_FILE).is_file():
            found.append((int(match.group(1)), p))
    return sorted(found)


def latest_checkpoint(out_dir: str | Path) -> Path | None:
    """The complete checkpoint with the highest step under ``out_dir``, or None."""
    found = _checkpoints(Path(out_dir))
    return found[-1][1] if found else None


def save_checkpoint(
    out_dir: str | Path,
    step: int,
    model: SemanticMotionPredictor,
    state: dict[str, Any],
    *,
    keep_last: int | None = 3,
) -> Path:
    """Atomically write ``out_dir/checkpoint-<step>/``; then drop all but the newest ``keep_last``."""
    out = Path(out_dir)
    final = out / f"checkpoint-{step}"
    # The folder is renamed into place complete; a re-run reaching the same step replaces the old one.
    with atomic_path(final) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        torch.save(state, tmp / STATE_FILE)
    if keep_last is not None:
        for _, old in _checkpoints(out)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def load_checkpoint(path: str | Path) -> tuple[SemanticMotionPredictor, dict[str, Any]]:
    """The model and the training state saved in one checkpoint folder."""
    path = Path(path)
    # low_cpu_mem_usage=False: the model is small, and without accelerate diffusers would log a warning.
    model = SemanticMotionPredictor.from_pretrained(path, low_cpu_mem_usage=False)
    # weights_only: the state is tensors, numbers, strings and containers of them — nothing to unpickle.
    state = torch.load(path / STATE_FILE, map_location="cpu", weights_only=True)
    return model, state
