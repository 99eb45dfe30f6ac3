"""Checkpoints of a step-synchronous run: latents, scheduler state, the step, the RNG, and what run it is.

In a lockstep run (window mode, the lockstep bank schedule) nothing but these crosses a step boundary, so
a run killed between steps resumes to exactly the frames an uninterrupted run makes. A checkpoint carries
a fingerprint of the run (prompts, seeds, settings, consistency config, model); resuming a different run
is refused, naming what differs.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from pathlib import Path

import torch

from ..support.atomic import atomic_path

CHECKPOINT = "checkpoint.pt"
CHECKPOINT_FORMAT = "storydiff-lockstep-v2"


def checkpoint_name(partition) -> str:
    """The checkpoint file of one process: ``checkpoint.pt``, or one per rank of a distributed run."""
    if partition.distributed:
        return f"checkpoint-rank{partition.rank}-of-{partition.world}.pt"
    return CHECKPOINT


def fingerprint(summary: dict) -> str:
    return hashlib.sha256(json.dumps(summary, sort_keys=True, default=str).encode()).hexdigest()


def save_checkpoint(
    path: Path, *, step: int, latents: torch.Tensor, schedulers: dict, summary: dict, hook: dict | None = None
) -> None:
    """``schedulers``: chunk key -> scheduler; their state (minus the config) is saved. ``hook``: what the
    run's step hook keeps across steps (automatic subject masks' maps), or None."""
    with atomic_path(path) as tmp:  # a kill during the write leaves the previous checkpoint intact
        torch.save(
            {
                "format": CHECKPOINT_FORMAT,
                "step": step,
                "latents": latents,
                "schedulers": {
                    key: {k: v for k, v in vars(s).items() if k != "_internal_dict"}
                    for key, s in schedulers.items()
                },
                "rng": torch.get_rng_state(),
                "hook": hook,
                "fingerprint": fingerprint(summary),
                "summary": summary,
            },
            tmp,
        )


def load_checkpoint(path: Path, summary: dict, legacy: Sequence[dict] = ()) -> dict:
    """Read and check a checkpoint; ValueError (never silently wrong frames) if corrupt or for another run.
    ``legacy``: the same run's summary in the layouts older versions wrote, also accepted."""
    try:
        data = torch.load(path, map_location="cpu", weights_only=False)  # our own file: holds scheduler state
    except Exception as exc:
        raise ValueError(f"corrupt checkpoint {path}: {type(exc).__name__}: {exc}") from exc
    if not isinstance(data, dict) or data.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"corrupt checkpoint {path}: not a {CHECKPOINT_FORMAT} file")
    if data["fingerprint"] not in {fingerprint(s) for s in (summary, *legacy)}:
        stored = data.get("summary", {})
        # name what differs against the layout the checkpoint was written in
        closest = next((s for s in (summary, *legacy) if set(s) == set(stored)), summary)
        differing = sorted(k for k in set(stored) | set(closest) if stored.get(k) != closest.get(k))
        raise ValueError(
            f"checkpoint {path} was written for a different run (differs in: "
            f"{', '.join(differing) or 'prompts'}); resume with the same story, model and settings, "
            "or start a new output folder"
        )
    return data
