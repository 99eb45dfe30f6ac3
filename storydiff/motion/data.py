"""Training clips for the motion predictor: held-out split by video, and (start, middle, end) samples.

A clip is L + 2 frames, ``stride`` frames apart: its first and last frames are the predictor's inputs,
the L frames between them its targets. Every valid clip start of every video is one sample; shuffling is
the trainer's job (seeded, so runs and resumes are reproducible).
"""

from __future__ import annotations

import random
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from torch import Tensor
from torch.utils.data import Dataset

from .cache import EmbeddingCache
from .encoder import ImageEncoder
from .video_sources import VideoSource, find_videos

__all__ = ["ClipDataset", "MotionData", "build_datasets", "clip_span", "split_videos"]


def clip_span(num_frames: int, stride: int) -> int:
    """Video frames one clip covers: L intermediate frames plus both endpoints, ``stride`` apart."""
    return (num_frames + 1) * stride + 1


class ClipDataset(Dataset):
    """(start (T, C), intermediate (L, T, C), end (T, C)) clips from cached per-frame embeddings.

    Args:
        embeddings: per video, (F, T, C) embeddings of all its frames.
        num_frames: L, intermediate frames per clip.
        stride: frame step inside a clip (2 = every other frame).
    """

    def __init__(self, embeddings: Sequence[Tensor], num_frames: int, *, stride: int = 1) -> None:
        if num_frames < 1:
            raise ValueError(f"num_frames must be >= 1, got {num_frames}")
        if stride < 1:
            raise ValueError(f"stride must be >= 1, got {stride}")
        self.embeddings = list(embeddings)
        self.num_frames = num_frames
        self.stride = stride
        span = clip_span(num_frames, stride)
        self.index = [(v, s) for v, e in enumerate(self.embeddings) for s in range(e.shape[0] - span + 1)]

    @property
    def num_videos(self) -> int:
        return len(self.embeddings)

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor, Tensor]:
        video, first = self.index[i]
        last = first + (self.num_frames + 1) * self.stride
        frames = self.embeddings[video][first : last + 1 : self.stride]
        return frames[0], frames[1:-1], frames[-1]


def split_videos(
    sources: Sequence[VideoSource], *, holdout: float = 0.15, seed: int = 0
) -> tuple[list[VideoSource], list[VideoSource]]:
    """(train, held-out) by video — clips of one video never land on both sides. At least one each."""
    if not 0.0 < holdout < 1.0:
        raise ValueError(f"holdout must be in (0, 1), got {holdout}")
    if len(sources) < 2:
        raise ValueError(
            f"need at least 2 usable videos (one is held out for evaluation), found {len(sources)}"
        )
    order = list(range(len(sources)))
    random.Random(seed).shuffle(order)
    held = min(max(1, round(holdout * len(sources))), len(sources) - 1)
    held_ids = set(order[:held])
    train = [s for i, s in enumerate(sources) if i not in held_ids]
    return train, [s for i, s in enumerate(sources) if i in held_ids]


@dataclass
class MotionData:
    train: ClipDataset
    heldout: ClipDataset
    train_sources: list[VideoSource]
    heldout_sources: list[VideoSource]
    cache: EmbeddingCache


def build_datasets(
    data_dir: str | Path,
    encoder: ImageEncoder,
    *,
    num_frames: int,
    cache_dir: str | Path,
    tokens: bool = False,
    stride: int = 1,
    holdout: float = 0.15,
    seed: int = 0,
) -> MotionData:
    """Find the videos in ``data_dir``, drop those too short for one clip, split, encode (cached), wrap.

    Raises:
        FileNotFoundError / NotADirectoryError / ValueError: see ``find_videos``; also ValueError when no
            video is long enough for a clip of ``num_frames`` + 2 frames, or fewer than 2 remain.
    """
    if num_frames < 1:
        raise ValueError(f"num_frames must be >= 1, got {num_frames}")
    span = clip_span(num_frames, stride)
    sources = []
    for source in find_videos(data_dir):
        if source.num_frames < span:
            warnings.warn(
                f"skipping {source.path}: {source.num_frames} frames, a clip needs {span} "
                f"(num_frames={num_frames} + 2 endpoints, stride {stride})",
                stacklevel=2,
            )
        else:
            sources.append(source)
    if not sources:
        raise ValueError(
            f"no video in {data_dir} has the {span} frames one clip needs (num_frames={num_frames}, "
            f"stride={stride}); use fewer --frames or longer videos"
        )
    train_sources, heldout_sources = split_videos(sources, holdout=holdout, seed=seed)
    cache = EmbeddingCache(cache_dir, encoder, tokens=tokens)
    train = ClipDataset(cache.load_all(train_sources), num_frames, stride=stride)
    heldout = ClipDataset(cache.load_all(heldout_sources), num_frames, stride=stride)
    return MotionData(train, heldout, train_sources, heldout_sources, cache)
