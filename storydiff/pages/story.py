"""Story files: characters, one frame per line, captions — the official StoryDiffusion UI syntax.

A story file looks like this::

    // characters first, then a line with three dashes, then one frame per line
    [Bob] a man, wearing a black suit
    [Alice] a woman with red hair, in a green coat
    ---
    [Bob] wakes up in a small flat #Monday.
    [Bob] walks in the park
    [NC] an empty bench under a tree, autumn leaves #Nobody came.
    [Bob] and [Alice] have dinner by candlelight #At last.

``[Name]`` tags a character (its description is pasted into the prompt in place of the tag), ``[NC]``
marks a frame without any character, and text after the last ``#`` is the panel caption (a line without
``#`` is captioned with its own text, as the official app does, and one ending in a bare ``#`` has none;
``Story.panel_caption``). Unlike the
official UI we allow any number of characters; identity frames (the frames that fill the id bank) are
chosen per character among the frames where it appears alone, so that the bank holds one identity only.

Every error is a ``ValueError`` that names the 1-based line and what was expected there, because story
files are written by hand and "invalid story" alone would leave the user guessing.
"""

from __future__ import annotations

import os
import re
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass

#: The tag that marks a frame without characters (official syntax). Reserved: no character may use it.
NO_CHARACTER = "NC"

#: Where panel captions come from (``Story.panel_caption``): the default follows the official app.
CAPTION_SOURCES = ("line", "hash", "none")

#: Separates the character block from the frames in a single story text.
SEPARATOR = "---"

# Any bracketed run without nested brackets is a tag. We do not try to guess which brackets are "meant" as
# tags: a typo such as ``[bob]`` must fail loudly rather than reach the prompt verbatim.
_TAG = re.compile(r"\[([^\[\]]*)\]")
# Letters (any script), digits, spaces, '_' and '-'; no leading/trailing space so that `[ Bob]` and `[Bob]`
# cannot silently name two different characters.
_NAME = re.compile(r"[\w\- ]{1,40}")
_WORD_CHAR = re.compile(r"\w")


@dataclass(frozen=True)
class Character:
    """A character: its tag name and the description that replaces the tag in prompts."""

    name: str
    description: str


@dataclass(frozen=True)
class Frame:
    """One frame of the story.

    ``text`` is the prompt body as written (tags still in place, caption removed, stripped);
    ``characters`` the tagged names in order of first appearance (empty for ``[NC]`` / untagged frames);
    ``caption`` the text after the last ``#`` ("" after a bare ``#``, None on a line without one);
    ``line`` the 1-based line in the source text, kept so that later stages can point the user at it.
    """

    index: int
    text: str
    characters: tuple[str, ...]
    caption: str | None
    line: int


@dataclass(frozen=True)
class Story:
    """A parsed story: characters in definition order and the frames in story order."""

    characters: dict[str, Character]
    frames: tuple[Frame, ...]

    def prompt(self, frame: Frame) -> str:
        """The frame's prompt: ``[Name]`` tags replaced by descriptions, ``[NC]`` dropped, spaces tidied."""

        return _replace_tags(frame.text, lambda name: self.characters[name].description)

    def prompts(self) -> list[str]:
        """All frame prompts in story order."""
        return [self.prompt(frame) for frame in self.frames]

    def captions(self) -> list[str | None]:
        """All frame captions (text after ``#``) in story order (None where a frame has none)."""
        return [frame.caption or None for frame in self.frames]

    def frames_of(self, name: str) -> list[int]:
        """Indices of the frames in which character ``name`` appears (alone or not)."""
        if name not in self.characters:
            raise ValueError(f"undefined character {name!r} (defined: {_names(self.characters)})")
        return [frame.index for frame in self.frames if name in frame.characters]

    def appears(self, name: str) -> bool:
        """Whether some frame shows character ``name``."""
        return any(name in frame.characters for frame in self.frames)

    def identity_frames(self, count: int, names: Iterable[str] | None = None) -> dict[str, list[int]]:
        """For each character that appears in the story, the indices of its first ``count`` solo frames.

        Identity frames seed the id bank, so a frame showing two characters would mix their identities;
        hence only frames where the character is the *only* one qualify. A character with fewer solo frames
        than ``count`` uses the ones it has (``identity_shortfalls`` names them; a warning says so); one
        with none is an error that says how to fix the story. Characters that are defined but never used
        are left out: there is nothing to keep consistent for them. Keys follow definition order.
        ``names`` restricts the result (and the check) to those characters, e.g. the ones with no stored bank.
        """
        _check_count(count)
        result: dict[str, list[int]] = {}
        for name, solo in self._solo_frames(names).items():
            if not solo:
                shown = [self.frames[i].line for i in self.frames_of(name)]
                lines = ", ".join(map(str, shown[:5])) + (", ..." if len(shown) > 5 else "")
                raise ValueError(
                    f"character {name!r} never appears alone in a frame (it shares line(s) {lines} with "
                    "other characters), so no identity frame can show it alone; add a frame where it is "
                    f"the only character, e.g. '[{name}] standing, full-length portrait'"
                )
            result[name] = solo[:count]
        for name, frames in result.items():
            have = len(frames)
            if have == count:
                continue
            warnings.warn(
                f"character {name!r} appears alone in only {have} frame(s): its identity comes from "
                f"{'that one' if have == 1 else f'those {have}'} instead of {count} identity frames "
                f"(--id-frames / id_frames); add solo frames of {name!r} for a steadier identity",
                IdentityFramesWarning,
                stacklevel=2,
            )
        return result

    def identity_shortfalls(self, count: int, names: Iterable[str] | None = None) -> dict[str, int]:
        """Characters with at least one but fewer than ``count`` solo frames: how many they have."""
        _check_count(count)
        return {name: len(solo) for name, solo in self._solo_frames(names).items() if 0 < len(solo) < count}

    def _solo_frames(self, names: Iterable[str] | None) -> dict[str, list[int]]:
        """Every solo frame of each character that appears (restricted to ``names``), definition order."""
        wanted = set(self.characters if names is None else names)
        return {
            name: [frame.index for frame in self.frames if frame.characters == (name,)]
            for name in self.characters
            if name in wanted and self.appears(name)
        }

    def panel_caption(self, frame: Frame, source: str = "line") -> str | None:
        """The caption of ``frame``'s panel. ``source`` (one of ``CAPTION_SOURCES``): "line" — the text
        after ``#``, or, on a line without one, the line itself with its tags as plain names ("[Bob] sits"
        → "Bob sits"; ``[NC]`` dropped), as the official app captions; "hash" — only text after ``#``;
        "none" — no captions."""
        if source not in CAPTION_SOURCES:
            raise ValueError(f"caption source must be one of {', '.join(CAPTION_SOURCES)}, got {source!r}")
        if source == "none":
            return None
        if frame.caption is not None or source == "hash":  # an empty one after '#': no caption
            return frame.caption or None
        return _replace_tags(frame.text, lambda name: name) or None

    def panel_captions(self, source: str = "line") -> list[str | None]:
        """``panel_caption`` of every frame, story order."""
        return [self.panel_caption(frame, source) for frame in self.frames]


