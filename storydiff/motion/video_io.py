"""Writing frames as GIF (PIL) and MP4 (imageio with imageio-ffmpeg's bundled ffmpeg, when installed)."""

from __future__ import annotations

import importlib.util
import os
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

# What enables MP4 output: imageio's ffmpeg plugin, and imageio-ffmpeg, which ships an ffmpeg binary in its
# wheel, so no system ffmpeg is needed.
MP4_PACKAGES = ("imageio", "imageio-ffmpeg")


def mp4_available() -> bool:
    """Whether MP4 files can be written: needs ``imageio`` and ``imageio-ffmpeg`` (``MP4_PACKAGES``)."""
    return all(importlib.util.find_spec(m) is not None for m in ("imageio", "imageio_ffmpeg"))


def _temp_path(path: Path) -> Path:
    # Same suffix, because ffmpeg picks the container from it.
    return path.with_name(f".{path.stem}.tmp{path.suffix}")


def _write_gif(frames: Sequence[Image.Image], path: Path, fps: float) -> Path:
    tmp = _temp_path(path)
    first, *rest = [f.convert("RGB") for f in frames]
    # GIF stores frame durations in 10 ms units; loop=0 loops forever, as a video preview should.
    first.save(tmp, format="GIF", save_all=True, append_images=rest, duration=round(1000 / fps), loop=0)
    os.replace(tmp, path)
    return path


def _write_mp4(frames: Sequence[Image.Image], path: Path, fps: float) -> Path:
    import imageio.v2 as imageio

    tmp = _temp_path(path)
    # yuv420p plays everywhere; SVD sizes are multiples of 8, so a macro block of 8 never resizes frames.
    writer = imageio.get_writer(
        tmp, format="FFMPEG", mode="I", fps=fps, codec="libx264", pixelformat="yuv420p", macro_block_size=8
    )
    try:
        for frame in frames:
            writer.append_data(np.asarray(frame.convert("RGB")))
    finally:
        writer.close()
    os.replace(tmp, path)
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
