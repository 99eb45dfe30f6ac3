"""A generated image story animated by an image-to-video model (Wan 2.x I2V), shots kept consistent.

Two ways, both one story run of ``StoryDiffusionPipeline`` on the I2V pipeline (so consistent attention,
banks, window mode, checkpoints and the video output work as for text-to-video stories):

* shots (``keyframe_story``): each frame of the image story becomes a shot that starts on its keyframe,
  with the frame's own prompt and characters;
* transitions (``transition_story``): clip i starts on keyframe i and ends on keyframe i + 1 (first–last
  frame: ``last_image``), prompted with frame i + 1's text and showing the characters of both frames — the
  paper's transition video on a model that can end on a given frame.
"""

from __future__ import annotations

import os
from itertools import pairwise
from pathlib import Path

from PIL import Image

from ..pages.output import frame_path
from ..pages.record import read_record
from ..pages.story import NO_CHARACTER, Frame, Story, parse_story, story_source

__all__ = ["keyframe_story", "read_image_story", "transition_story"]


def read_image_story(story_dir: str | os.PathLike) -> tuple[Story, list[Image.Image]]:
    """The story and its frames (``frames/frame_NNN.png``) of a complete ``storydiff generate`` folder."""
    root = Path(story_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"story folder {root} does not exist")
    record = read_record(root)
    if record.status != "complete":
        raise ValueError(f"the story run in {root} has status {record.status!r}: animate a complete run")
    if record.settings.get("shot_frames") is not None:
        raise ValueError(f"{root} holds a video story already; animate an image story")
    story = parse_story(record.story_text)
    paths = [frame_path(root, frame.index) for frame in story.frames]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"the story in {root} lacks frame image(s): {', '.join(missing[:3])}")
    return story, [_read_rgb(path) for path in paths]


def _read_rgb(path: Path) -> Image.Image:
    with Image.open(path) as opened:  # read now: the file closes here
        return opened.convert("RGB")


def keyframe_story(story_dir: str | os.PathLike) -> tuple[Story, list[tuple[Image.Image, None]]]:
    """Shots: the image story itself, each frame's image the start of its shot."""
    story, images = read_image_story(story_dir)
    return story, [(image, None) for image in images]


def transition_story(story_dir: str | os.PathLike) -> tuple[Story, list[tuple[Image.Image, Image.Image]]]:
    """Transitions: for each pair of consecutive frames a clip from the first to the second."""
    story, images = read_image_story(story_dir)
    if len(images) < 2:
        raise ValueError(f"a transition needs 2 frames; the story in {story_dir} has {len(images)}")
    frames = []
    for index, (before, after) in enumerate(pairwise(story.frames)):
        shown = tuple(dict.fromkeys(before.characters + after.characters))
        extra = " ".join(f"[{name}]" for name in shown if name not in after.characters)
        text = after.text
        if extra:  # the characters leaving the scene are in it still: an [NC] target loses its mark
            text = f"{text.replace(f'[{NO_CHARACTER}]', '').strip()} {extra}"
        frames.append(Frame(index, text, shown, after.caption, after.line))
    joined = Story(dict(story.characters), tuple(frames))
    # through the story text and back: the transitions are checked as any story is
    return parse_story(story_source(joined)), list(pairwise(images))