class IdentityFramesWarning(UserWarning):
    """A character has fewer solo frames than the identity frames asked for; it uses those it has."""


def _check_count(count: int) -> None:
    if isinstance(count, bool) or not isinstance(count, int) or count < 1:
        raise ValueError(f"id_frames must be an integer >= 1, got {count!r}")


def _replace_tags(text: str, replacement: Callable[[str], str]) -> str:
    """``text`` with each ``[Name]`` tag replaced by ``replacement(name)``, ``[NC]`` dropped, spaces tidied.

    A space goes in only where the tag touches a word ("[Bob]walks"), so "[A], [B]" stays "alpha, beta".
    """

    def substitute(match: re.Match[str]) -> str:
        name = match.group(1)
        if name == NO_CHARACTER:
            return " "
        start, end = match.start(), match.end()
        before = " " if start > 0 and _WORD_CHAR.match(text[start - 1]) else ""
        after = " " if end < len(text) and _WORD_CHAR.match(text[end]) else ""
        return f"{before}{replacement(name)}{after}"

    return " ".join(_TAG.sub(substitute, text).split())


def _names(characters: dict[str, Character]) -> str:
    return ", ".join(repr(name) for name in characters) if characters else "none"


def _content_lines(text: str) -> list[tuple[int, str]]:
    """(1-based line number, stripped line) for every line that is neither blank nor a ``//`` comment."""
    lines = []
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if line and not line.startswith("//"):
            lines.append((number, line))
    return lines


def _check_name(name: str, where: str) -> None:
    if not _NAME.fullmatch(name) or name != name.strip():
        raise ValueError(
            f"{where}: invalid character name {name!r}; expected 1-40 letters, digits, spaces, '_' or '-' "
            "(no leading or trailing space)"
        )
    # Case-insensitive so that a definition like `[nc]` cannot be confused with the no-character tag.
    if name.upper() == NO_CHARACTER:
        raise ValueError(
            f"{where}: the name {name!r} is reserved ([{NO_CHARACTER}] marks a frame without characters)"
        )


def _parse_characters(lines: list[tuple[int, str]], label: str) -> dict[str, Character]:
    characters: dict[str, Character] = {}
    for number, line in lines:
        where = f"{label} {number}"
        match = _TAG.match(line)
        if match is None:
            raise ValueError(f"{where}: expected a character definition '[Name] description', got {line!r}")
        name = match.group(1)
        _check_name(name, where)
        description = line[match.end() :].strip()
        if not description:
            raise ValueError(
                f"{where}: character {name!r} has an empty description; expected '[{name}] description'"
            )
        if name in characters:
            raise ValueError(f"{where}: character {name!r} is defined twice")
        characters[name] = Character(name, description)
    return characters


