"""Subject masks per story frame and character, and how they meet each level's token grid.

A ``SubjectMasks`` holds, for every story frame that shows characters, one boolean mask per character (True:
the character's pixels), of the image's aspect at any resolution. They come from the Python API
(:meth:`SubjectMasks.from_mapping`), from a folder in ``storydiff eval --mask-dir``'s layout
(:meth:`SubjectMasks.from_folder`, ``mask_files.py``: one file per frame, shared by the characters in it),
from an output folder's ``masks/`` (:meth:`SubjectMasks.load`, written by :meth:`SubjectMasks.save`), or
from cross-attention (``cross_attention_masks.py``).

The token grid of a level. An image host's layer at level f sees the image as an (h, w) grid of tokens in
row-major order (UNets: the latent halved per depth; DiTs: 2x2 patches of the latent). Rather than ask each
family for its rounding, the grid of N tokens is the factor pair h·w = N whose aspect h/w is nearest the
image's (:func:`token_grid`); an N with no factor pair within one token of the image's aspect is refused
(it is not an image grid of this size: a video's frames x tokens, another resolution).

Video shots (Wan). A story frame of a video family is a shot: its tokens are T latent frames of one (h, w)
grid, row-major over (t, h, w). A shot has ONE 2D mask per character (the given layout is the image's:
``mask_NNN.png`` per shot), applied to every latent frame: token (t, h, w) is subject iff the mask's grid
cell (h, w) is. The caller says T (``frames``: ``ConsistencyState.latent_frames``, which the family sets)
— N alone cannot say it: 4 latent frames of a 4x4 grid are as many tokens as one 8x8 grid —, the grid is
:func:`token_grid` of N / T, and the resized mask is repeated T times (:func:`shot_tokens`).

The resize rule. A mask becomes a grid by area averaging — each grid cell takes the mean of the mask
pixels it covers (``F.interpolate(mode="area")``, adaptive average pooling: an upsampled mask is repeated)
— and a cell is subject when that mean is >= 0.5 (:data:`SUBJECT_SHARE`). A mask whose aspect differs from
the image's by more than one of its pixels is refused (it is another frame's, or cropped: stretching it
would mark the wrong tokens).

Reading a mask image: coverage (alpha, else grayscale, ``mask_files.mask_coverage``) >= 128 is subject.
"""

from __future__ import annotations

import hashlib
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from .mask_files import MASKS_FOLDER, character_mask_path, mask_coverage, mask_path, read_mask, write_mask

Size = tuple[int, int]  # (height, width)

#: a grid cell is subject when at least this share of the mask pixels it covers are
SUBJECT_SHARE = 0.5
#: a mask image's pixel is subject when its coverage (alpha, else gray) is at least this
PIXEL_THRESHOLD = 128


