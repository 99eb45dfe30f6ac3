"""Comic pages from story frames: captioned panels laid out on white pages, with Pillow only.

Two layouts, as in the official UI: ``grid`` (rows × cols of equal cells, the "four panel" page at 2 × 2)
and ``classic`` (rows of 1, 2 or 3 panels in a repeating pattern, each panel centre-cropped to its cell).
Everything is deterministic — no randomness, a fixed font for the same caption text (``fonts.py``: DejaVu
Sans, or a font that covers the caption's script, or ``font``) — so a page can be compared pixel for pixel
in tests and regenerated identically from the same frames.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from PIL import Image, ImageDraw, ImageFont, ImageOps

from .fonts import font_for

Font = ImageFont.FreeTypeFont | ImageFont.ImageFont

WHITE = (255, 255, 255)
BLACK = (0, 0, 0)

#: Panels per row of a classic page, repeated page after page: a two-shot, a wide shot, three close-ups.
CLASSIC_PATTERN = (2, 1, 3)

LAYOUTS = ("grid", "classic")


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


def _caption_inside(panel: Image.Image, caption: str | None, font_size: int, font: str | None) -> None:
    """Draw ``caption`` in a white band over the bottom of ``panel`` (in place), at most half its height."""
    if caption is None or not caption.strip():
        return
    font = font_for(caption, font_size, font)
    pad = max(3, font_size // 3)
    height = _line_height(font)
    lines = _wrap(caption.strip(), font, max(1, panel.width - 2 * pad))
    # A caption must not hide the picture: keep what fits in half the panel and mark the cut with "...".
    max_lines = max(1, (panel.height // 2 - 2 * pad) // height)
    if len(lines) > max_lines:
        lines = lines[:max_lines]
        last = lines[-1]
        while last and font.getlength(last + "...") > panel.width - 2 * pad:
            last = last[:-1]
        lines[-1] = last.rstrip() + "..."
    band = len(lines) * height + 2 * pad
    band_image = Image.new("RGB", (panel.width, band), WHITE)
    _draw_lines(band_image, lines, font, 0, pad)
    top = panel.height - band
    panel.paste(band_image, (0, top))
    ImageDraw.Draw(panel).line([(0, top), (panel.width, top)], fill=BLACK, width=max(1, font_size // 12))


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
) -> list[Image.Image]:
    """Captioned panels in a ``rows`` × ``cols`` grid, as many pages as needed, in reading order.

    All cells (and so all pages) share one size: the largest captioned panel. Each panel is framed
    tightly (its picture and its caption, if any), top-aligned and centred in its cell, so an uncaptioned
    panel gets no empty caption box. The last page keeps the full page size and leaves its unused cells
    blank.
    """
    _check_inputs(images, captions)
    if rows < 1 or cols < 1:
        raise ValueError(f"rows and cols must be >= 1, got rows={rows}, cols={cols}")
    _check_non_negative(gutter=gutter, margin=margin, border=border)
    if not images:
        return []
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
) -> list[Image.Image]:
    """A classic comic layout: rows of 1, 2 or 3 panels following ``pattern``, one pattern per page.

    Each panel is centre-cropped to its cell's aspect ratio and resized to fill it; the caption sits in a
    white band inside the panel's bottom edge. By default a two-panel row shows the first image at about
    its native size (page width = two images plus gutter and margins; row height keeps that cell's aspect
    ratio), a one-panel row becomes a wide shot and a three-panel row tall close-ups. Every page has the
    same width; the last page holds only the rows it needs (its last row may hold fewer panels than the
    pattern says, and those panels share the full row width).
    """
    _check_inputs(images, captions)
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
                _caption_inside(panel, caption, size, font)
                _bordered(page, panel, x, y, border)
                x += width + gutter
        pages.append(page)
    return pages


_LAYOUT_FUNCTIONS: dict[str, Callable[..., list[Image.Image]]] = {
    "grid": grid_pages,
    "classic": classic_pages,
}


def make_pages(
    images: Sequence[Image.Image],
    captions: Sequence[str | None],
    layout: str = "grid",
    **options: object,
) -> list[Image.Image]:
    """Comic pages in ``layout`` ("grid" or "classic"); ``options`` go to that layout's function."""
    function = _LAYOUT_FUNCTIONS.get(layout)
    if function is None:
        raise ValueError(f"unknown comic layout {layout!r}; expected one of: {', '.join(LAYOUTS)}")
    _check_inputs(images, captions)
    if not images:
        return []
    return function(images, captions, **options)
