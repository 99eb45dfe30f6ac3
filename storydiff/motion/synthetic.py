"""Synthetic "videos" made in code, for tests and demos of the Semantic Motion Predictor.

Each video shows one coloured disc or square orbiting the image centre, with angular acceleration.
Because the path is an arc and not a straight line, and because an image encoder is non-linear in pixel
positions anyway, the embeddings of the intermediate frames are *not* the linear interpolation of the
endpoints' embeddings: a trained predictor has something to learn, so it can beat the baseline.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Literal

import numpy as np
from PIL import Image, ImageDraw

__all__ = ["make_synthetic_videos", "render_orbit_frames"]

# Draw at this multiple of the output size, then downsample: sub-pixel positions change the pixels
# smoothly, so nearby positions give nearby embeddings.
_SUPERSAMPLE = 4
_BACKGROUND = (20, 20, 24)


def render_orbit_frames(
    num_frames: int,
    *,
    image_size: int = 32,
    rng: np.random.Generator,
    distractor: bool = False,
) -> list[Image.Image]:
    """Frames of one video: a disc or square of random colour on a circular path around the centre.

    Orbit radius, phase, direction, angular speed and angular acceleration are random per video.
    ``distractor`` adds a static square of random colour at a random place (harder to learn from).
    """
    big = image_size * _SUPERSAMPLE
    centre = big / 2
    orbit = rng.uniform(0.18, 0.34) * big
    half = rng.uniform(0.10, 0.15) * big
    phase = rng.uniform(0, 2 * math.pi)
    speed = rng.choice([-1.0, 1.0]) * rng.uniform(0.18, 0.35)  # radians per frame
    accel = rng.uniform(-0.015, 0.015)  # radians per frame², so the angular speed changes along the clip
    colour = tuple(int(c) for c in rng.integers(90, 256, size=3))
    shape = rng.choice(["disc", "square"])
    square_colour = tuple(int(c) for c in rng.integers(40, 200, size=3))
    square_at = rng.uniform(0.05, 0.75, size=2) * big
    square_side = rng.uniform(0.12, 0.2) * big

    frames = []
    for i in range(num_frames):
        angle = phase + speed * i + 0.5 * accel * i * i
        x, y = centre + orbit * math.cos(angle), centre + orbit * math.sin(angle)
        image = Image.new("RGB", (big, big), _BACKGROUND)
        draw = ImageDraw.Draw(image)
        if distractor:
            sx, sy = square_at
            draw.rectangle((sx, sy, sx + square_side, sy + square_side), fill=square_colour)
        box = (x - half, y - half, x + half, y + half)
        if shape == "disc":
            draw.ellipse(box, fill=colour)
        else:
            draw.rectangle(box, fill=colour)
        frames.append(image.resize((image_size, image_size), Image.Resampling.LANCZOS))
    return frames


def make_synthetic_videos(
    out_dir: str | Path,
    *,
    num_videos: int = 24,
    num_frames: int = 16,
    image_size: int = 32,
    seed: int = 0,
    fmt: Literal["png", "gif"] = "png",
    distractor: bool = False,
) -> list[Path]:
    """Write ``num_videos`` orbit videos under ``out_dir`` and return their paths.

    ``fmt="png"`` writes one sub-folder of numbered PNG frames per video, ``fmt="gif"`` one animated GIF
    per video (GIFs quantize colours to a palette, so PNG folders are the exact form). Same seed, same
    pixels.
    """
    if num_videos < 1:
        raise ValueError(f"num_videos must be >= 1, got {num_videos}")
    if num_frames < 1:
        raise ValueError(f"num_frames must be >= 1, got {num_frames}")
    if fmt not in ("png", "gif"):
        raise ValueError(f"fmt must be 'png' or 'gif', got {fmt!r}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for v in range(num_videos):
        frames = render_orbit_frames(num_frames, image_size=image_size, rng=rng, distractor=distractor)
        if fmt == "gif":
            path = out / f"orbit_{v:03d}.gif"
            frames[0].save(path, save_all=True, append_images=frames[1:], duration=80, loop=0)
        else:
            path = out / f"orbit_{v:03d}"
            path.mkdir(exist_ok=True)
            for i, frame in enumerate(frames):
                frame.save(path / f"{i:04d}.png")
        paths.append(path)
    return paths
