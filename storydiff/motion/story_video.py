"""A whole story as video: one transition clip per pair of consecutive story frames, and the story video.

``story_transitions`` reads the frames of a story folder (``read_story_frames``), runs the transition
pipeline (``transition.TransitionVideoPipeline``) from each frame to the next, writes every clip as soon as
it is done, then concatenates the clips into one story video and records what was made in ``video.json``.
"""

from __future__ import annotations

import itertools
import os
import re
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch import Tensor

from ..families.svd import SVDPipeline
from ..pages.record import METADATA, RecordError, read_record
from ..pages.video_io import write_video
from ..support.atomic import write_json
from ..support.compat import progress_bar_config
from ..support.progress import Progress, progress_bar
from .transition import TransitionResult, TransitionVideoPipeline

__all__ = ["StoryVideoResult", "read_story_frames", "story_transitions"]


@dataclass
class StoryVideoResult:
    """Transitions between consecutive story frames and the concatenated story video."""

    frame_paths: list[Path]
    transitions: list[TransitionResult]
    frames: list[Image.Image]
    gif_path: Path
    mp4_path: Path | None
    metadata: dict = field(default_factory=dict)


def _natural_key(path: Path) -> list[Any]:
    # frame_1000 must come after frame_999, which a plain string sort gets wrong.
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", path.name)]


def read_story_frames(story_dir: str | os.PathLike) -> list[Path]:
    """The frame images of a story, in story order.

    Either a ``storydiff generate`` folder (``frames/frame_000.png ...`` and ``metadata.json``) or a plain
    folder of PNGs, sorted by name (numbers in names compare as numbers). Raises ``FileNotFoundError`` for a
    missing folder and ``ValueError`` for fewer than 2 frames; warns when the story run did not complete or
    its ``metadata.json`` cannot be read.
    """
    root = Path(story_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"story folder {root} does not exist")
    frames_dir = root / "frames"
    source = frames_dir if frames_dir.is_dir() else root
    paths = sorted((p for p in source.glob("*.png") if not p.name.startswith(".")), key=_natural_key)
    if len(paths) < 2:
        raise ValueError(
            f"{source} holds {len(paths)} PNG frame(s); a transition video needs at least 2 frames"
        )
    if (root / METADATA).is_file():
        try:
            status = read_record(root).status
        except RecordError as exc:
            status, reason = "unreadable", f"{exc}; "
        else:
            reason = f"story run in {root} has status {status!r}; "
        if status not in (None, "complete"):
            warnings.warn(f"{reason}using the {len(paths)} frames present", RuntimeWarning, stacklevel=2)
    return paths


@contextmanager
def _labelled_bar(svd_pipe: SVDPipeline, label: str | None) -> Iterator[None]:
    """SVD's denoising bar labelled ``label`` for one clip, or off for ``None``; the pipeline's own bar
    settings are restored afterwards, also on error."""
    saved = progress_bar_config(svd_pipe)
    svd_pipe.set_progress_bar_config(**{**saved, "desc": label, "disable": label is None})
    try:
        yield
    finally:
        svd_pipe.set_progress_bar_config(**saved)


def story_transitions(
    story_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    svd_pipe: SVDPipeline,
    predictor: torch.nn.Module | None = None,
    *,
    seed: int = 0,
    fps: int = 7,
    progress: Progress = True,
    **kwargs: Any,
) -> StoryVideoResult:
    """Chain transition clips between consecutive story frames; write each clip and one story video.

    Transition i goes from frame i to frame i+1 with seed ``seed + i`` and is written to
    ``out_dir/transition_{i:03d}.gif`` (and ``.mp4``) before the next one starts, so an interrupted run keeps
    its finished clips. ``story.gif`` / ``story.mp4`` concatenate them without repeating a story frame: each
    clip but the last drops its final frame, which only approaches the next story frame, while the next
    clip's first frame is conditioned on that frame itself. ``video.json`` records the settings and files.

    ``progress`` (``storydiff.support.progress``): True or "bar" labels SVD's denoising bar of clip i of N
    "clip i/N"; "lines" prints one plain line per finished clip instead ("transitions: clip i/N done"),
    for logs; False shows neither. Other keyword arguments go to ``TransitionVideoPipeline.__call__``.
    """
    paths = read_story_frames(story_dir)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    pipeline = TransitionVideoPipeline(svd_pipe, predictor)
    started = time.perf_counter()
    transitions: list[TransitionResult] = []
    count = len(paths) - 1
    bars = progress is True or progress == "bar"
    lines = progress_bar(count, "transitions", "clip", progress) if progress == "lines" else None
    for i, (a, b) in enumerate(itertools.pairwise(paths)):
        name = f"transition_{i:03d}"
        with _labelled_bar(svd_pipe, f"clip {i + 1}/{count}" if bars else None):
            transitions.append(pipeline(a, b, seed=seed + i, fps=fps, out_dir=out, name=name, **kwargs))
        if lines is not None:
            lines.set_postfix_str(f"{a.name} → {b.name}")
            lines.update()
    frames = [f for t in transitions[:-1] for f in t.frames[:-1]] + transitions[-1].frames
    gif, mp4 = write_video(frames, out, "story", fps)
    metadata = {
        "story_dir": str(Path(story_dir)),
        "frames": [str(p) for p in paths],
        "transitions": [
            {
                "from": str(a),
                "to": str(b),
                "seed": seed + i,
                "gif": str(t.gif_path),
                "mp4": str(t.mp4_path) if t.mp4_path else None,
            }
            for i, (a, b, t) in enumerate(zip(paths[:-1], paths[1:], transitions, strict=True))
        ],
        "story_gif": str(gif),
        "story_mp4": str(mp4) if mp4 else None,
        "predictor": type(predictor).__name__ if predictor is not None else "linear_interpolation",
        "frames_per_clip": len(transitions[0].frames),
        "settings": {
            "seed": seed,
            "fps": fps,
            **{k: v for k, v in kwargs.items() if not isinstance(v, Tensor)},
        },
        "seconds": round(time.perf_counter() - started, 2),
    }
    write_json(out / "video.json", metadata)
    return StoryVideoResult(paths, transitions, frames, gif, mp4, metadata)
