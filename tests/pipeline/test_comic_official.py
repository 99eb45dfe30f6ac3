"""The official app's Classic Comic layout and the caption styles (band, overlay) of every layout.

Frames are small solid colours, each its own, so a panel is found on a page by its colour: the pixels of
that exact colour must form one filled rectangle (the panel's picture, found once), whose size is checked
against the row geometry computed here from the arrangement.
"""

from __future__ import annotations

import hashlib
import random
from pathlib import Path

import matplotlib
import numpy as np
import PIL
import pytest
from PIL import Image, features

import storydiff.pages.comic as comic
import storydiff.pages.panels as panels
from storydiff.pages.comic import (
    CAPTION_STYLES,
    LAYOUTS,
    classic_pages,
    grid_pages,
    make_pages,
    official_arrangement,
    official_pages,
)
from storydiff.pages.fonts import default_font_path

GEOMETRY = {"gutter": 4, "margin": 6, "border": 2}


def colour(i: int) -> tuple[int, int, int]:
    """A distinct mid-range colour per frame (never black, white nor grey, so borders and text differ)."""
    return (40 + (i * 47) % 160, 50 + (i * 23) % 150, 200 - (i * 11) % 120)


def solid_frames(n: int, size: tuple[int, int] = (48, 48)) -> list[Image.Image]:
    assert len({colour(i) for i in range(n)}) == n
    return [Image.new("RGB", size, colour(i)) for i in range(n)]


def locate(page: Image.Image, rgb: tuple[int, int, int]) -> tuple[int, int, int, int]:
    """The box (x0, y0, x1, y1) of the one filled rectangle of colour ``rgb`` on ``page``."""
    mask = np.all(np.asarray(page) == rgb, axis=-1)
    ys, xs = np.nonzero(mask)
    assert xs.size, f"colour {rgb} is not on the page"
    box = (int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1)
    area = (box[2] - box[0]) * (box[3] - box[1])
    assert mask.sum() == area, f"colour {rgb} is not one filled rectangle (found twice, or cut)"
    return box


def rows_of_frames(count: int, seed: int) -> list[list[tuple[int, ...]]]:
    """The arrangement as frame indices: per row, per column, the frames in reading order."""
    rows, first = [], 0
    for kinds in official_arrangement(count, seed):
        row = []
        for kind in kinds:
            row.append(tuple(range(first, first + kind)))
            first += kind
        rows.append(row)
    return rows


def check_official_page(page: Image.Image, images: list[Image.Image], seed: int) -> None:
    """Every frame once, full panels at the row height, stacked ones at half of it, every row page-wide."""
    gutter, margin, border = GEOMETRY["gutter"], GEOMETRY["margin"], GEOMETRY["border"]
    boxes = [locate(page, image.getpixel((0, 0))) for image in images]
    row_top = margin + border
    for row in rows_of_frames(len(images), seed):
        full = [boxes[column[0]] for column in row if len(column) == 1]
        assert full, "every row has a full panel"
        full_height = full[0][3] - full[0][1]
        half_height = (full_height + 2 * border - gutter) // 2 - 2 * border
        assert all((box[1], box[3]) == (row_top, row_top + full_height) for box in full)
        previous_right = None
        for column in row:
            if len(column) == 2:
                top, bottom = boxes[column[0]], boxes[column[1]]
                assert top[3] - top[1] == bottom[3] - bottom[1] == half_height
                assert top[1] == row_top and bottom[3] == row_top + full_height  # the stack fills the row
                assert top[0] == bottom[0] and top[2] == bottom[2]  # same size frames: one column
            left = min(boxes[i][0] for i in column)
            if previous_right is not None:
                assert left == previous_right + 2 * border + gutter  # reading order, left to right
            previous_right = max(boxes[i][2] for i in column)
            for i in column:  # pictures keep their aspect ratio (to a pixel of rounding)
                x0, y0, x1, y1 = boxes[i]
                assert abs((x1 - x0) - images[i].width / images[i].height * (y1 - y0)) <= 1.5
        # Every row spans the page between its margins.
        assert min(boxes[i][0] for column in row for i in column) == margin + border
        assert previous_right == page.width - margin - border
        row_top += full_height + 2 * border + gutter
    assert row_top - gutter - border + margin == page.height


@pytest.mark.parametrize("count", [1, 2, 3, 4, 5, 6, 7, 9, 11, 13])
def test_official_places_every_frame_once(count: int) -> None:
    images = solid_frames(count)
    pages = official_pages(images, [None] * count, seed=count, **GEOMETRY)
    assert len(pages) == 1  # one tall page, as in the official app
    check_official_page(pages[0], images, seed=count)


