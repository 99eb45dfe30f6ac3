"""Evaluation of a finished story: character consistency (CLIP-I, DINO) and prompt fidelity (CLIP-T); for
a video story, the same across its shots and the temporal stability within each.

``metrics`` computes from embeddings alone, ``encoders`` loads (or builds, tiny and random) the models that
make them, ``report`` reads a story folder and builds the report, ``writers`` and ``plots`` write it.
"""

from .encoders import TINY, ClipEncoder, DinoEncoder, build_tiny_encoders, load_clip, load_dino
from .metrics import (
    PairSummary,
    block_mean_matrix,
    consecutive_cosine,
    cosine_matrix,
    pair_values,
    paired_cosine,
    summarize_pairs,
)
from .report import (
    DEFAULT_SHOT_SAMPLES,
    EvalResult,
    Shot,
    StoryFrames,
    build_report,
    build_video_report,
    evaluate_story,
    read_story_frames,
)
from .writers import summary_lines, write_report

__all__ = [
    "DEFAULT_SHOT_SAMPLES",
    "TINY",
    "ClipEncoder",
    "DinoEncoder",
    "EvalResult",
    "PairSummary",
    "Shot",
    "StoryFrames",
    "block_mean_matrix",
    "build_report",
    "build_tiny_encoders",
    "build_video_report",
    "consecutive_cosine",
    "cosine_matrix",
    "evaluate_story",
    "load_clip",
    "load_dino",
    "pair_values",
    "paired_cosine",
    "read_story_frames",
    "summarize_pairs",
    "summary_lines",
    "write_report",
]