def token_grid(tokens: int, size: Size, frames: int = 1) -> Size:
    """(h, w) with h·w = ``tokens``: the grid of an image of ``size`` (height, width) at some level — the
    factor pair nearest the image's aspect; ValueError when none is within one token of it.

    ``frames`` > 1: ``tokens`` are that many whole grids (a video shot's latent frames, row-major over
    (t, h, w)); the grid of one of them is returned. ValueError when ``tokens`` is not a multiple of
    ``frames``."""
    height, width = size
    if isinstance(frames, bool) or not isinstance(frames, int) or frames < 1:
        raise ValueError(f"frames (latent frames of a shot) must be an int >= 1, got {frames!r}")
    if tokens < 1:
        raise ValueError(f"a token grid needs >= 1 token, got {tokens}")
    if tokens % frames:
        raise ValueError(f"{tokens} tokens are not {frames} latent frames of one token grid")
    tokens //= frames
    pairs = [(h, tokens // h) for h in range(1, tokens + 1) if tokens % h == 0]
    aspect = math.log(height / width)
    h, w = min(pairs, key=lambda p: abs(math.log(p[0] / p[1]) - aspect))
    if not _same_aspect((h, w), size):
        raise ValueError(
            f"{tokens} tokens form no grid of a {height}x{width} image's aspect (nearest: {h}x{w}): not an "
            f"image level of this size{'' if frames == 1 else f' (per latent frame, of {frames})'}"
        )
    return h, w


def shot_tokens(grid_mask: torch.Tensor, frames: int = 1) -> torch.Tensor:
    """(frames·h·w,) bool: a (h, w) mask on a token grid, flattened row-major and repeated for each of a
    shot's ``frames`` latent frames — token (t, h, w) is subject iff ``grid_mask[h, w]`` is (one 2D mask
    per shot: the subject is taken to stay where its mask is for the whole clip)."""
    flat = grid_mask.flatten()
    return flat if frames == 1 else flat.repeat(frames)


def _same_aspect(shape: Size, size: Size) -> bool:
    """Whether an (h, w) grid or mask has the aspect of ``size`` to within one of its own cells: its height
    scaled from its width, or its width scaled from its height, is off by at most 1."""
    (h, w), (height, width) = shape, size
    return abs(h - w * height / width) <= 1 or abs(w - h * width / height) <= 1


def resize_mask(mask: torch.Tensor, grid: Size) -> torch.Tensor:
    """A (h, w) bool mask on an (gh, gw) grid: area average, then >= ``SUBJECT_SHARE``."""
    if tuple(mask.shape) == tuple(grid):
        return mask.clone()
    area = F.interpolate(mask[None, None].float(), size=tuple(grid), mode="area")[0, 0]
    return area >= SUBJECT_SHARE


def as_mask(value: object, where: str) -> torch.Tensor:
    """A (h, w) bool CPU tensor from a bool tensor or array, or a mask image (coverage >= 128)."""
    if isinstance(value, Image.Image):
        value = torch.from_numpy(np.array(mask_coverage(value))) >= PIXEL_THRESHOLD
    elif isinstance(value, np.ndarray):
        value = torch.from_numpy(value)
    if not isinstance(value, torch.Tensor):
        raise ValueError(f"{where}: a mask is a bool tensor, array or PIL image, got {type(value).__name__}")
    if value.dtype != torch.bool:
        raise ValueError(f"{where}: a mask must be boolean (True: the subject), got {value.dtype}")
    if value.ndim == 3 and value.shape[0] == 1:
        value = value[0]
    if value.ndim != 2 or 0 in value.shape:
        raise ValueError(f"{where}: a mask is (height, width), got shape {tuple(value.shape)}")
    return value.detach().cpu()


class SubjectMasks:
    """Per story frame, per character it shows, a (h, w) bool subject mask of the image's aspect.

    Args:
        masks: frame -> character -> mask (bool tensor / array or PIL image, any resolution of the image's
            aspect).
        frame_characters: the characters each story frame shows (empty for an [NC] frame), in story order.
        size: the image's (height, width).

    Every frame that shows characters needs a mask for each of them; a mask for a frame outside the story,
    or for a character the frame does not show, is refused (ValueError naming the frame and character).
    """

    def __init__(
        self,
        masks: Mapping[int, Mapping[str, object]],
        frame_characters: Sequence[Sequence[str]],
        size: Size,
    ) -> None:
        if len(size) != 2 or any(isinstance(s, bool) or not isinstance(s, int) or s < 1 for s in size):
            raise ValueError(f"size is the image's (height, width) in pixels, got {size!r}")
        self.size: Size = (int(size[0]), int(size[1]))
        self.frame_characters = [tuple(chars) for chars in frame_characters]
        self.masks: dict[int, dict[str, torch.Tensor]] = {}
        count = len(self.frame_characters)
        for frame, per_character in masks.items():
            if isinstance(frame, bool) or not isinstance(frame, int) or not 0 <= frame < count:
                raise ValueError(f"mask for frame {frame!r}: the story has frames 0 to {count - 1}")
            shown = self.frame_characters[frame]
            for character, value in per_character.items():
                if character not in shown:
                    shows = ", ".join(shown) if shown else "no character ([NC])"
                    raise ValueError(
                        f"frame {frame}: mask for unknown character {character!r} (the frame shows {shows})"
                    )
                where = f"frame {frame} ({character})"
                mask = as_mask(value, where)
                if not _same_aspect(tuple(mask.shape), self.size):
                    raise ValueError(
                        f"{where}: a {mask.shape[0]}x{mask.shape[1]} mask cannot be resized to the "
                        f"{self.size[0]}x{self.size[1]} image (another aspect)"
                    )
                self.masks.setdefault(frame, {})[character] = mask
        for frame, shown in enumerate(self.frame_characters):
            missing = [c for c in shown if c not in self.masks.get(frame, {})]
            if missing:
                raise ValueError(f"frame {frame}: no mask for {', '.join(missing)}")
        self._subjects: dict[tuple[int, int], torch.Tensor | None] = {}

    # -- sources -------------------------------------------------------------------------------------
    @classmethod
    def from_mapping(
        cls, masks: Mapping[int, Mapping[str, object]], frame_characters: Sequence[Sequence[str]], size: Size
    ) -> SubjectMasks:
        """Masks passed through the Python API: frame -> character -> mask."""
        return cls(masks, frame_characters, size)

    @classmethod
    def from_folder(
        cls, directory: str | os.PathLike, frame_characters: Sequence[Sequence[str]], size: Size
    ) -> SubjectMasks:
        """Masks in ``storydiff eval --mask-dir``'s layout: ``mask_007.png`` for frame 7, shared by every
        character it shows — or, per character, ``mask_007_Bob.png`` (used for Bob where present; a frame
        whose every character has its own file needs no shared one). Every frame showing a character
        needs its masks; files of [NC] frames or past the story's end are not read (nothing to attach them
        to)."""
        directory = Path(directory)
        if not directory.is_dir():
            raise ValueError(f"mask folder {directory} is not a folder")
        masks = {}
        for frame, shown in enumerate(frame_characters):
            if not shown:
                continue
            masks[frame] = {}
            for character in shown:
                path = character_mask_path(directory, frame, character)
                if not path.is_file():
                    path = mask_path(directory, frame)
                if not path.is_file():
                    raise ValueError(f"frame {frame} ({character}): no mask {path.name} in {directory}")
                masks[frame][character] = as_mask(read_mask(path), f"frame {frame} ({path})")
        return cls(masks, frame_characters, size)

    @classmethod
    def load(
        cls, output_dir: str | os.PathLike, frame_characters: Sequence[Sequence[str]], size: Size
    ) -> SubjectMasks:
        """The masks an output folder keeps under ``masks/`` (:meth:`save`)."""
        return cls.from_folder(Path(output_dir) / MASKS_FOLDER, frame_characters, size)

    def save(self, output_dir: str | os.PathLike) -> Path:
        """Write ``output_dir/masks/mask_NNN.png`` per frame with characters (the union of its characters'
        masks at the image's size, in ``--mask-dir``'s layout: eval reads it as is) and, in frames with
        several characters, each one's own ``mask_NNN_Name.png`` (read back as given). Returns the folder."""
        folder = Path(output_dir) / MASKS_FOLDER
        folder.mkdir(parents=True, exist_ok=True)
        for frame in sorted(self.masks):
            write_mask(mask_path(folder, frame), self.frame_mask(frame, self.size))
            if len(self.masks[frame]) > 1:  # several characters: each one's own mask too (bounded attention)
                for character in self.masks[frame]:
                    write_mask(
                        character_mask_path(folder, frame, character), self.mask(frame, character, self.size)
                    )
        return folder

    def digest(self) -> str:
        """SHA-256 of every mask at the image's size, in frame and character order: what a resumed run
        must match (the size ``save`` writes, so masks read back from ``masks/`` give the same digest)."""
        digest = hashlib.sha256()
        for frame in sorted(self.masks):
            for character in sorted(self.masks[frame]):
                mask = self.mask(frame, character, self.size)
                digest.update(f"{frame}:{character}".encode())
                digest.update(mask.to(torch.uint8).numpy().tobytes())
        return digest.hexdigest()

    # -- on a grid -----------------------------------------------------------------------------------
    def mask(self, frame: int, character: str, grid: Size | None = None) -> torch.Tensor:
        """Character ``character``'s mask in frame ``frame``: as given, or on ``grid`` (the resize rule)."""
        try:
            mask = self.masks[frame][character]
        except KeyError:
            raise KeyError(f"no subject mask for frame {frame} ({character})") from None
        return mask if grid is None else resize_mask(mask, grid)

    def frame_mask(self, frame: int, grid: Size) -> torch.Tensor:
        """(gh, gw) bool: the union of the frame's characters' masks, each resized to ``grid``."""
        union = torch.zeros(grid, dtype=torch.bool)
        for character in self.masks.get(frame, {}):
            union |= self.mask(frame, character, grid)
        return union

    def subject_tokens(self, frame: int, tokens: int, frames: int = 1) -> torch.Tensor | None:
        """(tokens,) bool: which of the frame's ``tokens`` image tokens (row-major on ``token_grid``) show
        one of its characters; None for a frame without characters. ``frames`` > 1: the frame is a video
        shot of that many latent frames, ``tokens`` = frames x grid, its mask repeated on each
        (:func:`shot_tokens`)."""
        key = (frame, tokens, frames)
        if key not in self._subjects:
            if frame not in self.masks:
                self._subjects[key] = None
            else:
                grid = token_grid(tokens, self.size, frames)
                self._subjects[key] = shot_tokens(self.frame_mask(frame, grid), frames)
        return self._subjects[key]

    def character_tokens(self, frame: int, character: str, tokens: int, frames: int = 1) -> torch.Tensor:
        """(tokens,) bool: ``character``'s mask in ``frame`` on the grid of ``tokens`` tokens (``frames``
        latent frames of it, as in :meth:`subject_tokens`) — which tokens are that character's."""
        return shot_tokens(self.mask(frame, character, token_grid(tokens, self.size, frames)), frames)

    def level_masks(self, levels: Iterable[int]) -> dict[int, dict[tuple[int, str], torch.Tensor]]:
        """level -> (frame, character) -> that mask on the level's grid (``level_grid``)."""
        return {
            level: {
                (frame, character): self.mask(frame, character, level_grid(self.size, level))
                for frame, chars in sorted(self.masks.items())
                for character in chars
            }
            for level in levels
        }


def level_grid(size: Size, level: int) -> Size:
    """The (h, w) token grid at downsampling factor ``level`` of an image of ``size``: ceil(side / level)
    of the latent's side (height // 8), as UNet downsampling rounds; the grids ``token_grid`` finds."""
    factor = level // 8
    return math.ceil((size[0] // 8) / factor), math.ceil((size[1] // 8) / factor)