def test_official_default_width_is_the_narrowest_row_at_native_size() -> None:
    images = solid_frames(7)  # rows [1, 1, 2] and [1, 1, 1] (shuffled): the first is the narrower
    assert [sorted(row) for row in official_arrangement(7)] == [[1, 1, 2], [1, 1, 1]]
    (page,) = official_pages(images, [None] * 7, **GEOMETRY)
    check_official_page(page, images, seed=0)
    gutter, margin, border = GEOMETRY["gutter"], GEOMETRY["margin"], GEOMETRY["border"]
    half = 48 / 2 - border - gutter / 2
    assert page.width == int(2 * 48 + half + 3 * 2 * border + 2 * gutter) + 2 * margin
    # The narrowest row keeps the frames' own size (to a pixel), the wider one is scaled down to its width.
    assert abs(locate(page, colour(0))[3] - locate(page, colour(0))[1] - 48) <= 1
    assert locate(page, colour(4))[3] - locate(page, colour(4))[1] < 47


def test_official_mixed_aspect_ratios() -> None:
    sizes = [(64, 32), (32, 64), (48, 48), (60, 40), (40, 60), (48, 48), (64, 32), (36, 48), (48, 36)]
    images = [Image.new("RGB", size, colour(i)) for i, size in enumerate(sizes)]
    (page,) = official_pages(images, [None] * len(images), seed=5, **GEOMETRY)
    margin, border = GEOMETRY["margin"], GEOMETRY["border"]
    boxes = [locate(page, colour(i)) for i in range(len(images))]
    for (x0, y0, x1, y1), image in zip(boxes, images, strict=True):
        assert abs((x1 - x0) - image.width / image.height * (y1 - y0)) <= 1.5  # no distortion
    for row in rows_of_frames(len(images), seed=5):
        frames = [i for column in row for i in column]
        assert min(boxes[i][0] for i in frames) == margin + border
        assert max(boxes[i][2] for i in frames) == page.width - margin - border


def test_official_arrangement_rules() -> None:
    for count in range(0, 40):
        rows = official_arrangement(count, seed=count)
        assert sum(map(sum, rows)) == count
        sizes = [sum(row) for row in rows]
        # As in the official app: 4 frames a row up to 8 frames, else 4 and 6 alternately...
        assert all(size in (4, 6) for size in sizes[:-1])
        cycle = [4] if count <= 8 else [4, 6]
        assert sizes[:-2] == [cycle[k % len(cycle)] for k in range(len(sizes) - 2)]
        # ...and no row of one or two frames unless the whole story is that short.
        assert count <= 2 or sizes[-1] >= 3
        for row in rows:
            expected = {1: [1], 2: [1, 1], 3: [1, 1, 1], 4: [1, 1, 2], 5: [1, 1, 1, 2], 6: [1, 1, 2, 2]}
            assert sorted(row) == expected[sum(row)]
    # The official app would pad the last row with blank panels; here the last rows share the frames.
    expected_sizes = {
        5: [5], 6: [6], 7: [4, 3], 8: [4, 4], 9: [4, 5], 10: [4, 6], 11: [4, 4, 3], 12: [4, 4, 4],
        13: [4, 6, 3], 14: [4, 6, 4], 15: [4, 6, 5], 16: [4, 6, 6], 17: [4, 6, 4, 3], 18: [4, 6, 4, 4],
    }  # fmt: skip
    for count, sizes in expected_sizes.items():
        assert [sum(row) for row in official_arrangement(count)] == sizes


def test_official_seed_determinism_and_variety() -> None:
    images = solid_frames(14)
    captions = [f"frame {i} goes on" for i in range(14)]
    a = make_pages(images, captions, "official", seed=7)
    b = make_pages([image.copy() for image in images], list(captions), "official", seed=7)
    assert [page.tobytes() for page in a] == [page.tobytes() for page in b]
    arrangements = {tuple(official_arrangement(14, seed)) for seed in range(8)}
    assert len(arrangements) > 1
    seeds = {tuple(official_arrangement(14, seed)): seed for seed in range(8)}
    first, second = list(seeds.values())[:2]
    page_a = make_pages(images, [None] * 14, "official", seed=first)[0]
    page_b = make_pages(images, [None] * 14, "official", seed=second)[0]
    assert page_a.tobytes() != page_b.tobytes()
    check_official_page(
        make_pages(images, [None] * 14, "official", seed=second, **GEOMETRY)[0], images, second
    )


def test_official_leaves_global_random_state_alone() -> None:
    random.seed(1234)
    expected = random.random()
    random.seed(1234)
    make_pages(solid_frames(9), [None] * 9, "official", seed=3)
    assert random.random() == expected


