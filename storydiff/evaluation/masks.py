"""Masks applied to frames before the identity encoders, so identity is measured on the subject alone.

ConsiStory scores identity on subjects with the background removed: two frames of one character in
different places then compare the character, not the scenery. A mask function
``mask_fn(image, frame_index, character) -> mask or None`` is called once per (frame, character) pair
that the identity metrics use; None keeps the whole frame. A mask is any PIL image of the frame's size:
one with an alpha channel (a background remover's RGBA cut-out) is read by its alpha, any other as
grayscale. 255 keeps a pixel, 0 replaces it with neutral gray (128, 128, 128), values between blend.

Gray rather than black or white: it is the middle of the range, so it sits near zero after CLIP's and
DINOv2's normalisation and adds no strong edge against dark or light subjects. Every masked-out pixel
gets the same gray in every frame, so blanked areas agree perfectly with each other: masked numbers tend
to run higher than whole-frame ones and compare only with masked numbers.

CLIP-T is always measured on the whole frame: the prompt describes the scene, not the subject alone.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import torch
from PIL import Image

from ..consistency.mask_files import character_mask_path, mask_coverage, mask_path, read_mask
from ..support.progress import Progress, progress_bar

__all__ = ["NEUTRAL_GRAY", "MaskDir", "MaskFn", "apply_mask", "encode_masked", "mask_name", "masked_frame"]

MaskFn = Callable[[Image.Image, int, str], "Image.Image | None"]
NEUTRAL_GRAY = (128, 128, 128)


def apply_mask(image: Image.Image, mask: Image.Image) -> Image.Image:
    """``image`` (RGB) with the pixels ``mask`` leaves out set to ``NEUTRAL_GRAY``; ValueError for a mask
    of another size (a mask for another frame, or another resolution, would silently measure the wrong
    region if it were stretched to fit)."""
    if mask.size != image.size:
        raise ValueError(f"mask is {mask.size[0]}x{mask.size[1]}, frame is {image.size[0]}x{image.size[1]}")
    return Image.composite(image, Image.new("RGB", image.size, NEUTRAL_GRAY), mask_coverage(mask))


def mask_name(mask_fn: MaskFn) -> str:
    """What the report records as the mask: a ``MaskDir``'s folder, else the function's name."""
    return str(getattr(mask_fn, "source", None) or getattr(mask_fn, "__name__", type(mask_fn).__name__))


def masked_frame(path: str | os.PathLike, index: int, character: str, mask_fn: MaskFn) -> Image.Image:
    """Frame ``index`` read from ``path`` (RGB) with ``mask_fn``'s mask for ``character`` applied, or
    whole when it returns None; ValueError naming the frame and the mask function for a bad mask."""
    with Image.open(path) as opened:
        image = opened.convert("RGB")
    mask = mask_fn(image, index, character)
    if mask is None:
        return image
    if not isinstance(mask, Image.Image):
        raise ValueError(
            f"mask {mask_name(mask_fn)}: frame {index} ({character}): expected a PIL image or None"
        )
    try:
        return apply_mask(image, mask)
    except ValueError as exc:
        raise ValueError(f"mask {mask_name(mask_fn)}: frame {index} ({character}): {exc}") from None


class MaskDir:
    """Masks from a folder: ``mask_007.png`` for frame 7 (the frames' own numbering), shared by every
    character in it, or ``mask_007_Bob.png`` for Bob alone where present (what a story run with subject
    masks keeps for frames with several characters); a frame without a file is measured whole (the layout:
    ``consistency/mask_files.py``)."""

    def __init__(self, directory: str | os.PathLike) -> None:
        self.directory = Path(directory)
        if not self.directory.is_dir():
            raise ValueError(f"--mask-dir {self.directory} is not a folder")
        self.source = str(self.directory)

    def path(self, index: int) -> Path:
        return mask_path(self.directory, index)

    def check(self, indices: Sequence[int]) -> None:
        """ValueError when none of ``indices`` has a mask: a wrong folder, not a choice to mask nothing."""
        if not any(self.path(i).is_file() for i in indices):
            example = self.path(indices[0]).name if indices else "mask_000.png"
            raise ValueError(f"--mask-dir {self.directory} holds no mask for any frame (e.g. {example})")

    def __call__(self, image: Image.Image, index: int, character: str) -> Image.Image | None:
        path = character_mask_path(self.directory, index, character)
        if not path.is_file():
            path = self.path(index)
        if not path.is_file():
            return None
        return read_mask(path)  # read now: the file closes here


def encode_masked(
    items: Sequence[tuple[Path, int, str]],
    encoders: Mapping[str, object],
    mask_fn: MaskFn,
    *,
    batch_size: int = 16,
    progress: Progress = False,
) -> dict[str, torch.Tensor]:
    """Embed each (frame path, frame index, character) item, masked, with every encoder in ``encoders``
    (name -> object with ``encode_images``): (len(items), D) per name, in item order.

    One batch of masked frames at a time feeds all encoders, so ``mask_fn`` (perhaps a segmentation
    model) runs once per item and a long story never holds all its masked frames in memory.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    parts: dict[str, list[torch.Tensor]] = {name: [] for name in encoders}
    bar = progress_bar(len(items), "masked identity", "frame", progress if len(items) > batch_size else False)
    try:
        for start in range(0, len(items), batch_size):
            batch = [masked_frame(*item, mask_fn) for item in items[start : start + batch_size]]
            for name, encoder in encoders.items():
                parts[name].append(encoder.encode_images(batch, batch_size=len(batch)))
            bar.update(len(batch))
    finally:
        bar.close()
    return {name: torch.cat(p) if p else torch.empty(0, 0) for name, p in parts.items()}
