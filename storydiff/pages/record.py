"""``metadata.json``: what a story run records, and the one code that knows the file's layout.

A ``StoryRecord`` is what the run was (model, story text, settings, consistency, per-frame seeds, prompts,
captions and characters, model files, banks, IP-Adapter, how many processes) and how it went (status,
times, bank sizes, error). ``write`` puts it in a file, ``read`` / :func:`read_record` take it back; every
reader of a run folder (``--resume``, ``eval``, ``eval-suite``, ``video``) reads these fields, never the
file's keys. The settings and consistency blocks stay dicts here: ``RunSettings`` (runs/) and
``ConsistencyConfig`` own their layouts and read them back.

Formats: 1 is every file written before the format was recorded (no ``"format"`` key); 2 adds
``"format": 2`` and has the same keys otherwise. A file of a newer format, or of one that never existed,
is refused in one line naming it; keys this version does not know are kept (``extra``) and written back,
but nothing reads them. Any field may be missing from a file (hand-made folders, older versions): a reader
says what it needs (:meth:`StoryRecord.need`) and gets one line naming the file and the missing fields.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..support.atomic import write_json

__all__ = [
    "FORMAT",
    "METADATA",
    "NewerFormat",
    "RecordError",
    "StoryRecord",
    "check_resume_world",
    "read_record",
    "record_path",
]

METADATA = "metadata.json"
FORMAT = 2  # the format this version writes, and the newest it reads
FORMAT_KEY = "format"


class RecordError(ValueError):
    """A ``metadata.json`` that cannot be read as a story record; the message is one line naming the file."""


class NewerFormat(RecordError):
    """A ``metadata.json`` written by a newer storydiff, in a format this version does not know."""


def record_path(root: str | os.PathLike) -> Path:
    """``metadata.json`` of a run folder (a path to the file itself stays as it is)."""
    root = Path(root)
    return root if root.name == METADATA and not root.is_dir() else root / METADATA


# How each field is read from JSON: a function that checks and converts (TypeError if it does not fit),
# and how the error names what it should be. null in the file is the field's default.
def _text(value: Any) -> str:
    if not isinstance(value, str):
        raise TypeError("a text")
    return value


def _whole(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError("a whole number")
    return value


def _number(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError("a number")
    return value


def _mapping(value: Any) -> dict:
    if not isinstance(value, dict):
        raise TypeError("an object")
    return dict(value)


def _list_of(item: Callable[[Any], Any]) -> Callable[[Any], list]:
    def read(value: Any) -> list:
        if not isinstance(value, list | tuple):  # tuples: a record a run assembles, not read from JSON
            raise TypeError("a list")
        return [item(x) for x in value]

    return read


STATUSES = ("running", "complete", "failed", "interrupted")


def _status(value: Any) -> str:
    if value not in STATUSES:
        raise TypeError(f"one of {', '.join(map(repr, STATUSES))}")
    return value


def _maybe_text(value: Any) -> str | None:
    return None if value is None else _text(value)


def _lora(value: Any) -> tuple[str, float]:
    if not isinstance(value, list | tuple) or len(value) != 2:
        raise TypeError("a [path, scale] pair")
    return _text(value[0]), _number(value[1])


def _dict_of(item: Callable[[Any], Any]) -> Callable[[Any], dict]:
    def read(value: Any) -> dict:
        if not isinstance(value, dict):
            raise TypeError("an object")
        return {key: item(v) for key, v in value.items()}

    return read


_READ: dict[str, tuple[Callable[[Any], Any], str]] = {
    "model": (_text, "a text"),
    "story_text": (_text, "a text"),
    "settings": (_mapping, "an object"),
    "consistency": (_mapping, "an object"),
    "frame_seeds": (_list_of(_whole), "a list of whole numbers"),
    "prompts": (_list_of(_text), "a list of texts"),
    "negative_prompts": (_list_of(_text), "a list of texts"),
    "captions": (_list_of(_maybe_text), "a list of texts or nulls"),
    "model_config": (_text, "a text or null"),
    "loras": (_list_of(_lora), "a list of [path, scale] pairs"),
    "characters": (_dict_of(_text), "an object of name: description"),
    "frame_characters": (_list_of(_list_of(_text)), "a list of lists of names"),
    "identity_frames": (_dict_of(_list_of(_whole)), "an object of name: [frame numbers]"),
    "loaded_banks": (_dict_of(_mapping), "an object of name: {path, sha256}"),
    "ip_adapter": (_mapping, "an object or null"),
    "reference_images": (_dict_of(_mapping), "an object of name: {sha256, path, ...}"),
    "subject_masks": (_mapping, "an object or null"),
    "world_size": (_whole, "a whole number"),
    "versions": (_dict_of(_maybe_text), "an object of package: version"),
    "status": (_status, "one of " + ", ".join(map(repr, STATUSES))),
    "started": (_text, "a text"),
    "bank_bytes": (_dict_of(_whole), "an object of name: bytes"),
    "bank_peak_bytes": (_whole, "a whole number"),
    "seconds": (_number, "a number"),
    "pages": (_whole, "a whole number"),
    "finished": (_text, "a text"),
    "error": (_text, "a text"),
}
# Written only once the run has them (a running run's file has none of these keys).
_RESULTS = ("started", "bank_bytes", "bank_peak_bytes", "seconds", "pages", "finished", "error")
# Written only for runs that use them (added after format 2: files without them read the same)
_WHEN_SET = ("subject_masks",)


@dataclass
class StoryRecord:
    """What one story run records in its ``metadata.json``.

    Fields a file lacks are None (or empty, where empty means the same: no LoRAs, no loaded banks...).
    ``format_version`` is the format of the file it was read from (``FORMAT`` for a new record); ``write``
    always writes ``FORMAT``. ``extra``: keys of the file this version does not know, kept as read.
    """

    # what the run was
    model: str | None = None
    story_text: str | None = None  # parses back to the story (pages.story.story_source)
    settings: dict | None = None  # RunSettings.to_dict()
    consistency: dict | None = None  # ConsistencyConfig.to_dict()
    frame_seeds: list[int] | None = None
    prompts: list[str] | None = None  # styled, one per frame
    negative_prompts: list[str] | None = None
    captions: list[str | None] | None = None
    model_config: str | None = None  # the single-file checkpoint's config, if any
    loras: list[tuple[str, float]] = field(default_factory=list)  # (path, scale)
    characters: dict[str, str] = field(default_factory=dict)  # name -> description
    frame_characters: list[list[str]] | None = None
    identity_frames: dict[str, list[int]] = field(default_factory=dict)
    loaded_banks: dict[str, dict] = field(default_factory=dict)  # name -> {"path", "sha256"}
    ip_adapter: dict | None = None  # models.ip_adapter.adapter_metadata
    reference_images: dict[str, dict] = field(default_factory=dict)  # name -> read_reference_image's record
    subject_masks: dict | None = (
        None  # {"source": folder given, "sha256": of the masks} (consistency/subject_masks.py)
    )
    world_size: int = 1
    versions: dict[str, str | None] = field(default_factory=dict)
    # how it went
    status: str | None = None  # "running", "complete", "failed", "interrupted"
    started: str | None = None
    finished: str | None = None
    error: str | None = None
    bank_bytes: dict[str, int] | None = None
    bank_peak_bytes: int | None = None
    seconds: float | None = None
    pages: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    format_version: int = FORMAT
    source: Path | None = field(default=None, compare=False, repr=False)  # the file it was read from

    # ------------------------------------------------------------------------------------------------
    # JSON

    def to_dict(self) -> dict[str, Any]:
        """The file's JSON: ``"format"`` first, then every field (results only once set, optional features
        only when used), then ``extra``."""
        data: dict[str, Any] = {FORMAT_KEY: FORMAT}
        for name in _READ:
            value = getattr(self, name)
            if (name in _RESULTS or name in _WHEN_SET) and value is None:
                continue
            data[name] = [list(pair) for pair in value] if name == "loras" else value
        data.update({key: value for key, value in self.extra.items() if key not in data})
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], source: str | os.PathLike | None = None) -> StoryRecord:
        """A record from the file's JSON (or the dict a run assembles); RecordError (one line, naming
        ``source``) for an unknown or newer format or a field of the wrong kind."""
        where = str(source) if source is not None else "metadata"
        if not isinstance(data, Mapping):
            raise RecordError(f"{where} is not a story record (a JSON {type(data).__name__}, not an object)")
        version = data.get(FORMAT_KEY, 1)
        if isinstance(version, bool) or not isinstance(version, int) or version < 1:
            raise RecordError(f"{where}: unknown format {version!r}; this storydiff reads 1 to {FORMAT}")
        if version > FORMAT:
            raise NewerFormat(
                f"{where} was written by a newer storydiff (format {version}); this one reads up to {FORMAT}"
            )
        values: dict[str, Any] = {}
        for name, (read, what) in _READ.items():
            value = data.get(name)
            if value is None:
                continue
            try:
                values[name] = read(value)
            except TypeError:
                raise RecordError(
                    f"{where}: {name!r} should be {what}, not {json.dumps(value)[:60]}"
                ) from None
        extra = {k: v for k, v in data.items() if k not in _READ and k != FORMAT_KEY}
        path = Path(source) if source is not None else None
        return cls(**values, extra=extra, format_version=version, source=path)

    # ------------------------------------------------------------------------------------------------
    # files

    def write(self, path: str | os.PathLike) -> Path:
        """Write the record to ``path`` (a run folder or its ``metadata.json``), complete or not at all."""
        target = record_path(path)
        write_json(target, self.to_dict())
        return target

    @classmethod
    def read(cls, path: str | os.PathLike) -> StoryRecord:
        """The record of a run folder (or of its ``metadata.json``); RecordError (one line, naming the
        file) when it cannot be read, is not JSON, or is of a format this version does not read."""
        target = record_path(path)
        try:
            text = target.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else exc
            raise RecordError(f"cannot read {target}: {reason}") from None
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise RecordError(f"{target} is not JSON ({exc})") from None
        return cls.from_dict(data, source=target)

    # ------------------------------------------------------------------------------------------------
    # what readers ask

    def need(self, names: Iterable[str], purpose: str = "this") -> StoryRecord:
        """This record, if it has every field in ``names``; otherwise RecordError naming the file, what
        it was for (``purpose``: "a resume", "an evaluation") and the fields it lacks."""
        names = list(names)
        unknown = [name for name in names if name not in _READ]
        if unknown:
            raise AttributeError(f"StoryRecord has no field(s) {', '.join(unknown)}")
        missing = [name for name in names if getattr(self, name) is None]
        if missing:
            where = self.source if self.source is not None else "metadata"
            raise RecordError(f"{where} lacks what {purpose} needs: {', '.join(missing)}")
        return self

    @property
    def complete(self) -> bool:
        return self.status == "complete"

    @property
    def reference_paths(self) -> dict[str, str | None]:
        """Each character's reference image file (None: it was given as a picture, not a file)."""
        return {name: entry.get("path") for name, entry in self.reference_images.items()}

    def replace(self, **changes: Any) -> StoryRecord:
        """A copy with ``changes`` (field names only: a TypeError for any other)."""
        return dataclasses.replace(self, **changes)


def read_record(root: str | os.PathLike, *, need: Iterable[str] = (), purpose: str = "this") -> StoryRecord:
    """The record of run folder ``root``, with the fields in ``need`` (see :meth:`StoryRecord.need`)."""
    return StoryRecord.read(root).need(need, purpose)


def check_resume_world(out_dir: str | os.PathLike, world: int) -> None:
    """A run resumes with as many processes as made it (``world``): each rank's checkpoint holds its own
    frames."""
    stored = read_record(out_dir).world_size
    if stored != world:
        raise ValueError(
            f"{out_dir} was generated by {stored} process(es); resume it with the same number "
            f"(torchrun --nproc_per_node {stored}), not {world}"
        )