def test_official_stacked_panels_drop_their_captions() -> None:
    images = solid_frames(4)  # one row [1, 1, 2]: frames 0..3 with two of them stacked
    captions = [f"caption of frame {i}, long enough to wrap" for i in range(4)]
    plain = official_pages(images, [None] * 4, **GEOMETRY)[0]
    page = official_pages(images, captions, **GEOMETRY)[0]
    assert page.size == plain.size
    stacked = {i for column in rows_of_frames(4, 0)[0] if len(column) == 2 for i in column}
    assert len(stacked) == 2
    for i in range(4):
        box = locate(plain, colour(i))
        region_plain, region = np.asarray(plain.crop(box)), np.asarray(page.crop(box))
        if i in stacked:
            assert np.array_equal(region, region_plain)  # no caption on a half panel
        else:
            assert not np.array_equal(region, region_plain)


@pytest.mark.parametrize(
    ("layout", "options"),
    [("official", {}), ("grid", {"caption_style": "overlay"}), ("classic", {"caption_style": "overlay"})],
)
def test_overlay_captions_blend_the_bottom_of_the_panel_only(layout: str, options: dict) -> None:
    dark = (20, 30, 60)
    images = [Image.new("RGB", (96, 96), dark) for _ in range(3)]
    plain = make_pages(images, [None] * 3, layout, **options)
    pages = make_pages(images, ["A dark night", None, "word " * 80], layout, **options)
    assert [page.size for page in pages] == [page.size for page in plain]  # panels keep their size
    page, before = np.asarray(pages[0]).astype(int), np.asarray(plain[0]).astype(int)
    changed = np.any(page != before, axis=-1)
    panel = np.all(before == dark, axis=-1)
    ys, _ = np.nonzero(panel)
    assert changed.any() and not (changed & ~panel).any()  # only pictures change, not borders or gutters
    # Within each panel's rows, what changes lies in the bottom third (the long caption is cut to fit).
    for top, bottom in _runs(np.unique(ys)):
        rows_changed = np.nonzero(changed[top:bottom].any(axis=1))[0]
        if rows_changed.size:
            assert rows_changed.min() >= (bottom - top) * 2 // 3 - 1
    # The box blends white over the picture: lighter than the dark picture, not white.
    blended = np.array([c + comic.OVERLAY_OPACITY * (255 - c) for c in dark])
    box = np.all(np.abs(page - blended) <= 1, axis=-1)  # to Pillow's rounding
    assert box.sum() > 100
    assert not np.any(np.all(page[panel] == 255, axis=-1))


def _runs(values: np.ndarray) -> list[tuple[int, int]]:
    """Maximal runs of consecutive integers in sorted ``values``, as (first, last + 1)."""
    breaks = np.nonzero(np.diff(values) > 1)[0]
    starts = [values[0], *values[breaks + 1]]
    ends = [*values[breaks] + 1, values[-1] + 1]
    return [(int(a), int(b)) for a, b in zip(starts, ends, strict=True)]


def test_grid_band_is_white_rows_below_the_picture() -> None:
    images = solid_frames(2, (64, 64))
    captions = ["a caption under the first picture", None]
    default = grid_pages(images, captions, **GEOMETRY)[0]
    band = grid_pages(images, captions, caption_style="band", **GEOMETRY)[0]
    assert default.tobytes() == band.tobytes()
    x0, y0, x1, y1 = locate(default, colour(0))
    assert (x1 - x0, y1 - y0) == (64, 64)  # picture untouched
    below = np.asarray(default)[y1 : default.height - GEOMETRY["margin"] - GEOMETRY["border"], x0:x1]
    assert below.shape[0] > 10
    assert (below[0] == 255).all()  # the band starts white
    assert (below.min(axis=-1) == below.max(axis=-1)).all()  # black text on white: greys only
    assert (below < 64).any()  # the text


def test_classic_band_is_inside_the_panel() -> None:
    images = solid_frames(2, (64, 64))
    captions = ["a caption inside the panel", None]
    default = classic_pages(images, captions, **GEOMETRY)[0]
    assert default.tobytes() == classic_pages(images, captions, caption_style="band", **GEOMETRY)[0].tobytes()
    plain = classic_pages(images, [None, None], **GEOMETRY)[0]
    assert default.size == plain.size
    x0, y0, x1, y1 = locate(plain, colour(0))
    panel = np.asarray(default)[y0:y1, x0:x1]
    changed = np.nonzero(np.any(panel != colour(0), axis=-1).any(axis=1))[0]
    band = panel[changed.min() :]
    assert (band.min(axis=-1) == band.max(axis=-1)).all()  # an opaque white band with black text
    assert (band[-1] == 255).all()
    assert changed.min() >= (y1 - y0) // 2 - 1  # at most half the panel


