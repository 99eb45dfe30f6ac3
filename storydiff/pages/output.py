"""The output folder of a story run: frames as they finish, comic pages, metadata.

Every file is written under a temporary name and renamed into place (``atomic.py``), so a killed run never
leaves a truncated file under a final name. ``metadata.json`` says ``"status": "running"`` from the start
and only says ``"complete"`` once everything else is written (``"failed"`` or ``"interrupted"`` otherwise).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from PIL import Image

from ..support.atomic import atomic_path, write_json

METADATA = "metadata.json"


def read_metadata(root: str | os.PathLike) -> dict:
    """A run folder's metadata; ValueError if it is not readable JSON."""
    path = Path(root) / METADATA
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"cannot read {path}: {exc}") from exc


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
    status = read_metadata(root).get("status", "?") if (root / METADATA).is_file() else None
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
        self.metadata: dict = {}

    def start(self, metadata: dict) -> None:
        if self.follower:
            return
        self.frames_dir.mkdir(parents=True, exist_ok=True)
        if not self.resume:  # an overwritten run must not keep frames of the previous story
            for stale in [*self.frames_dir.glob("frame_*.png"), *self.pages_dir.glob("page_*.png")]:
                stale.unlink()
        self.metadata = {**metadata, "status": "running", "started": time.strftime("%Y-%m-%dT%H:%M:%S")}
        write_json(self.root / METADATA, self.metadata)

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

    def finish(self, **extra) -> None:
        if self.follower:
            return
        self.metadata.update(extra, status="complete", finished=time.strftime("%Y-%m-%dT%H:%M:%S"))
        write_json(self.root / METADATA, self.metadata)

    def fail(self, error: BaseException) -> None:
        if self.follower:
            return
        if isinstance(error, KeyboardInterrupt):
            self.metadata.update(status="interrupted", error="interrupted by the user (Ctrl-C)")
        else:
            self.metadata.update(status="failed", error=f"{type(error).__name__}: {error}")
        write_json(self.root / METADATA, self.metadata)
