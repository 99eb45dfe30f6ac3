"""Write-then-rename: a file or folder appears under its final name only once it is complete.

A run killed mid-write (Ctrl-C, out of memory, a crash) must never leave a truncated frame, bank,
checkpoint or metadata file that a later ``--resume`` or reader would take for a finished one.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a hidden temporary path beside ``path``; rename it over ``path`` when the block succeeds.

    The temporary name keeps ``path``'s suffix (PIL, ffmpeg and safetensors pick formats from it) and the
    process id (two writers of the same file never share a temporary). On error it is removed and
    ``path`` keeps its previous content. A folder may be written too: an existing one is replaced.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.stem}.tmp-{os.getpid()}{path.suffix}")
    _remove(tmp)
    try:
        yield tmp
    except BaseException:
        _remove(tmp)
        raise
    if tmp.is_dir() and path.is_dir():  # os.replace cannot replace a non-empty folder
        shutil.rmtree(path)
    os.replace(tmp, path)


def write_text(path: str | os.PathLike, text: str) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def write_json(path: str | os.PathLike, data: object) -> Path:
    return write_text(path, json.dumps(data, indent=2, default=str, ensure_ascii=False) + "\n")