# Hashes of these pages from the code before caption styles and the official layout were added (commit
# ebe4e48). Text rendering depends on Pillow, FreeType and the DejaVu font, so they hold for those versions.
PINNED_VERSIONS = ("13.0.0", "2.14.3", "3.11.2")
PINNED = {
    "grid": "233cbdadac1b68eddf5b0d9ee7be95f3052e5edc65b1c1bee73ccc55c15604d7",
    "classic": "8c647c7c44f957613a07aec7a25a0bb3e18a395d816dcd247537b207033f4ca8",
}


def gradient(i: int, size: tuple[int, int] = (64, 48)) -> Image.Image:
    x, y = np.meshgrid(np.arange(size[0]), np.arange(size[1]))
    rgb = np.stack([(x * 4 + 40 * i) % 256, (y * 5) % 256, (x + y + 60 * i) % 256], axis=-1)
    return Image.fromarray(rgb.astype(np.uint8), "RGB")


@pytest.mark.parametrize("layout", ["grid", "classic"])
def test_default_pages_are_unchanged(layout: str) -> None:
    versions = (PIL.__version__, features.version("freetype2"), matplotlib.__version__)
    if versions != PINNED_VERSIONS:
        pytest.skip(f"pinned with Pillow, FreeType, matplotlib {PINNED_VERSIONS}, running {versions}")
    captions = [
        "Monday, the hero sets out.",
        None,
        "A longer caption that wraps onto two lines at least, and more",
        "End",
    ]
    pages = make_pages([gradient(i) for i in range(4)], captions, layout)
    assert hashlib.sha256(b"".join(page.tobytes() for page in pages)).hexdigest() == PINNED[layout]


@pytest.mark.parametrize(
    ("layout", "style"), [(layout, style) for layout in LAYOUTS for style in CAPTION_STYLES]
)
def test_captions_use_the_font_given(monkeypatch, layout: str, style: str) -> None:
    font = str(default_font_path())
    seen = []

    def spy(text, size, font=None):
        seen.append(font)
        return real(text, size, font)

    real = panels.font_for  # where the captions are drawn
    monkeypatch.setattr(panels, "font_for", spy)
    captions = ["first caption", "second", "third", "fourth"]
    make_pages(solid_frames(4, (64, 64)), captions, layout, caption_style=style, font=font)
    # Every captioned panel asks for the font given; the official layout drops its two stacked captions.
    assert seen and all(used == font for used in seen)
    assert len(seen) == (2 if layout == "official" else 4)
    mono = str(Path(font).with_name("DejaVuSansMono.ttf"))
    a = make_pages(solid_frames(4, (64, 64)), captions, layout, caption_style=style, font=font)
    b = make_pages(solid_frames(4, (64, 64)), captions, layout, caption_style=style, font=mono)
    assert a[0].tobytes() != b[0].tobytes()


def test_make_pages_options() -> None:
    images, captions = solid_frames(5), [None, "two", None, "four", None]
    # seed goes only to the official layout; the others take none and ignore it here.
    assert (
        make_pages(images, captions, "grid", seed=4)[0].tobytes() == make_pages(images, captions)[0].tobytes()
    )
    assert len(make_pages(images, captions, "classic", seed=4, font=None)) == 1
    assert len(make_pages(images, captions, "official", font=str(default_font_path()))) == 1
    assert make_pages([], [], "official") == [] and official_pages([], []) == []
    assert CAPTION_STYLES == ("band", "overlay") and "official" in LAYOUTS


@pytest.mark.parametrize("function", [make_pages, grid_pages, classic_pages, official_pages])
def test_unknown_caption_style(function) -> None:
    with pytest.raises(ValueError, match=r"unknown caption_style 'bubble'; expected one of: band, overlay"):
        function(solid_frames(1), [None], caption_style="bubble")
    with pytest.raises(ValueError, match="caption_style 'bubble'"):
        make_pages([], [], "official", caption_style="bubble")


def test_official_rows_per_page_splits_the_tall_page() -> None:
    images = solid_frames(13)
    margin = GEOMETRY["margin"]
    (tall,) = official_pages(images, [None] * 13, seed=2, **GEOMETRY)
    pages = official_pages(images, [None] * 13, seed=2, rows_per_page=1, **GEOMETRY)
    assert len(pages) == len(official_arrangement(13, seed=2)) == 3
    top = margin
    for page in pages:
        assert page.width == tall.width
        body = page.crop((0, margin, page.width, page.height - margin))
        assert body.tobytes() == tall.crop((0, top, tall.width, top + body.height)).tobytes()
        top += body.height + GEOMETRY["gutter"]


def test_official_bad_options() -> None:
    with pytest.raises(ValueError, match="does not fit"):
        official_pages(solid_frames(4), [None] * 4, page_width=30)
    with pytest.raises(ValueError, match="rows_per_page must be >= 1"):
        official_pages(solid_frames(4), [None] * 4, rows_per_page=0)
    with pytest.raises(ValueError, match="same length"):
        official_pages(solid_frames(2), [None])
