"""Finding and reading training videos: video files, animated GIFs, or folders of frame images.

A data folder holds, at its top level, any mix of

- video files (``.mp4 .webm .mov .avi .mkv .m4v``), read with ``imageio`` when it is installed and skipped
  with a warning otherwise (it is not a dependency of this project);
- animated GIFs (``.gif``), read with PIL;
- sub-folders of frame images (``.png .jpg .jpeg .webp .bmp``), one folder per video, frames in natural
  name order (``2.png`` before ``10.png``).

Entries starting with a dot and files of other types are ignored.
"""

from __future__ import annotations

import hashlib
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from PIL import Image, ImageSequence

__all__ = [
    "FRAME_EXTENSIONS",
    "VIDEO_EXTENSIONS",
    "VideoSource",
    "find_videos",
    "read_frames",
    "source_fingerprint",
]

VIDEO_EXTENSIONS = (".mp4", ".webm", ".mov", ".avi", ".mkv", ".m4v")
FRAME_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


@dataclass(frozen=True)
class VideoSource:
    """One video: where it is, how to read it, and how many frames it has."""

    path: Path
    kind: Literal["frames", "gif", "video"]
    num_frames: int


def _natural_key(path: Path) -> list:
    return [int(part) if part.isdigit() else part.lower() for part in re.split(r"(\d+)", path.name)]


def _frame_files(folder: Path) -> list[Path]:
    files = [p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in FRAME_EXTENSIONS]
    return sorted((p for p in files if not p.name.startswith(".")), key=_natural_key)


def _imageio():
    try:
        import imageio.v3 as iio
    except ImportError:
        return None
    return iio


def _probe(path: Path) -> VideoSource | None:
    """A ``VideoSource`` for ``path``, or None if it is not a video we can read (with a warning why)."""
    suffix = path.suffix.lower()
    if path.is_dir():
        frames = _frame_files(path)
        if not frames:
            kinds = ", ".join(FRAME_EXTENSIONS)
            warnings.warn(f"skipping {path}: folder has no frame images ({kinds})", stacklevel=3)
            return None
        try:
            with Image.open(frames[0]) as im:
                im.load()
        except OSError as exc:
            warnings.warn(f"skipping {path}: cannot read frame {frames[0].name} ({exc})", stacklevel=3)
            return None
        return VideoSource(path, "frames", len(frames))
    if suffix == ".gif":
        try:
            with Image.open(path) as im:
                im.load()
                count = getattr(im, "n_frames", 1)
        except OSError as exc:
            warnings.warn(f"skipping {path}: not a readable GIF ({exc})", stacklevel=3)
            return None
        return VideoSource(path, "gif", count)
    if suffix in VIDEO_EXTENSIONS:
        iio = _imageio()
        if iio is None:
            warnings.warn(
                f"skipping {path}: reading {suffix} files needs imageio (pip install imageio[pyav]); "
                "GIFs and folders of frame images work without it",
                stacklevel=3,
            )
            return None
        try:
            count = sum(1 for _ in iio.imiter(path))
        except Exception as exc:  # imageio's plugins raise many types for unreadable files
            warnings.warn(f"skipping {path}: imageio cannot read it ({exc})", stacklevel=3)
            return None
        return VideoSource(path, "video", count)
    return None


def find_videos(data_dir: str | Path) -> list[VideoSource]:
    """Every readable video at the top level of ``data_dir``, sorted by name.

    Raises:
        FileNotFoundError: ``data_dir`` does not exist.
        NotADirectoryError: ``data_dir`` is a file.
        ValueError: ``data_dir`` is empty, or nothing in it is a readable video.
    """
    root = Path(data_dir)
    if not root.exists():
        raise FileNotFoundError(f"data folder not found: {root}")
    if not root.is_dir():
        raise NotADirectoryError(f"data folder is not a directory: {root}")
    entries = sorted((p for p in root.iterdir() if not p.name.startswith(".")), key=_natural_key)
    if not entries:
        raise ValueError(
            f"data folder {root} is empty: put GIFs, video files or folders of frame images in it"
        )
    sources = [s for s in (_probe(p) for p in entries) if s is not None]
    if not sources:
        raise ValueError(
            f"no readable videos in data folder {root} ({len(entries)} entries looked at): expected "
            f"GIFs, video files ({', '.join(VIDEO_EXTENSIONS)}; needs imageio) or sub-folders of frame images"
        )
    return sources


def read_frames(source: VideoSource) -> list[Image.Image]:
    """All frames of ``source`` as RGB images, in order."""
    if source.kind == "frames":
        frames = []
        for p in _frame_files(source.path):
            with Image.open(p) as im:
                frames.append(im.convert("RGB"))
        return frames
    if source.kind == "gif":
        with Image.open(source.path) as im:
            return [frame.convert("RGB") for frame in ImageSequence.Iterator(im)]
    iio = _imageio()
    if iio is None:
        raise RuntimeError(f"reading {source.path} needs imageio, which is not installed")
    return [Image.fromarray(frame).convert("RGB") for frame in iio.imiter(source.path)]


def source_fingerprint(source: VideoSource) -> str:
    """Hash of the video's resolved path and its files' modification times and sizes.

    Editing, adding or removing a frame changes it, so a stale embedding cache is never read.
    """
    files = _frame_files(source.path) if source.kind == "frames" else [source.path]
    digest = hashlib.sha256(str(source.path.resolve()).encode())
    for f in files:
        stat = f.stat()
        digest.update(f"{f.name}:{stat.st_mtime_ns}:{stat.st_size}".encode())
    return digest.hexdigest()
