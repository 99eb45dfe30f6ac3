"""Benchmark files in the ConsiStory+ format of 1Prompt1Story, read into our story text.

A benchmark file is YAML: a mapping of category → list of sets (as ConsiStory+ ships it), or a plain list of
sets. A set has a ``subject`` (the character's description), ``settings`` (one scene prompt per frame),
``style`` (wording put before the subject, e.g. "A watercolor painting of") and ``concept_token`` (the
character's short name, a word or a list of words); an ``id`` and a ``category`` where present. Other fields
are ignored, so files carrying more than we read still load.

Each set becomes a one-character story (``story.py``)::

    [dog] A watercolor painting of a small brown dog
    ---
    [dog] chasing a ball in the park
    [dog] asleep on a porch

so frame i's prompt is "<style> <subject> <setting i>", the prompt 1Prompt1Story builds from a set. The
benchmark's style is part of the story text, hence of the "story text" CLIP-T of ``storydiff eval``; our own
style templates come on top only when a run asks for one.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from ..pages.story import NO_CHARACTER, SEPARATOR, parse_story

__all__ = ["BenchmarkSet", "load_benchmark", "parse_benchmark"]

# Characters a set id keeps in a folder name; anything else becomes '_'.
_UNSAFE_ID = re.compile(r"[^\w.-]+")
# What story.py accepts in a character name: letters, digits, '_', '-' and inner spaces, 1-40 of them.
_UNSAFE_NAME = re.compile(r"[^\w\- ]+")
FALLBACK_NAME = "character"


@dataclass(frozen=True)
class BenchmarkSet:
    """One prompt set: a character (``subject``, with ``style`` before it) in one scene per frame.

    ``id`` is unique in its file and safe as a folder name; ``name`` is the character's tag in the story,
    made from the first concept token.
    """

    id: str
    category: str | None
    style: str
    subject: str
    name: str
    settings: tuple[str, ...]

    @property
    def description(self) -> str:
        return " ".join(f"{self.style} {self.subject}".split())

    def story_text(self) -> str:
        """The set as story text: the character line, ``---``, one frame line per setting."""
        lines = [f"[{self.name}] {_plain(self.description)}", SEPARATOR]
        for setting in self.settings:
            text = _plain(setting)
            # story.py reads the text after a line's last '#' as its caption: an empty one keeps it in
            lines.append(f"[{self.name}] {text}" + (" #" if "#" in text else ""))
        return "\n".join(lines) + "\n"


def _plain(text: str) -> str:
    """One line without brackets: a '[' in a benchmark's wording would read as a character tag."""
    return " ".join(text.replace("[", "(").replace("]", ")").split())


def _character_name(token: str | None) -> str:
    """A tag story.py accepts, from a concept token such as "dog" or "teddy bear" ("character" if none)."""
    name = " ".join(_UNSAFE_NAME.sub(" ", token or "").split())[:40].strip()
    return name if name and name.upper() != NO_CHARACTER else FALLBACK_NAME


def _text(value, what: str, where: str, *, required: bool = True) -> str:
    # YAML reads `settings: [2024]` as a number; numbers are text here, but not booleans (YAML 1.1 reads
    # "yes"/"no"/"on" as True/False, and turning those back into text would change the wording)
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        value = str(value)
    if value is None and not required:
        return ""
    if not isinstance(value, str) or (required and not value.strip()):
        raise ValueError(f"{where}: {what} must be non-empty text, got {value!r}")
    return value.strip()


def _concept_token(value, where: str) -> str | None:
    if value is None:
        return None
    tokens = value if isinstance(value, list) else [value]
    if not tokens:
        return None
    return _text(tokens[0], "concept_token", where)


def _one_set(entry, category: str | None, index: int, where: str) -> BenchmarkSet:
    if not isinstance(entry, dict):
        raise ValueError(f"{where}: expected a mapping with subject and settings, got {type(entry).__name__}")
    category = _text(entry["category"], "category", where) if entry.get("category") is not None else category
    subject = _text(entry.get("subject"), "subject", where)
    style = _text(entry.get("style"), "style", where, required=False)
    settings = entry.get("settings")
    if not isinstance(settings, list) or not settings:
        raise ValueError(f"{where}: settings must be a non-empty list of scene prompts, got {settings!r}")
    frames = tuple(_text(s, f"settings[{k}]", where) for k, s in enumerate(settings))
    raw_id = entry.get("id")
    if raw_id is None:  # 1Prompt1Story names a set's output folder "<category>_<index in category>"
        raw_id = f"{category}_{index}" if category else f"set_{index}"
    set_id = _UNSAFE_ID.sub("_", _text(raw_id, "id", where)).strip("._") or f"set_{index}"
    name = _character_name(_concept_token(entry.get("concept_token"), where))
    return BenchmarkSet(set_id, category, style, subject, name, frames)


def parse_benchmark(data, source: str = "benchmark") -> list[BenchmarkSet]:
    """The sets of a loaded benchmark file, in file order; every error names ``source`` and the set."""
    if isinstance(data, list):
        groups: list[tuple[str | None, list]] = [(None, data)]
    elif isinstance(data, dict):
        groups = []
        for category, entries in data.items():
            if not isinstance(entries, list):
                raise ValueError(
                    f"{source}: category {category!r} must hold a list of sets, got {type(entries).__name__}"
                )
            groups.append((str(category), entries))
    else:
        raise ValueError(
            f"{source}: expected a list of sets or a mapping of category to a list of sets, got "
            f"{type(data).__name__}"
        )
    sets: list[BenchmarkSet] = []
    seen: dict[str, str] = {}
    for category, entries in groups:
        for index, entry in enumerate(entries):
            label = entry.get("id") if isinstance(entry, dict) and entry.get("id") is not None else None
            where = f"{source}: set {label!r}" if label is not None else f"{source}: set {index + 1}"
            where += f" of category {category!r}" if category is not None else ""
            one = _one_set(entry, category, index, where)
            try:
                parse_story(one.story_text())  # what story.py would refuse, said here with the set's name
            except ValueError as exc:
                raise ValueError(f"{where}: cannot become a story: {exc}") from None
            if one.id in seen:
                raise ValueError(f"{where}: id {one.id!r} is also the id of {seen[one.id]}")
            seen[one.id] = where.removeprefix(f"{source}: ")
            sets.append(one)
    if not sets:
        raise ValueError(f"{source}: holds no sets")
    return sets


def load_benchmark(path: str | os.PathLike) -> list[BenchmarkSet]:
    """Read a benchmark YAML file (format in the module docstring); ValueError naming the file and set."""
    import yaml

    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"cannot read benchmark file {path}: {exc}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ValueError(f"{path} is not valid YAML: {' '.join(str(exc).split())}") from None
    return parse_benchmark(data, str(path))
