"""The output folder of a story run: frames as they finish, comic pages, metadata.

Every file is written under a temporary name and renamed into place (``atomic.py``), so a killed run never
leaves a truncated file under a final name. ``metadata.json`` (a ``StoryRecord``, ``record.py``) says
``"status": "running"`` from the start and only says ``"complete"`` once everything else is written
(``"failed"`` or ``"interrupted"`` otherwise).

One run at a time: the run writing a folder holds its lock, ``run.lock``: a ``RunLock`` its ``StoryOutput``
owns (the file is created with ``O_EXCL``, which network filesystems honour too; it names the host, the
process and when that process started). Ranks of a torchrun run share the folder: rank 0 takes the lock,
the others join the folder it prepared. A lock is stale, and taken over, when its process is gone (same
host: no such process, or another process under that id; this process: no RunLock of it holds it any
more) or, from another host, when its heartbeat stopped (the live run touches the file every
``HEARTBEAT_S`` seconds; ``STALE_S`` without one means its run is dead).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import threading
import time
import uuid
import weakref
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from PIL import Image

from ..support.atomic import atomic_path
from .record import METADATA, RecordError, StoryRecord, read_record
from .video_io import write_video

__all__ = [
    "LOCK",
    "METADATA",
    "FolderInUse",
    "RunLock",
    "StoryOutput",
    "check_output_folder",
    "frame_path",
    "lock_holder",
    "read_metadata",
    "save_image",
    "shot_frame_path",
]

LOCK = "run.lock"
HEARTBEAT_S = 20.0  # how often a live run touches its lock
STALE_S = 120.0  # a lock from another host untouched this long belongs to a dead run


class FolderInUse(FileExistsError):
    """The output folder is being written by a run still going."""


def _process_start(pid: int) -> str | None:
    """When process ``pid`` started (clock ticks since boot, from /proc), None where that cannot be read:
    with the pid it names one process, not a later one that got the same id."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat.rpartition(")")[2].split()
    return fields[19] if len(fields) > 19 else None


def _alive(pid: int, start: str | None) -> bool:
    """Whether process ``pid`` (started at ``start``) is still running on this host."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: it exists
        pass
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
    except (OSError, IndexError):
        return True  # no /proc: the pid exists, take it as the holder
    if state in ("Z", "X"):  # killed, not yet reaped
        return False
    return start is None or _process_start(pid) in (None, start)


def _describe(owner: dict) -> str:
    return f"host {owner.get('host', '?')}, process {owner.get('pid', '?')}, since {owner.get('since', '?')}"


def _heartbeat_name(token: str) -> str:
    return f"storydiff-lock-{token}"


def _heartbeat(path: Path, stop: threading.Event) -> None:
    """Touch the lock every ``HEARTBEAT_S`` seconds until ``stop`` is set (so other hosts see it live)."""
    while not stop.wait(HEARTBEAT_S):
        with contextlib.suppress(OSError):
            os.utime(path)


def _held_here(token: object) -> bool:
    """Whether a ``RunLock`` of this process holds the lock taken with ``token``. Its heartbeat thread,
    named after the token, runs from before the file is written until after it is removed, so the thread is
    the proof: no record of held locks needs to be kept beside it."""
    if not isinstance(token, str):
        return False
    name = _heartbeat_name(token)
    return any(thread.name == name and thread.is_alive() for thread in threading.enumerate())


def _read_lock(path: Path) -> dict | None:
    """The lock's owner (None: no lock); an unreadable lock is an owner of unknown host."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    except OSError:
        return {}
    try:
        owner = json.loads(text)
    except json.JSONDecodeError:
        return {}
    return owner if isinstance(owner, dict) else {}


def _is_live(path: Path, owner: dict) -> bool:
    pid = owner.get("pid")
    if owner.get("host") == socket.gethostname() and isinstance(pid, int):
        if pid == os.getpid():  # this process: live while one of its RunLocks holds it (not left over)
            return _held_here(owner.get("token"))
        return _alive(pid, owner.get("start"))
    try:  # another host (or a lock without an owner): live while its heartbeat goes on
        return time.time() - path.stat().st_mtime < STALE_S
    except FileNotFoundError:
        return False


