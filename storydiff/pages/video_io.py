"""Writing frames as GIF and MP4 with diffusers' own exporters, under their final names only when complete.

``diffusers.utils.export_to_gif`` writes with PIL, looping forever. ``export_to_video`` (diffusers 0.42)
writes with imageio's ffmpeg plugin when imageio is installed and otherwise falls back to OpenCV's ``mp4v``
codec; we call it only when imageio and imageio-ffmpeg are both present, so every MP4 is H.264 from the
ffmpeg binary that imageio-ffmpeg ships, whatever else is installed.
"""

from __future__ import annotations

import importlib.util
import os
import warnings
from collections.abc import Sequence
from pathlib import Path

from diffusers.utils import export_to_gif, export_to_video
from PIL import Image

from ..support.atomic import atomic_path

__all__ = ["MP4_PACKAGES", "mp4_available", "write_video"]

# What enables MP4 output: imageio's ffmpeg plugin, and imageio-ffmpeg, which ships an ffmpeg binary in its
# wheel, so no system ffmpeg is needed.
MP4_PACKAGES = ("imageio", "imageio-ffmpeg")


def mp4_available() -> bool:
    """Whether MP4 files can be written: needs ``imageio`` and ``imageio-ffmpeg`` (``MP4_PACKAGES``)."""
    return all(importlib.util.find_spec(m) is not None for m in ("imageio", "imageio_ffmpeg"))


def _write_gif(frames: Sequence[Image.Image], path: Path, fps: float) -> Path:
    # The temporary path keeps the .gif suffix, from which PIL picks the format. diffusers writes
    # loop=0 (loop forever, as a video preview should) and 1000 // fps ms per frame.
    with atomic_path(path) as tmp:
        export_to_gif(list(frames), str(tmp), fps=fps)
    return path


def _write_mp4(frames: Sequence[Image.Image], path: Path, fps: float) -> Path:
    # The temporary path keeps the .mp4 suffix, from which imageio picks ffmpeg and ffmpeg the container.
    # imageio's defaults: libx264, yuv420p (plays everywhere). SVD sizes are multiples of 8, so a macro
    # block of 8 (diffusers' default is 16) never rescales a frame.
    with atomic_path(path) as tmp:
        export_to_video(list(frames), str(tmp), fps=fps, macro_block_size=8)
    return path


def write_video(
    frames: Sequence[Image.Image], out_dir: str | os.PathLike, name: str, fps: float
) -> tuple[Path, Path | None]:
    """Write ``name.gif`` and, when ``mp4_available()``, ``name.mp4``; returns both paths (MP4 or None).

    Files appear under their final names only when complete. Without an MP4 encoder a warning names the
    packages to install and only the GIF is written.
    """
    if not frames:
        raise ValueError("no frames to write")
    if fps <= 0:
        raise ValueError(f"fps must be positive, got {fps}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    frames = [f.convert("RGB") for f in frames]  # the exporters take the mode they are given
    gif = _write_gif(frames, out / f"{name}.gif", fps)
    if not mp4_available():
        warnings.warn(
            # One message for every clip, so Python's default filter shows it once, not per clip.
            f"MP4 not written: it needs the PyPI packages {' and '.join(MP4_PACKAGES)} "
            f"(pip install {' '.join(MP4_PACKAGES)}, or the [video] extra); writing GIF files only",
            RuntimeWarning,
            stacklevel=2,
        )
        return gif, None
    return gif, _write_mp4(frames, out / f"{name}.mp4", fps)
