"""Fonts for captions: one that covers the caption's characters, never boxes where letters should be.

Pillow's built-in font has ASCII glyphs only (``é`` draws as a box). The default is DejaVu Sans (free
licence; Latin with its accents, Greek, Cyrillic), the copy that matplotlib — a dependency — ships in its
package data. Text it cannot draw (CJK, for one) gets a system font found by fontconfig that covers it;
``font`` (``--font PATH``) chooses any TrueType/OpenType file instead.
"""

from __future__ import annotations

import functools
import shutil
import subprocess
import warnings
from pathlib import Path

from PIL import ImageFont


def default_font_path() -> Path:
    import matplotlib

    return Path(matplotlib.get_data_path()) / "fonts" / "ttf" / "DejaVuSans.ttf"


@functools.cache
def _coverage(path: str) -> frozenset[int]:
    """Code points the font at ``path`` has glyphs for (its best Unicode cmap)."""
    from fontTools.ttLib import TTFont

    with TTFont(path, fontNumber=0, lazy=True) as font:
        return frozenset(font.getBestCmap() or {})


def check_font(path: str | Path) -> Path:
    """``path`` if Pillow can draw with it; ValueError naming it otherwise."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise ValueError(f"font file not found: {path}")
    try:
        ImageFont.truetype(str(path), 12)
    except OSError as exc:
        raise ValueError(f"{path} is not a TrueType/OpenType font Pillow can use ({exc})") from None
    return path


def _missing(path: Path, text: str) -> set[str]:
    covered = _coverage(str(path))
    return {ch for ch in text if not ch.isspace() and ord(ch) not in covered}


@functools.cache
def _system_font_for(chars: str) -> Path | None:
    """A font file fontconfig finds that covers every character of ``chars``, or None."""
    if shutil.which("fc-match") is None:
        return None
    charset = " ".join(f"{ord(ch):x}" for ch in chars)
    try:
        found = subprocess.run(
            ["fc-match", "--format=%{file}", f":charset={charset}"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
    if not found or not Path(found).is_file():
        return None
    try:
        return Path(found) if not _missing(Path(found), chars) else None
    except Exception:  # fontconfig may name a format fontTools cannot read (e.g. bitmap fonts)
        return None


def font_for(text: str, size: int, font: str | Path | None = None) -> ImageFont.FreeTypeFont:
    """A font at ``size`` px that draws ``text``: ``font`` if given, else DejaVu Sans, else a system font
    that covers what DejaVu lacks (with a warning naming ``--font`` when none does)."""
    if font is not None:
        return ImageFont.truetype(str(check_font(font)), size)
    path = default_font_path()
    missing = _missing(path, text)
    if missing:
        chars = "".join(sorted(missing))
        system = _system_font_for(chars)
        if system is not None:
            path = system
        else:
            warnings.warn(
                f"no installed font covers {chars!r}; those characters draw as boxes. Pass a font that "
                "has them with --font PATH (e.g. Noto Sans CJK for Chinese, Japanese, Korean)",
                RuntimeWarning,
                stacklevel=2,
            )
    return ImageFont.truetype(str(path), size)