def lock_holder(root: str | os.PathLike) -> dict | None:
    """The run holding folder ``root`` now ({host, pid, since, ...}), or None: no lock, or a stale one."""
    path = Path(root) / LOCK
    owner = _read_lock(path)
    if owner is None or not _is_live(path, owner):
        return None
    return owner


def _in_use(root: Path, owner: dict) -> FolderInUse:
    return FolderInUse(
        f"{root} is being written by a run still going ({_describe(owner)}); wait for it to end or stop it "
        f"first (a run killed on another host frees the folder {STALE_S:.0f} s after its last heartbeat)"
    )


def _let_go(path: Path, token: str, stop: threading.Event, heartbeat: threading.Thread) -> None:
    """Remove the lock at ``path`` if it is still the one ``token`` took, then stop its heartbeat: until the
    file is gone the thread keeps saying, to this process's other locks, that the folder is held."""
    held = _read_lock(path)
    if held is not None and held.get("token") == token:
        path.unlink(missing_ok=True)
    stop.set()
    if heartbeat is not threading.current_thread():  # a finalizer may run on any thread, this one too
        heartbeat.join()


class RunLock:
    """The lock on one output folder, ``run.lock``: held by one run from ``acquire`` to ``release`` (or
    until this object is gone, or the process exits), with its own heartbeat thread meanwhile.

    ``with RunLock(root):`` holds it for the block. A second lock on the same folder, in another process
    or this one, is refused with ``FolderInUse`` while this one is held.
    """

    def __init__(self, root: str | os.PathLike) -> None:
        self.root = Path(root)
        self.path = Path(os.path.abspath(self.root / LOCK))
        self._release: weakref.finalize | None = None  # lets go of the lock this object holds

    @property
    def is_held(self) -> bool:
        return self._release is not None and self._release.alive

    def acquire(self) -> RunLock:
        """Take the folder's lock (taking over a stale one). FolderInUse if a live run holds it."""
        if self.is_held:
            raise RuntimeError(f"the lock on {self.root} is already held by this RunLock")
        token = uuid.uuid4().hex
        owner = {
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "start": _process_start(os.getpid()),
            "since": _now(),
            "token": token,
        }
        # the heartbeat starts before the file exists: whoever in this process reads the file finds its
        # thread (_held_here). It takes no reference to self, so a RunLock dropped unreleased is collected
        stop = threading.Event()
        heartbeat = threading.Thread(
            target=_heartbeat, args=(self.path, stop), name=_heartbeat_name(token), daemon=True
        )
        heartbeat.start()
        try:
            self._create(owner)
        except BaseException:
            stop.set()
            heartbeat.join()
            raise
        # weakref.finalize: released by release(), when this object is collected, or at exit
        self._release = weakref.finalize(self, _let_go, self.path, token, stop, heartbeat)
        return self

    def _create(self, owner: dict) -> None:
        path = self.path
        for _ in range(5):
            try:
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                held = _read_lock(path)
                if held is None:
                    continue  # released meanwhile
                if _is_live(path, held):
                    raise _in_use(self.root, held) from None
                # stale: move it aside (only one contender's rename succeeds), then try again
                aside = path.with_name(f".{LOCK}.stale-{owner['token']}")
                try:
                    os.rename(path, aside)
                except FileNotFoundError:
                    continue
                if _read_lock(aside) != held:  # a newer lock was moved: put it back
                    with contextlib.suppress(OSError):
                        os.link(aside, path)
                aside.unlink(missing_ok=True)
                continue
            with os.fdopen(fd, "w", encoding="utf-8") as file:
                json.dump(owner, file)
            return
        raise _in_use(self.root, _read_lock(path) or {})

    def release(self) -> None:
        """Remove the lock file (if still this lock's) and stop the heartbeat; nothing if not held."""
        if self._release is not None:
            self._release()

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


def frame_path(root: str | os.PathLike, index: int) -> Path:
    """Story frame ``index``'s image in a story folder (a video story's: its shot's first frame)."""
    return Path(root) / "frames" / f"frame_{index:03d}.png"


SHOTS_DIR = "shots"  # a video story's shots


