"""Comic page layout: captions, grid and classic pages, determinism, argument errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageChops

from storydiff.pages.comic import captioned, classic_pages, grid_pages, make_pages
from storydiff.pages.fonts import _missing, default_font_path, font_for


def frame(i: int, size: tuple[int, int] = (96, 96)) -> Image.Image:
    """A flat, mid-grey-ish colour per frame: no pixel is dark, so dark pixels can only come from text."""
    return Image.new("RGB", size, (120 + 10 * (i % 10), 160, 200 - 5 * (i % 10)))


def frames(n: int) -> list[Image.Image]:
    return [frame(i) for i in range(n)]


def dark_pixels(image: Image.Image, box: tuple[int, int, int, int] | None = None) -> int:
    region = image.crop(box) if box else image
    histogram = region.convert("L").histogram()
    return sum(histogram[:64])


def same_pixels(a: Image.Image, b: Image.Image) -> bool:
    return a.size == b.size and a.mode == b.mode and ImageChops.difference(a, b).getbbox() is None


def test_captioned_adds_a_band_with_text() -> None:
    image = frame(0, (200, 120))
    result = captioned(image, "Bob walks in the park")
    assert result.width == 200 and result.height > 120
    assert same_pixels(result.crop((0, 0, 200, 120)), image)  # picture untouched
    band = (0, 120, 200, result.height)
    assert dark_pixels(result, band) > 20
    assert result.getpixel((0, result.height - 1)) == (255, 255, 255)  # white band


def test_captioned_wraps_long_text() -> None:
    image = frame(0, (160, 100))
    short = captioned(image, "Hi")
    long = captioned(image, "a much longer caption that cannot possibly fit on a single line of this panel")
    assert long.height > short.height
    assert long.width == 160
    unbreakable = captioned(image, "x" * 200)
    assert unbreakable.width == 160 and unbreakable.height > short.height


def test_captioned_font_size() -> None:
    image = frame(0, (200, 100))
    assert captioned(image, "Hi", font_size=40).height > captioned(image, "Hi", font_size=12).height


@pytest.mark.parametrize("caption", [None, "", "   "])
def test_captioned_without_caption_is_a_copy(caption: str | None) -> None:
    image = frame(3)
    result = captioned(image, caption)
    assert result is not image
    assert same_pixels(result, image)


@pytest.mark.parametrize(("count", "pages"), [(1, 1), (4, 1), (5, 2), (9, 3)])
def test_grid_page_counts(count: int, pages: int) -> None:
    result = grid_pages(frames(count), [f"panel {i}" for i in range(count)], rows=2, cols=2)
    assert len(result) == pages
    assert len({page.size for page in result}) == 1


def test_grid_layout_geometry() -> None:
    result = grid_pages(frames(5), [None] * 5, rows=2, cols=3, gutter=10, margin=20, border=2)
    assert len(result) == 1
    page = result[0]
    assert page.size == (2 * 20 + 3 * 100 + 2 * 10, 2 * 20 + 2 * 100 + 10)
    assert page.getpixel((0, 0)) == (255, 255, 255)  # margin
    assert page.getpixel((20, 20)) == (0, 0, 0)  # border of the first panel
    assert page.getpixel((22, 22)) == frame(0).getpixel((0, 0))  # first panel inside its border
    assert page.getpixel((20 + 2 * (100 + 10) + 50, 20 + 100 + 10 + 50)) == (255, 255, 255)  # empty 6th cell


def test_grid_partial_last_page_is_blank_where_unused() -> None:
    first, last = grid_pages(frames(5), [None] * 5)
    assert first.size == last.size
    assert dark_pixels(last) < dark_pixels(first)


def test_classic_pages_equal_width() -> None:
    images = frames(11)
    captions = [f"caption number {i}" if i % 2 else None for i in range(11)]
    pages = classic_pages(images, captions)
    assert len(pages) == 2  # pattern (2, 1, 3) holds 6 panels per page
    assert len({page.width for page in pages}) == 1
    assert pages[1].height >= 0 and pages[0].height >= pages[1].height


def test_classic_custom_pattern_and_sizes() -> None:
    images = [frame(i, (128, 64)) for i in range(7)]
    pages = classic_pages(
        images, [None] * 7, pattern=(1, 3), page_width=500, row_height=150, margin=10, gutter=5
    )
    assert [p.width for p in pages] == [500, 500]
    assert pages[0].height == 2 * 10 + 2 * 150 + 5
    assert pages[1].height == 2 * 10 + 2 * 150 + 5  # 4 panels left: a row of 1, then a row of 3


def test_classic_panels_fill_their_cells() -> None:
    image = Image.new("RGB", (100, 100), (200, 40, 40))
    page = classic_pages([image], [None], margin=10, border=2)[0]
    # A single panel fills the whole row width, edge to edge inside its border.
    y = page.height // 2
    assert page.getpixel((10 + 2, y)) == (200, 40, 40)
    assert page.getpixel((page.width - 10 - 3, y)) == (200, 40, 40)


def test_classic_captions_are_drawn() -> None:
    plain = classic_pages(frames(3), [None] * 3)[0]
    with_text = classic_pages(frames(3), ["one", "two", "three"])[0]
    assert plain.size == with_text.size
    assert dark_pixels(with_text) > dark_pixels(plain)
    long = classic_pages(frames(1), ["word " * 200])[0]  # truncated to half the panel, not overflowing
    assert long.size == classic_pages(frames(1), [None])[0].size


@pytest.mark.parametrize("layout", ["grid", "classic"])
def test_deterministic(layout: str) -> None:
    captions = ["Monday.", None, "A longer caption that wraps onto two lines at least", "End"]
    a = make_pages(frames(4), captions, layout)
    b = make_pages(frames(4), list(captions), layout)
    assert len(a) == len(b)
    assert all(same_pixels(x, y) for x, y in zip(a, b, strict=True))


def test_make_pages_dispatch_and_options() -> None:
    assert len(make_pages(frames(5), [None] * 5)) == 2  # grid 2×2 by default
    assert len(make_pages(frames(5), [None] * 5, "grid", rows=1, cols=1)) == 5
    assert len(make_pages(frames(5), [None] * 5, "classic")) == 1
    assert make_pages([], []) == []
    assert make_pages([], [], "classic") == []


def test_bad_layout() -> None:
    with pytest.raises(ValueError, match=r"unknown comic layout 'manga'.*grid.*classic.*official"):
        make_pages(frames(1), [None], "manga")


@pytest.mark.parametrize("function", [make_pages, grid_pages, classic_pages])
def test_length_mismatch(function) -> None:
    with pytest.raises(ValueError, match=r"same length.*2 images and 1 captions"):
        function(frames(2), ["only one"])


def test_bad_options() -> None:
    with pytest.raises(ValueError, match="rows and cols"):
        grid_pages(frames(1), [None], rows=0)
    with pytest.raises(ValueError, match="gutter must be >= 0"):
        grid_pages(frames(1), [None], gutter=-1)
    with pytest.raises(ValueError, match="pattern"):
        classic_pages(frames(1), [None], pattern=(2, 0))
    with pytest.raises(ValueError, match="too small"):
        classic_pages(frames(1), [None], page_width=40, margin=10)


# ------------------------------------------------------------------------------------------- fonts


def _band(caption: str) -> np.ndarray:
    image = Image.new("RGB", (120, 40), (90, 90, 90))
    return np.asarray(captioned(image, caption, font_size=24))[40:]


def test_accented_captions_draw_their_own_glyphs() -> None:
    """With a font lacking é and ü both would draw the same .notdef box; with DejaVu Sans they differ."""
    assert not np.array_equal(_band("é"), _band("ü"))
    assert not np.array_equal(_band("é"), _band("e"))
    assert font_for("Café", 12).path == str(default_font_path())


def test_a_caption_font_file_is_used_and_checked(tmp_path) -> None:
    mono = Path(default_font_path()).with_name("DejaVuSansMono.ttf")
    assert font_for("abc", 12, mono).path == str(mono)
    image = Image.new("RGB", (120, 40))
    assert not np.array_equal(
        np.asarray(captioned(image, "Wide Mm", font_size=20)),
        np.asarray(captioned(image, "Wide Mm", font_size=20, font=str(mono))),
    )
    (tmp_path / "bad.ttf").write_text("not a font")
    with pytest.raises(ValueError, match="not a TrueType"):
        font_for("abc", 12, tmp_path / "bad.ttf")


def test_cjk_captions_use_a_font_that_covers_them() -> None:
    font = font_for("日本語", 16)  # warns when no installed font covers it
    if font.path == str(default_font_path()):
        pytest.skip("no installed font covers CJK here (pass one with --font)")
    assert not _missing(Path(font.path), "日本語")


def test_grid_draws_no_empty_caption_box_under_an_uncaptioned_panel() -> None:
    images = [Image.new("RGB", (64, 64), (200, 0, 0)) for _ in range(2)]
    (page,) = grid_pages(
        images, ["a caption long enough to wrap over lines", None], margin=0, gutter=0, border=2
    )
    pixels = np.asarray(page)
    # second cell: a 64x64 panel framed at its own height; below the frame the cell is plain white
    below = pixels[64 + 2 * 2 + 1 :, 64 + 2 * 2 :]
    assert below.size and (below == 255).all()
