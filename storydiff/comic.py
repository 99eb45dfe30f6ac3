"""Comic pages from story frames: captioned panels laid out on white pages, with Pillow only.

Three layouts. ``official`` follows the "Classic Comic" typesetting of the official StoryDiffusion app:
rows of full-size panels and columns of two stacked half-size panels, in a seeded order, on one tall
page (see ``official_pages``). ``grid`` and ``classic`` are this project's own: ``grid`` is rows × cols
of equal cells (the "four panel" page at 2 × 2), ``classic`` rows of 1, 2 or 3 panels in a repeating
pattern, each panel centre-cropped to its cell.

Captions (``CAPTION_STYLES``): ``band``, a white band (below the picture on a grid, inside the panel's
bottom edge on the other layouts) or ``overlay``, a semi-transparent white box over the bottom of the
panel as in the official app. Each layout has its own default: band for grid and classic, overlay for
official.

Everything is deterministic — the official layout's only randomness comes from its ``seed``, through a
local ``random.Random``; the font for a caption text is fixed (``fonts.py``: DejaVu Sans, or a font that
covers the caption's script, or ``font``) — so a page can be compared pixel for pixel in tests and
regenerated identically from the same frames.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from PIL import Image, ImageDraw, ImageFont, ImageOps

from .fonts import font_for

Font = ImageFont.FreeTypeFont | ImageFont.ImageFont

WHITE = (255, 255, 255)
BLACK = (0, 0, 0)

#: Panels per row of a classic page, repeated page after page: a two-shot, a wide shot, three close-ups.
CLASSIC_PATTERN = (2, 1, 3)

LAYOUTS = ("grid", "classic", "official")

CAPTION_STYLES = ("band", "overlay")

#: Opacity of the white box under an overlay caption: the official app's 200 of 255.
OVERLAY_OPACITY = 200 / 255


def _default_font_size(width: int) -> int:
    # About 20 characters' worth of height per line width reads well from thumbnails to 1024-px panels.
    return max(10, min(48, round(width / 20)))


def _line_height(font: Font) -> int:
    if isinstance(font, ImageFont.FreeTypeFont):
        ascent, descent = font.getmetrics()
        return ascent + descent
    return int(font.getbbox("Ag")[3]) + 2  # bitmap font: no metrics, measure a tall and a deep glyph


def _wrap(text: str, font: Font, width: int) -> list[str]:
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


def _draw_lines(image: Image.Image, lines: Sequence[str], font: Font, top: int, pad: int) -> None:
    """Draw ``lines`` in black, each centred horizontally, starting ``pad`` px below ``top``."""
    draw = ImageDraw.Draw(image)
    height = _line_height(font)
    for i, line in enumerate(lines):
        x = (image.width - font.getlength(line)) / 2
        draw.text((round(x), top + pad + i * height), line, fill=BLACK, font=font)


def captioned(
    image: Image.Image, caption: str | None, *, font_size: int | None = None, font: str | None = None
) -> Image.Image:
    """A new RGB image: ``image`` with ``caption`` in a white band below it (a plain copy if no caption).

    The caption is word-wrapped to the image width and the band is just tall enough for it. The default
    font size is about width / 20, clamped to [10, 48] px; ``font``: a font file instead of the default.
    """
    picture = image.convert("RGB")  # always a new image, so callers may draw on the result
    if caption is None or not caption.strip():
        return picture
    face = font_for(caption, font_size or _default_font_size(picture.width), font)
    pad = max(4, round(face.size / 2))
    lines = _wrap(caption.strip(), face, max(1, picture.width - 2 * pad))
    band = len(lines) * _line_height(face) + 2 * pad
    result = Image.new("RGB", (picture.width, picture.height + band), WHITE)
    result.paste(picture, (0, 0))
    band_image = Image.new("RGB", (picture.width, band), WHITE)
    _draw_lines(band_image, lines, face, 0, pad)
    result.paste(band_image, (0, picture.height))
    return result


def _fit_lines(text: str, font: Font, width: int, max_lines: int) -> list[str]:
    """``text`` wrapped to ``width`` px, cut to ``max_lines`` lines with "..." marking the cut."""
    lines = _wrap(text, font, max(1, width))
    if len(lines) > max_lines:
        lines = lines[:max_lines]
        last = lines[-1]
        while last and font.getlength(last + "...") > width:
            last = last[:-1]
        lines[-1] = last.rstrip() + "..."
    return lines


def _caption_inside(panel: Image.Image, caption: str | None, font_size: int, font: str | None) -> None:
    """Draw ``caption`` in a white band over the bottom of ``panel`` (in place), at most half its height."""
    if caption is None or not caption.strip():
        return
    font = font_for(caption, font_size, font)
    pad = max(3, font_size // 3)
    height = _line_height(font)
    # A caption must not hide the picture: keep what fits in half the panel and mark the cut with "...".
    max_lines = max(1, (panel.height // 2 - 2 * pad) // height)
    lines = _fit_lines(caption.strip(), font, panel.width - 2 * pad, max_lines)
    band = len(lines) * height + 2 * pad
    band_image = Image.new("RGB", (panel.width, band), WHITE)
    _draw_lines(band_image, lines, font, 0, pad)
    top = panel.height - band
    panel.paste(band_image, (0, top))
    ImageDraw.Draw(panel).line([(0, top), (panel.width, top)], fill=BLACK, width=max(1, font_size // 12))


def _caption_overlay(panel: Image.Image, caption: str | None, font_size: int, font: str | None) -> None:
    """Draw ``caption`` over the bottom of ``panel`` (in place), as the official app does: black text on a
    semi-transparent white box that hugs the text, centred a padding above the bottom edge. The box and
    that gap take at most about a third of the panel; longer text is cut with "..."."""
    if caption is None or not caption.strip():
        return
    face = font_for(caption, font_size, font)
    pad = max(3, font_size // 3)
    height = _line_height(face)
    max_lines = max(1, (panel.height // 3 - 3 * pad) // height)
    lines = _fit_lines(caption.strip(), face, panel.width - 4 * pad, max_lines)
    box_w = min(panel.width, math.ceil(max(face.getlength(line) for line in lines)) + 2 * pad)
    box_h = min(panel.height, len(lines) * height + 2 * pad)
    left, top = (panel.width - box_w) // 2, max(0, panel.height - pad - box_h)
    box = (left, top, left + box_w, top + box_h)
    region = panel.crop(box)
    panel.paste(Image.blend(region, Image.new("RGB", region.size, WHITE), OVERLAY_OPACITY), box[:2])
    _draw_lines(panel, lines, face, top, pad)


def _check_caption_style(caption_style: str | None) -> None:
    if caption_style is not None and caption_style not in CAPTION_STYLES:
        raise ValueError(
            f"unknown caption_style {caption_style!r}; expected one of: {', '.join(CAPTION_STYLES)}"
        )


def _draw_caption(
    panel: Image.Image, caption: str | None, style: str, font_size: int, font: str | None
) -> None:
    """A caption drawn over ``panel`` (in place): a white band inside it, or an overlay."""
    draw = _caption_overlay if style == "overlay" else _caption_inside
    draw(panel, caption, font_size, font)


def _check_inputs(images: Sequence[Image.Image], captions: Sequence[str | None]) -> None:
    if len(images) != len(captions):
        raise ValueError(
            f"images and captions must have the same length, got {len(images)} images and "
            f"{len(captions)} captions (use None for a panel without caption)"
        )


def _check_non_negative(**values: int) -> None:
    for name, value in values.items():
        if value < 0:
            raise ValueError(f"{name} must be >= 0, got {value}")


def _bordered(page: Image.Image, panel: Image.Image, x: int, y: int, border: int) -> None:
    """Paste ``panel`` with its top-left corner ``border`` px inside (x, y) and frame it in black."""
    page.paste(panel, (x + border, y + border))
    if border:
        right, bottom = x + panel.width + 2 * border - 1, y + panel.height + 2 * border - 1
        ImageDraw.Draw(page).rectangle((x, y, right, bottom), outline=BLACK, width=border)


def grid_pages(
    images: Sequence[Image.Image],
    captions: Sequence[str | None],
    *,
    rows: int = 2,
    cols: int = 2,
    gutter: int = 16,
    margin: int = 24,
    border: int = 3,
    font_size: int | None = None,
    font: str | None = None,
    caption_style: str | None = None,
) -> list[Image.Image]:
    """Captioned panels in a ``rows`` × ``cols`` grid, as many pages as needed, in reading order.

    All cells (and so all pages) share one size: the largest captioned panel. Each panel is framed
    tightly (its picture and its caption, if any), top-aligned and centred in its cell, so an uncaptioned
    panel gets no empty caption box. The last page keeps the full page size and leaves its unused cells
    blank. ``caption_style``: "band" (the default) puts a caption in a white band below its picture,
    "overlay" over the picture's bottom (the panel keeps the picture's size).
    """
    _check_inputs(images, captions)
    _check_caption_style(caption_style)
    if rows < 1 or cols < 1:
        raise ValueError(f"rows and cols must be >= 1, got rows={rows}, cols={cols}")
    _check_non_negative(gutter=gutter, margin=margin, border=border)
    if not images:
        return []
    if caption_style == "overlay":
        panels = [image.convert("RGB") for image in images]
        for panel, caption in zip(panels, captions, strict=True):
            _caption_overlay(panel, caption, font_size or _default_font_size(panel.width), font)
    else:
        panels = [
            captioned(image, caption, font_size=font_size, font=font)
            for image, caption in zip(images, captions, strict=True)
        ]
    inner_w = max(panel.width for panel in panels)
    inner_h = max(panel.height for panel in panels)
    cell_w, cell_h = inner_w + 2 * border, inner_h + 2 * border
    page_size = (
        2 * margin + cols * cell_w + (cols - 1) * gutter,
        2 * margin + rows * cell_h + (rows - 1) * gutter,
    )

    per_page = rows * cols
    pages = []
    for start in range(0, len(panels), per_page):
        page = Image.new("RGB", page_size, WHITE)
        for slot, panel in enumerate(panels[start : start + per_page]):
            row, col = divmod(slot, cols)
            x = margin + col * (cell_w + gutter) + (inner_w - panel.width) // 2
            _bordered(page, panel, x, margin + row * (cell_h + gutter), border)
        pages.append(page)
    return pages


def _split(total: int, parts: int) -> list[int]:
    """``total`` px split into ``parts`` widths differing by at most 1, so a row fills its width exactly."""
    base, extra = divmod(total, parts)
    return [base + (1 if i < extra else 0) for i in range(parts)]


def classic_pages(
    images: Sequence[Image.Image],
    captions: Sequence[str | None],
    *,
    pattern: Sequence[int] = CLASSIC_PATTERN,
    page_width: int | None = None,
    row_height: int | None = None,
    gutter: int = 16,
    margin: int = 24,
    border: int = 3,
    font_size: int | None = None,
    font: str | None = None,
    caption_style: str | None = None,
) -> list[Image.Image]:
    """A classic comic layout: rows of 1, 2 or 3 panels following ``pattern``, one pattern per page.

    Each panel is centre-cropped to its cell's aspect ratio and resized to fill it; the caption sits in a
    white band inside the panel's bottom edge ("band", the default ``caption_style``) or in a box over it
    ("overlay"). By default a two-panel row shows the first image at about
    its native size (page width = two images plus gutter and margins; row height keeps that cell's aspect
    ratio), a one-panel row becomes a wide shot and a three-panel row tall close-ups. Every page has the
    same width; the last page holds only the rows it needs (its last row may hold fewer panels than the
    pattern says, and those panels share the full row width).
    """
    _check_inputs(images, captions)
    _check_caption_style(caption_style)
    if not pattern or any(count < 1 for count in pattern):
        raise ValueError(f"pattern must be a non-empty sequence of panel counts >= 1, got {list(pattern)}")
    _check_non_negative(gutter=gutter, margin=margin, border=border)
    if not images:
        return []

    first_w, first_h = images[0].size
    if page_width is None:
        page_width = 2 * margin + 2 * (first_w + 2 * border) + gutter
    inner = page_width - 2 * margin
    widest_row = max(pattern)
    min_cell = (inner - (widest_row - 1) * gutter) // widest_row
    if min_cell <= 2 * border:
        raise ValueError(f"page_width={page_width} is too small for {widest_row} panels in a row")
    if row_height is None:
        two_cell = (inner - gutter) // 2 - 2 * border
        row_height = round(two_cell * first_h / first_w) + 2 * border
    if row_height <= 2 * border:
        raise ValueError(f"row_height must exceed twice the border ({2 * border}), got {row_height}")
    size = font_size or _default_font_size((inner - gutter) // 2)

    pages = []
    position = 0
    while position < len(images):
        layout_rows: list[int] = []
        for count in pattern:
            if position >= len(images):
                break
            taken = min(count, len(images) - position)
            layout_rows.append(taken)
            position += taken
        height = 2 * margin + len(layout_rows) * row_height + (len(layout_rows) - 1) * gutter
        page = Image.new("RGB", (page_width, height), WHITE)
        first = position - sum(layout_rows)
        for row, count in enumerate(layout_rows):
            y = margin + row * (row_height + gutter)
            x = margin
            for width in _split(inner - (count - 1) * gutter, count):
                image, caption = images[first], captions[first]
                first += 1
                target = (width - 2 * border, row_height - 2 * border)
                panel = ImageOps.fit(image.convert("RGB"), target, method=Image.Resampling.LANCZOS)
                _draw_caption(panel, caption, caption_style or "band", size, font)
                _bordered(page, panel, x, y, border)
                x += width + gutter
        pages.append(page)
    return pages


def _official_row_sizes(count: int) -> list[int]:
    """Frames per row: 4 per row for up to 8 frames, else 4 and 6 alternately (the official app's rule),
    except that no last row is left with only one or two frames: a 4-row that would leave 1 or 2 frames
    takes them too (5 or 6 frames), a 6-row that would leave 1 or 2 takes 4 instead (leaving 3 or 4)."""
    cycle = (4,) if count <= 8 else (4, 6)
    sizes: list[int] = []
    remaining = count
    while remaining > 0:
        size = cycle[len(sizes) % len(cycle)]
        if remaining - size in (1, 2):
            size = remaining if size == 4 else 4
        size = min(size, remaining)
        sizes.append(size)
        remaining -= size
    return sizes


def official_arrangement(count: int, seed: int = 0) -> list[tuple[int, ...]]:
    """The rows of an ``official`` page of ``count`` frames: each row's columns from left to right, 1 for a
    full-size panel and 2 for a column of two stacked half-size panels; frames fill them in order.

    A row of 4 frames is [1, 1, 2] and a row of 6 is [1, 1, 2, 2], as in the official app; the other rows
    (see ``_official_row_sizes``: 1, 2 or 3 frames in a story that short or at its end, 5 at the end) keep
    as many stacks as they can fill and the rest are full panels: [1], [1, 1], [1, 1, 1], [1, 1, 1, 2].
    Each row's columns are shuffled by ``random.Random(seed)``, row after row.
    """
    if count < 0:
        raise ValueError(f"count must be >= 0, got {count}")
    rng = random.Random(seed)
    rows = []
    for size in _official_row_sizes(count):
        stacks = (size - 2) // 2 if size >= 4 else 0
        kinds = [1] * (size - 2 * stacks) + [2] * stacks
        rng.shuffle(kinds)
        rows.append(tuple(kinds))
    return rows


@dataclass(frozen=True)
class _Placement:
    """Where one frame goes in its row: the top-left of its framed box (x from the left margin, y from
    the row's top), its picture size inside the border, and whether it is a full panel (captioned)."""

    index: int
    x: int
    y: int
    width: int
    height: int
    full: bool


def _apportion(ideal: Sequence[float], total: int) -> list[int]:
    """Integers, each the floor or ceiling of its ``ideal`` (which sum to ``total``), summing to ``total``:
    the pixels left after flooring go to the largest fractions (the largest-remainder method)."""
    floors = [math.floor(value) for value in ideal]
    left = total - sum(floors)
    by_fraction = sorted(range(len(ideal)), key=lambda k: (floors[k] - ideal[k], k))
    for k in by_fraction[: max(0, left)]:
        floors[k] += 1
    return floors


def _picture_widths(
    columns: Sequence[tuple[int, ...]], aspects: Sequence[float], height: float, gutter: int, border: int
) -> list[float]:
    """Each column's picture width when a row's full pictures are ``height`` px high.

    A stacked picture is then height/2 - border - gutter/2 high (two of them, their borders and the gutter
    between them fill the row) and a stack is as wide as its wider picture.
    """
    half = height / 2 - border - gutter / 2
    return [max(aspects[i] for i in column) * (height if len(column) == 1 else half) for column in columns]


def _row_width(pictures: Sequence[float], gutter: int, border: int) -> float:
    return sum(pictures) + len(pictures) * 2 * border + (len(pictures) - 1) * gutter


def _plan_row(
    columns: Sequence[tuple[int, ...]], aspects: Sequence[float], inner: int, gutter: int, border: int
) -> tuple[int, list[_Placement]]:
    """The row's height and its frames' placements so that the row is exactly ``inner`` px wide.

    Every picture keeps its aspect ratio, so the row's width is linear in its full pictures' height:
    solve for that height, then round the column widths so that they add up exactly.
    """
    count = len(columns)
    fixed = count * 2 * border + (count - 1) * gutter  # borders and gutters
    # The pictures' total width is affine in the height: at0 + height * (at1 - at0).
    at0 = sum(_picture_widths(columns, aspects, 0.0, gutter, border))
    at1 = sum(_picture_widths(columns, aspects, 1.0, gutter, border))
    height = (inner - fixed - at0) / (at1 - at0)
    row_height = round(height) + 2 * border
    half_height = (row_height - gutter) // 2 - 2 * border
    ideal = _picture_widths(columns, aspects, height, gutter, border)
    stacked = any(len(column) == 2 for column in columns)
    if min(ideal) < 1 or round(height) < 1 or (stacked and half_height < 1):
        raise ValueError(
            f"a row of {count} columns does not fit in {inner} px between the margins "
            f"(gutter={gutter}, border={border}); use a larger page_width or smaller gutter and border"
        )
    placements = []
    x = 0
    for width, column in zip(_apportion(ideal, inner - fixed), columns, strict=True):
        if len(column) == 1:
            placements.append(_Placement(column[0], x, 0, width, row_height - 2 * border, True))
        else:
            widest = max(aspects[i] for i in column)
            for k, index in enumerate(column):
                # The wider picture fills the column; a narrower one keeps its aspect ratio, centred.
                picture = width
                if aspects[index] != widest:
                    picture = max(1, min(width, round(aspects[index] * half_height)))
                y = 0 if k == 0 else row_height - half_height - 2 * border  # bottom one flush with the row
                placements.append(
                    _Placement(index, x + (width - picture) // 2, y, picture, half_height, False)
                )
        x += width + 2 * border + gutter
    return row_height, placements


def official_pages(
    images: Sequence[Image.Image],
    captions: Sequence[str | None],
    *,
    seed: int = 0,
    page_width: int | None = None,
    rows_per_page: int | None = None,
    gutter: int = 16,
    margin: int = 24,
    border: int = 3,
    font_size: int | None = None,
    font: str | None = None,
    caption_style: str | None = None,
) -> list[Image.Image]:
    """The official app's "Classic Comic" page: rows of full panels and stacks of two half-size panels.

    Rows follow ``official_arrangement(len(images), seed)`` (the same frames and seed give the same page,
    pixel for pixel); frames fill them in order, a stack's top panel before its bottom one, and frames
    never repeat nor does a blank pad panel appear. Every picture keeps its aspect ratio (resized, and
    centre-cropped by at most a pixel or two of rounding). Every row is as wide as the page: by default
    the narrowest row at the frames' own size (the first frame's height for its full panels) and the
    wider rows scaled down to it, as the official app does. Stacked half panels carry no caption (theirs
    is dropped, as in the official app); a full panel's caption is an overlay box by default
    (``caption_style="band"``: a white band inside the panel's bottom edge).

    All rows go on one tall page, as in the official app; ``rows_per_page`` splits it into pages of that
    many rows instead (all the same width), for stories long enough that one page gets unwieldy.
    """
    _check_inputs(images, captions)
    _check_caption_style(caption_style)
    _check_non_negative(gutter=gutter, margin=margin, border=border)
    if rows_per_page is not None and rows_per_page < 1:
        raise ValueError(f"rows_per_page must be >= 1 or None (one page), got {rows_per_page}")
    if not images:
        return []

    rows: list[list[tuple[int, ...]]] = []  # per row, per column: the indices of its frames
    first = 0
    for kinds in official_arrangement(len(images), seed):
        row = []
        for kind in kinds:
            row.append(tuple(range(first, first + kind)))
            first += kind
        rows.append(row)
    aspects = [image.width / image.height for image in images]
    if page_width is None:
        natural = (
            _row_width(_picture_widths(row, aspects, images[0].height, gutter, border), gutter, border)
            for row in rows
        )
        inner = math.floor(min(natural))
    else:
        inner = page_width - 2 * margin
    plans = [_plan_row(row, aspects, inner, gutter, border) for row in rows]
    size = font_size or _default_font_size(
        min(place.width for _, placements in plans for place in placements if place.full)
    )

    pages = []
    per_page = rows_per_page or len(plans)
    for start in range(0, len(plans), per_page):
        chunk = plans[start : start + per_page]
        height = 2 * margin + sum(row_height for row_height, _ in chunk) + (len(chunk) - 1) * gutter
        page = Image.new("RGB", (inner + 2 * margin, height), WHITE)
        top = margin
        for row_height, placements in chunk:
            for place in placements:
                picture = images[place.index].convert("RGB")
                panel = ImageOps.fit(picture, (place.width, place.height), method=Image.Resampling.LANCZOS)
                if place.full:
                    _draw_caption(panel, captions[place.index], caption_style or "overlay", size, font)
                _bordered(page, panel, margin + place.x, top + place.y, border)
            top += row_height + gutter
        pages.append(page)
    return pages


_LAYOUT_FUNCTIONS: dict[str, Callable[..., list[Image.Image]]] = {
    "grid": grid_pages,
    "classic": classic_pages,
    "official": official_pages,
}

#: Layouts whose arrangement depends on a seed.
_SEEDED_LAYOUTS = frozenset({"official"})


def make_pages(
    images: Sequence[Image.Image],
    captions: Sequence[str | None],
    layout: str = "grid",
    *,
    seed: int = 0,
    caption_style: str | None = None,
    font: str | None = None,
    **options: object,
) -> list[Image.Image]:
    """Comic pages in ``layout`` (one of ``LAYOUTS``); ``options`` go to that layout's function.

    ``seed`` goes only to the layouts that use one (official); ``caption_style`` (one of
    ``CAPTION_STYLES``, None for the layout's own) and ``font`` (a font file, None for the default) to all.
    """
    function = _LAYOUT_FUNCTIONS.get(layout)
    if function is None:
        raise ValueError(f"unknown comic layout {layout!r}; expected one of: {', '.join(LAYOUTS)}")
    _check_caption_style(caption_style)
    _check_inputs(images, captions)
    if not images:
        return []
    if layout in _SEEDED_LAYOUTS:
        options["seed"] = seed
    return function(images, captions, caption_style=caption_style, font=font, **options)