def shot_frame_path(root: str | os.PathLike, shot: int, frame: int) -> Path:
    """Video frame ``frame`` of shot ``shot`` (story frame ``shot``) in a video story folder."""
    return Path(root) / SHOTS_DIR / f"shot_{shot:03d}" / f"frame_{frame:04d}.png"


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
    owner = lock_holder(root) if root.is_dir() else None
    if owner is not None:
        raise _in_use(root, owner)
    status = None
    if (root / METADATA).is_file():
        try:
            status = read_record(root).status or "?"
        except RecordError:
            if not overwrite or resume:
                raise
            status = "unreadable"  # --overwrite replaces a damaged record too
    if resume and status is None:
        raise FileNotFoundError(f"nothing to resume in {root}: no {METADATA}")
    if resume and status == "complete":
        raise FileExistsError(f"{root} holds a complete run: nothing to resume")
    if status is not None and not (overwrite or resume):
        raise FileExistsError(
            f"{root} already holds a story run (status {status!r}); choose a new folder, or replace it "
            "with --overwrite"
        )
    if status is None and not overwrite:
        old = [*root.glob("frames/frame_*.png"), *root.glob("pages/page_*.png"), *root.glob("shots/shot_*")]
        if old:
            raise FileExistsError(
                f"{root} holds {len(old)} frame/page image(s) of an earlier run but no {METADATA}; choose a "
                "new folder, or replace them with --overwrite"
            )
    return status


class StoryOutput:
    """Layout: ``frames/frame_000.png``, ``pages/page_000.png``, ``banks/<name>.safetensors``, metadata;
    video stories also ``shots/shot_000/frame_0000.png``, ``shots/shot_000.gif`` (``.mp4``), ``story.gif``."""

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
        self.lock = RunLock(self.root)  # the leader holds it from start to finish or fail

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
        if not self.lock.is_held:
            self.lock.acquire()
        if not self.resume:  # an overwritten run must not keep frames of the previous story
            for stale in [*self.frames_dir.glob("frame_*.png"), *self.pages_dir.glob("page_*.png")]:
                stale.unlink()
            shots = self.root / SHOTS_DIR
            if shots.is_dir():  # a video story's shots (folders of frames, and their videos)
                shutil.rmtree(shots)
            for stale in self.root.glob("story.*"):
                stale.unlink()
        self.record = record.replace(status="running", started=_now(), finished=None, error=None)
        self.record.write(self.root / METADATA)

    def frame_path(self, index: int) -> Path:
        return frame_path(self.root, index)

    def save_frame(self, index: int, image: Image.Image) -> Path:
        return save_image(image, self.frame_path(index))

    def shot_dir(self, index: int) -> Path:
        return shot_frame_path(self.root, index, 0).parent

    def save_shot(self, index: int, frames: list[Image.Image], fps: float) -> Path:
        """A video story's shot: every frame as ``shots/shot_NNN/frame_NNNN.png`` (lossless, what eval
        reads), the shot as ``shots/shot_NNN.gif`` (and ``.mp4`` with imageio-ffmpeg), and its first frame
        as ``frames/frame_NNN.png``. The frame files come first, the videos last: a shot with its video
        file is complete."""
        folder = self.shot_dir(index)
        folder.mkdir(parents=True, exist_ok=True)
        for number, frame in enumerate(frames):
            save_image(frame, shot_frame_path(self.root, index, number))
        self.save_frame(index, frames[0])
        write_video(frames, folder.parent, folder.name, fps)
        return folder

    def save_story_video(self, shots: list[list[Image.Image]], fps: float) -> None:
        """The shots one after another: ``story.gif`` (and ``story.mp4``)."""
        write_video([frame for shot in shots for frame in shot], self.root, "story", fps)

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
        self.release()

    def release(self) -> None:
        """Free the folder for another run (done by ``finish`` and ``fail``)."""
        self.lock.release()

    def fail(self, error: BaseException) -> None:
        if self.follower:
            return
        if isinstance(error, KeyboardInterrupt):
            self.record = self.record.replace(status="interrupted", error="interrupted by the user (Ctrl-C)")
        else:
            self.record = self.record.replace(status="failed", error=f"{type(error).__name__}: {error}")
        try:
            self.record.write(self.root / METADATA)
        finally:
            self.release()
