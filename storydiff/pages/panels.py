"""Drawing comic panels with Pillow: caption text (wrapped, in a band or an overlay box), borders, and the
argument checks every page layout shares (``comic.py`` lays pages out from these).

Captions (``CAPTION_STYLES``): ``band``, a white band (below the picture, or inside the panel's bottom
edge), or ``overlay``, a semi-transparent white box over the bottom of the panel as in the official app.
The font for a caption text is fixed (``fonts.py``: DejaVu Sans, or a font that covers the caption's
script, or ``font``), so a panel can be compared pixel for pixel.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from PIL import Image, ImageDraw, ImageFont

from .fonts import font_for

Font = ImageFont.FreeTypeFont | ImageFont.ImageFont

WHITE = (255, 255, 255)
BLACK = (0, 0, 0)

CAPTION_STYLES = ("band", "overlay")

#: Opacity of the white box under an overlay caption: the official app's 200 of 255.
OVERLAY_OPACITY = 200 / 255


def default_font_size(width: int) -> int:
    # About 20 characters' worth of height per line width reads well from thumbnails to 1024-px panels.
    return max(10, min(48, round(width / 20)))


def line_height(font: Font) -> int:
    if isinstance(font, ImageFont.FreeTypeFont):
        ascent, descent = font.getmetrics()
        return ascent + descent
    return int(font.getbbox("Ag")[3]) + 2  # bitmap font: no metrics, measure a tall and a deep glyph


def wrap(text: str, font: Font, width: int) -> list[str]:
    """Greedy word wrap to ``width`` px; words longer than a line are broken between characters."""
    lines: list[str] = []
    for paragraph in text.splitlines() or [""]:
        line = ""
        for word in paragraph.split():
            candidate = f"{line} {word}" if line else word
            if font.getlength(candidate) <= width:
                line = candidate
                continue
            if line:
                lines.append(line)
            # The word alone does not fit: cut it into pieces that do (at least one character each).
            while font.getlength(word) > width and len(word) > 1:
                cut = len(word) - 1
                while cut > 1 and font.getlength(word[:cut]) > width:
                    cut -= 1
                lines.append(word[:cut])
                word = word[cut:]
            line = word
        lines.append(line)
    return lines


def draw_lines(image: Image.Image, lines: Sequence[str], font: Font, top: int, pad: int) -> None:
    """Draw ``lines`` in black, each centred horizontally, starting ``pad`` px below ``top``."""
    draw = ImageDraw.Draw(image)
    height = line_height(font)
    for i, line in enumerate(lines):
        x = (image.width - font.getlength(line)) / 2
        draw.text((round(x), top + pad + i * height), line, fill=BLACK, font=font)


def captioned(
    image: Image.Image, caption: str | None, *, font_size: int | None = None, font: str | None = None
) -> Image.Image:
    """A new RGB image: ``image`` with ``caption`` in a white band below it (a plain copy if no caption).

    The caption is word-wrapped to the image width and the band is just tall enough for it, at most three
    times the image's larger side (a longer caption ends in "..."). The default
    font size is about width / 20, clamped to [10, 48] px; ``font``: a font file instead of the default.
    """
    picture = image.convert("RGB")  # always a new image, so callers may draw on the result
    if caption is None or not caption.strip():
        return picture
    face = font_for(caption, font_size or default_font_size(picture.width), font)
    pad = max(4, round(face.size / 2))
    # at most three times the picture's larger side: a longer caption is cut, "..." marking the cut
    max_lines = max(8, 3 * max(picture.size) // line_height(face))
    lines = fit_lines(caption.strip(), face, picture.width - 2 * pad, max_lines)
    band = len(lines) * line_height(face) + 2 * pad
    result = Image.new("RGB", (picture.width, picture.height + band), WHITE)
    result.paste(picture, (0, 0))
    band_image = Image.new("RGB", (picture.width, band), WHITE)
    draw_lines(band_image, lines, face, 0, pad)
    result.paste(band_image, (0, picture.height))
    return result


def fit_lines(text: str, font: Font, width: int, max_lines: int) -> list[str]:
    """``text`` wrapped to ``width`` px, cut to ``max_lines`` lines with "..." marking the cut."""
    limit = (max_lines + 1) * max(1, width)  # a character is at least a pixel wide: the rest cannot show
    lines = wrap(text[:limit], font, max(1, width))
    if len(lines) > max_lines:
        lines = lines[:max_lines]
        last = lines[-1]
        while last and font.getlength(last + "...") > width:
            last = last[:-1]
        lines[-1] = last.rstrip() + "..."
    return lines


def caption_inside(panel: Image.Image, caption: str | None, font_size: int, font: str | None) -> None:
    """Draw ``caption`` in a white band over the bottom of ``panel`` (in place), at most half its height."""
    if caption is None or not caption.strip():
        return
    font = font_for(caption, font_size, font)
    pad = max(3, font_size // 3)
    height = line_height(font)
    # A caption must not hide the picture: keep what fits in half the panel and mark the cut with "...".
    max_lines = max(1, (panel.height // 2 - 2 * pad) // height)
    lines = fit_lines(caption.strip(), font, panel.width - 2 * pad, max_lines)
    band = len(lines) * height + 2 * pad
    band_image = Image.new("RGB", (panel.width, band), WHITE)
    draw_lines(band_image, lines, font, 0, pad)
    top = panel.height - band
    panel.paste(band_image, (0, top))
    ImageDraw.Draw(panel).line([(0, top), (panel.width, top)], fill=BLACK, width=max(1, font_size // 12))


def caption_overlay(panel: Image.Image, caption: str | None, font_size: int, font: str | None) -> None:
    """Draw ``caption`` over the bottom of ``panel`` (in place), as the official app does: black text on a
    semi-transparent white box that hugs the text, centred a padding above the bottom edge. The box and
    that gap take at most about a third of the panel; longer text is cut with "..."."""
    if caption is None or not caption.strip():
        return
    face = font_for(caption, font_size, font)
    pad = max(3, font_size // 3)
    height = line_height(face)
    max_lines = max(1, (panel.height // 3 - 3 * pad) // height)
    lines = fit_lines(caption.strip(), face, panel.width - 4 * pad, max_lines)
    box_w = min(panel.width, math.ceil(max(face.getlength(line) for line in lines)) + 2 * pad)
    box_h = min(panel.height, len(lines) * height + 2 * pad)
    left, top = (panel.width - box_w) // 2, max(0, panel.height - pad - box_h)
    box = (left, top, left + box_w, top + box_h)
    region = panel.crop(box)
    panel.paste(Image.blend(region, Image.new("RGB", region.size, WHITE), OVERLAY_OPACITY), box[:2])
    draw_lines(panel, lines, face, top, pad)


def check_caption_style(caption_style: str | None) -> None:
    if caption_style is not None and caption_style not in CAPTION_STYLES:
        raise ValueError(
            f"unknown caption_style {caption_style!r}; expected one of: {', '.join(CAPTION_STYLES)}"
        )


def draw_caption(
    panel: Image.Image, caption: str | None, style: str, font_size: int, font: str | None
) -> None:
    """A caption drawn over ``panel`` (in place): a white band inside it, or an overlay."""
    draw = caption_overlay if style == "overlay" else caption_inside
    draw(panel, caption, font_size, font)


def check_inputs(images: Sequence[Image.Image], captions: Sequence[str | None]) -> None:
    if len(images) != len(captions):
        raise ValueError(
            f"images and captions must have the same length, got {len(images)} images and "
            f"{len(captions)} captions (use None for a panel without caption)"
        )


def check_non_negative(**values: int) -> None:
    for name, value in values.items():
        if value < 0:
            raise ValueError(f"{name} must be >= 0, got {value}")


def bordered(page: Image.Image, panel: Image.Image, x: int, y: int, border: int) -> None:
    """Paste ``panel`` with its top-left corner ``border`` px inside (x, y) and frame it in black."""
    page.paste(panel, (x + border, y + border))
    if border:
        right, bottom = x + panel.width + 2 * border - 1, y + panel.height + 2 * border - 1
        ImageDraw.Draw(page).rectangle((x, y, right, bottom), outline=BLACK, width=border)
