"""The folder layout of subject masks, shared by ``storydiff eval --mask-dir`` and by given subject masks.

``DIR/mask_007.png`` masks story frame 7 (the frames' own numbering, as ``frames/frame_007.png``): one file
per frame, shared by every character in it; a frame may have none. A mask is any PNG: one with an alpha
channel (a background remover's RGBA cut-out) is read by its alpha, any other as grayscale; 255 keeps a
pixel, 0 leaves it out. An output folder keeps the masks a run used under ``masks/`` in this layout, so
``storydiff eval --mask-dir OUT/masks`` reads them as they are.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from PIL import Image

from ..support.atomic import atomic_path

MASKS_FOLDER = "masks"  # an output folder's masks, in this layout


def mask_path(directory: str | os.PathLike, frame: int) -> Path:
    """Where frame ``frame``'s mask sits in ``directory``: ``mask_007.png`` for frame 7."""
    return Path(directory) / f"mask_{frame:03d}.png"


def character_mask_path(directory: str | os.PathLike, frame: int, character: str) -> Path:
    """Where one character's own mask in frame ``frame`` may sit: ``mask_007_Bob.png`` (for frames showing
    several characters; bounded attention needs to know which token is whose)."""
    return Path(directory) / f"mask_{frame:03d}_{character}.png"


def read_mask(path: str | os.PathLike) -> Image.Image:
    """The mask image at ``path``, read now (the file is closed on return)."""
    with Image.open(path) as opened:
        return opened.copy()


def mask_coverage(mask: Image.Image) -> Image.Image:
    """A mask image as an "L" image of how much each pixel belongs to the subject (255: all): its alpha
    channel when it has one, else its grayscale."""
    return mask.getchannel("A") if mask.mode in ("RGBA", "LA", "PA") else mask.convert("L")


def write_mask(path: str | os.PathLike, mask: torch.Tensor) -> Path:
    """Write a (h, w) bool mask as a black-and-white PNG (255 = subject), atomically."""
    if mask.dtype != torch.bool or mask.ndim != 2:
        raise ValueError(f"a mask to write is a (h, w) bool tensor, got {mask.dtype} {tuple(mask.shape)}")
    pixels = (mask.to(torch.uint8) * 255).cpu().numpy()
    with atomic_path(path) as tmp:
        Image.fromarray(pixels, mode="L").save(tmp, format="PNG")
    return Path(path)