def _parse_frame(index: int, number: int, line: str, characters: dict[str, Character], hint: str) -> Frame:
    where = f"line {number}"
    body, hash_mark, caption_text = line.rpartition("#")
    if not hash_mark:  # no '#': rpartition puts the whole line last
        body, caption_text = line, ""
    # "" = a '#' with nothing after it: the line asks for no caption (None: no '#', so the line is one)
    caption = caption_text.strip() if hash_mark else None
    body = body.strip()

    names: list[str] = []
    no_character = False
    for match in _TAG.finditer(body):
        name = match.group(1)
        if name == NO_CHARACTER:
            no_character = True
            continue
        if name not in characters:
            raise ValueError(f"{where}: undefined character [{name}] (defined: {_names(characters)}){hint}")
        if name not in names:
            names.append(name)
    if no_character and names:
        raise ValueError(
            f"{where}: [{NO_CHARACTER}] marks a frame without characters and cannot be combined with "
            f"{', '.join(f'[{n}]' for n in names)}"
        )
    if not names and not _TAG.sub(" ", body).strip():
        raise ValueError(f"{where}: frame has no prompt text (only tags and/or a caption)")
    return Frame(index=index, text=body, characters=tuple(names), caption=caption, line=number)


def parse_story(text: str, characters: str | None = None, *, known: dict[str, str] | None = None) -> Story:
    """Parse a story text (format in the module docstring).

    ``known``: descriptions of characters defined elsewhere (e.g. by a loaded identity bank); a frame may
    tag them without the story defining them, and the story's own definition wins where both exist.

    With ``characters`` given, that string is the character block and ``text`` holds only frames (a ``---``
    line in ``text`` is then an error). Without it, the character block is whatever precedes the first
    ``---`` line; a text without ``---`` is all frames and may then only use ``[NC]`` or untagged frames.
    Line numbers in errors refer to ``text`` ("line N") or to ``characters`` ("characters line N").
    """
    lines = _content_lines(text)
    separators = [i for i, (_, line) in enumerate(lines) if line == SEPARATOR]
    if characters is not None:
        if separators:
            number = lines[separators[0]][0]
            raise ValueError(
                f"line {number}: unexpected '{SEPARATOR}': characters were given separately, so the story "
                "text must hold only frames"
            )
        defined = _parse_characters(_content_lines(characters), "characters line")
        frame_lines = lines
    elif separators:
        if len(separators) > 1:
            number = lines[separators[1]][0]
            raise ValueError(f"line {number}: unexpected second '{SEPARATOR}'; expected one frame per line")
        defined = _parse_characters(lines[: separators[0]], "line")
        frame_lines = lines[separators[0] + 1 :]
    else:
        defined = {}
        frame_lines = lines

    # Forgetting the separator is the likeliest reason for an undefined name in a file without characters.
    hint = (
        f"; character definitions go before a '{SEPARATOR}' line"
        if not defined and characters is None
        else ""
    )
    for name, description in (known or {}).items():
        if name not in defined:
            _check_name(name, "loaded character")
            defined[name] = Character(name, description)
    frames = tuple(
        _parse_frame(index, number, line, defined, hint) for index, (number, line) in enumerate(frame_lines)
    )
    if not frames:
        raise ValueError("empty story: expected at least one frame line (after the '---' line, if any)")
    return Story(characters=defined, frames=frames)


def load_story(
    path: str | os.PathLike[str], characters: str | None = None, *, known: dict[str, str] | None = None
) -> Story:
    """Read a UTF-8 story file and parse it (``parse_story``); every error names the file."""
    name = os.fspath(path)
    try:
        with open(path, encoding="utf-8-sig") as handle:  # a byte-order mark (Windows editors) is no text
            text = handle.read()
    except FileNotFoundError:
        raise FileNotFoundError(f"story file not found: {name}") from None
    except UnicodeDecodeError as error:
        raise ValueError(
            f"{name} is not a UTF-8 text file (byte 0x{error.object[error.start]:02x} at offset "
            f"{error.start}); save the story as UTF-8 text"
        ) from None
    except OSError as error:
        raise ValueError(f"cannot read story file {name}: {error.strerror or error}") from None
    try:
        return parse_story(text, characters, known=known)
    except ValueError as error:
        raise ValueError(f"{os.fspath(path)}: {error}") from error


def story_source(story: Story) -> str:
    """Story text that parses back to ``story`` (stored in run metadata so a run can be resumed from it)."""
    lines = [f"[{c.name}] {c.description}" for c in story.characters.values()]
    if lines:
        lines.append(SEPARATOR)
    for frame in story.frames:
        text = frame.text if frame.characters or "[NC]" in frame.text else f"[{NO_CHARACTER}] {frame.text}"
        # a '#' inside the text needs a trailing (empty) caption marker, or its tail would read as caption
        marker = "#" in text or frame.caption == ""
        lines.append(text + (f" #{frame.caption}" if frame.caption else " #" if marker else ""))
    return "\n".join(lines) + "\n"
