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

from collections.abc import Callable, Sequence

from PIL import Image, ImageOps

from .comic_official import official_arrangement, official_pages
from .panels import (
    CAPTION_STYLES,
    OVERLAY_OPACITY,
    WHITE,
    bordered,
    caption_overlay,
    captioned,
    check_caption_style,
    check_inputs,
    check_non_negative,
    default_font_size,
    draw_caption,
)

__all__ = [
    "CAPTION_STYLES",
    "CLASSIC_PATTERN",
    "LAYOUTS",
    "OVERLAY_OPACITY",
    "captioned",
    "classic_pages",
    "grid_pages",
    "make_pages",
    "official_arrangement",
    "official_pages",
]

#: Panels per row of a classic page, repeated page after page: a two-shot, a wide shot, three close-ups.
CLASSIC_PATTERN = (2, 1, 3)

LAYOUTS = ("grid", "classic", "official")


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
    check_inputs(images, captions)
    check_caption_style(caption_style)
    if rows < 1 or cols < 1:
        raise ValueError(f"rows and cols must be >= 1, got rows={rows}, cols={cols}")
    check_non_negative(gutter=gutter, margin=margin, border=border)
    if not images:
        return []
    if caption_style == "overlay":
        panels = [image.convert("RGB") for image in images]
        for panel, caption in zip(panels, captions, strict=True):
            caption_overlay(panel, caption, font_size or default_font_size(panel.width), font)
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
            bordered(page, panel, x, margin + row * (cell_h + gutter), border)
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
    check_inputs(images, captions)
    check_caption_style(caption_style)
    if not pattern or any(count < 1 for count in pattern):
        raise ValueError(f"pattern must be a non-empty sequence of panel counts >= 1, got {list(pattern)}")
    check_non_negative(gutter=gutter, margin=margin, border=border)
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
    size = font_size or default_font_size((inner - gutter) // 2)

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
                draw_caption(panel, caption, caption_style or "band", size, font)
                bordered(page, panel, x, y, border)
                x += width + gutter
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
    check_caption_style(caption_style)
    check_inputs(images, captions)
    if not images:
        return []
    if layout in _SEEDED_LAYOUTS:
        options["seed"] = seed
    return function(images, captions, caption_style=caption_style, font=font, **options)
