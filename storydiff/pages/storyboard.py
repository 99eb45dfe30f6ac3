"""A video story's pages: each shot as a strip of its first, middle and last frames, captioned.

The strips go through the comic grid (``comic.grid_pages``) one per row, so captions, fonts and caption
styles work as for image stories.
"""

from __future__ import annotations

from collections.abc import Sequence

from PIL import Image

from .comic import grid_pages

GAP = 4  # pixels between the frames of a strip
WHITE = (255, 255, 255)


def key_frames(shot: Sequence[Image.Image]) -> list[Image.Image]:
    """The first, middle and last frames of ``shot`` (fewer when it has fewer)."""
    if not shot:
        raise ValueError("a shot has no frames")
    picks = sorted({0, len(shot) // 2, len(shot) - 1})
    return [shot[i] for i in picks]


def strip(shot: Sequence[Image.Image]) -> Image.Image:
    """``key_frames`` of ``shot`` side by side."""
    frames = [frame.convert("RGB") for frame in key_frames(shot)]
    width = sum(frame.width for frame in frames) + GAP * (len(frames) - 1)
    image = Image.new("RGB", (width, max(frame.height for frame in frames)), WHITE)
    x = 0
    for frame in frames:
        image.paste(frame, (x, 0))
        x += frame.width + GAP
    return image


def storyboard_pages(
    shots: Sequence[Sequence[Image.Image]],
    captions: Sequence[str | None],
    *,
    rows: int = 4,
    caption_style: str | None = None,
    font: str | None = None,
) -> list[Image.Image]:
    """Pages of ``rows`` shots each: a strip per shot (``strip``) with its caption."""
    return grid_pages(
        [strip(shot) for shot in shots], captions, rows=rows, cols=1, caption_style=caption_style, font=font
    )
