"""The official StoryDiffusion app's "Classic Comic" page: rows of full-size panels and columns of two
stacked half-size panels, in an order shuffled by a seed (a local ``random.Random``), on one tall page.
``comic.make_pages(..., layout="official")`` reaches it; ``panels.py`` draws the captions and borders.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass

from PIL import Image, ImageOps

from .panels import (
    WHITE,
    bordered,
    check_caption_style,
    check_inputs,
    check_non_negative,
    default_font_size,
    draw_caption,
)


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
    check_inputs(images, captions)
    check_caption_style(caption_style)
    check_non_negative(gutter=gutter, margin=margin, border=border)
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
    size = font_size or default_font_size(
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
                    draw_caption(panel, captions[place.index], caption_style or "overlay", size, font)
                bordered(page, panel, margin + place.x, top + place.y, border)
            top += row_height + gutter
        pages.append(page)
    return pages
