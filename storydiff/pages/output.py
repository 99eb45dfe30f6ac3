"""The output folder of a story run: frames as they finish, comic pages, metadata.

Every file is written under a temporary name and renamed into place (``atomic.py``), so a killed run never
leaves a truncated file under a final name. ``metadata.json`` (a ``StoryRecord``, ``record.py``) says
``"status": "running"`` from the start and only says ``"complete"`` once everything else is written
(``"failed"`` or ``"interrupted"`` otherwise).
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from PIL import Image

from ..support.atomic import atomic_path
from .record import METADATA, StoryRecord, read_record

__all__ = ["METADATA", "StoryOutput", "check_output_folder", "read_metadata", "save_image"]


def read_metadata(root: str | os.PathLike) -> dict:
    """A run folder's ``metadata.json`` as a dict (``StoryRecord.to_dict``), for scripts; storydiff's own
    readers use :func:`~storydiff.pages.record.read_record`. RecordError (a ValueError) if unreadable."""
    return read_record(root).to_dict()


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S")


def save_image(image: Image.Image, path: Path) -> Path:
    with atomic_path(path) as tmp:
        image.save(tmp, format="PNG")
    return path


def check_output_folder(
    root: str | os.PathLike, *, overwrite: bool = False, resume: bool = False
) -> str | None:
    """Whether ``root`` can take this run; returns the status of the run already there (None if none).

    Raises ``FileExistsError`` / ``FileNotFoundError`` / ``NotADirectoryError`` with what to do instead.
    Nothing is created, so it can run before any model is loaded.
    """
    root = Path(root)
    for parent in (root, *root.parents):
        if parent.exists() and not parent.is_dir():
            what = "is a file" if parent == root else f"is inside {parent}, which is a file"
            raise NotADirectoryError(f"output folder {root} {what}; choose a folder")
    status = (read_record(root).status or "?") if (root / METADATA).is_file() else None
    if resume and status is None:
        raise FileNotFoundError(f"nothing to resume in {root}: no {METADATA}")
    if resume and status == "complete":
        raise FileExistsError(f"{root} holds a complete run: nothing to resume")
    if status is not None and not (overwrite or resume):
        raise FileExistsError(
            f"{root} already holds a story run (status {status!r}); choose a new folder, or replace it "
            "with --overwrite (overwrite=True)"
        )
    return status


class StoryOutput:
    """Layout: ``frames/frame_000.png``, ``pages/page_000.png``, ``banks/<name>.safetensors``, metadata."""

    def __init__(
        self,
        root: str | os.PathLike,
        *,
        overwrite: bool = False,
        resume: bool = False,
        follower: bool = False,
    ) -> None:
        """``follower``: a rank other than 0 of a distributed run; it writes its own frames into the
        folder rank 0 prepared, and nothing else (no checks, no metadata, no pages)."""
        self.root = Path(root)
        self.resume = resume
        self.follower = follower
        if not follower:
            check_output_folder(self.root, overwrite=overwrite, resume=resume)
        self.frames_dir, self.pages_dir, self.banks_dir = (
            self.root / d for d in ("frames", "pages", "banks")
        )
        self.record = StoryRecord()

    @property
    def metadata(self) -> dict:
        """What ``metadata.json`` holds now, as a dict."""
        return self.record.to_dict()

    def start(self, record: StoryRecord | Mapping[str, Any]) -> None:
        """Prepare the folder and write ``record`` (a dict is read as ``StoryRecord.from_dict`` reads a
        file) with status "running"."""
        if self.follower:
            return
        if not isinstance(record, StoryRecord):
            record = StoryRecord.from_dict(record)
        self.frames_dir.mkdir(parents=True, exist_ok=True)
        if not self.resume:  # an overwritten run must not keep frames of the previous story
            for stale in [*self.frames_dir.glob("frame_*.png"), *self.pages_dir.glob("page_*.png")]:
                stale.unlink()
        self.record = record.replace(status="running", started=_now(), finished=None, error=None)
        self.record.write(self.root / METADATA)

    def frame_path(self, index: int) -> Path:
        return self.frames_dir / f"frame_{index:03d}.png"

    def save_frame(self, index: int, image: Image.Image) -> Path:
        return save_image(image, self.frame_path(index))

    def save_pages(self, pages: list[Image.Image]) -> list[Path]:
        self.pages_dir.mkdir(parents=True, exist_ok=True)
        return [save_image(page, self.pages_dir / f"page_{i:03d}.png") for i, page in enumerate(pages)]

    def bank_path(self, character: str) -> Path:
        safe = "".join(c if c.isalnum() or c in "-_" else "_" for c in character)
        return self.banks_dir / f"{safe}.safetensors"

    def finish(self, **results: Any) -> None:
        """Record the run complete, with ``results``: fields of ``StoryRecord`` (``bank_bytes``,
        ``bank_peak_bytes``, ``seconds``, ``pages``); a TypeError for any other name."""
        if self.follower:
            return
        self.record = self.record.replace(**results, status="complete", finished=_now())
        self.record.write(self.root / METADATA)

    def fail(self, error: BaseException) -> None:
        if self.follower:
            return
        if isinstance(error, KeyboardInterrupt):
            self.record = self.record.replace(status="interrupted", error="interrupted by the user (Ctrl-C)")
        else:
            self.record = self.record.replace(status="failed", error=f"{type(error).__name__}: {error}")
        self.record.write(self.root / METADATA)
