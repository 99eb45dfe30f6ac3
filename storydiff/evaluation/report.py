"""Evaluate a finished ``storydiff generate`` folder: read its frames and texts, embed, score, write.

Per character: the pairwise similarity of the frames that show it, in each image encoder's space (CLIP-I,
DINO, and optionally DreamSim and dlib face descriptors). Per frame: CLIP-T against the frame's story
text without the style's wording (what the user asked for) and, beside it, against the styled prompt the
model was given. ``[NC]`` frames show no character, so they only get CLIP-T. A frame showing two
characters counts for both: whole frames are compared unless a mask function (``masks.py``) cuts each
character out before the identity encoders see it.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from ..pages.output import StoryOutput
from ..pages.record import StoryRecord, read_record
from ..pages.story import parse_story
from ..support.progress import Progress
from .encoders import TINY, ClipEncoder, DinoEncoder
from .masks import MaskFn, encode_masked, mask_name
from .metrics import PairSummary, cosine_matrix, paired_cosine, summarize_pairs

if TYPE_CHECKING:
    from .dreamsim import DreamSimEncoder
    from .face import FaceEncoder

__all__ = ["EvalResult", "StoryFrames", "build_report", "evaluate_story", "read_story_frames"]

TINY_NOTE = "tiny random encoders: these numbers only test the plumbing and mean nothing"
# Face similarity is measured only on the frames where a face is found: its own pairs, with the count.
FACE = "face"
Embeddings = torch.Tensor | np.ndarray


@dataclass(frozen=True)
class StoryFrames:
    """What an evaluation reads from a story folder: the frames on disk and, for each, its texts.

    ``indices`` are the story's frame numbers that have an image (all of them for a complete run);
    ``characters``, ``texts`` (story text, no style), ``prompts`` (styled) and ``paths`` follow them.
    """

    root: Path
    record: StoryRecord
    total: int
    indices: list[int]
    paths: list[Path]
    characters: list[list[str]]
    texts: list[str]
    prompts: list[str]

    @property
    def character_names(self) -> list[str]:
        """Every character of the story, in definition order."""
        names = dict.fromkeys(self.record.characters)
        for names_in_frame in self.record.frame_characters or []:
            names.update(dict.fromkeys(names_in_frame))
        return list(names)


def read_story_frames(root: str | os.PathLike, *, allow_incomplete: bool = False) -> StoryFrames:
    """Read a story folder; ValueError (naming the folder) unless it holds a complete run, or, with
    ``allow_incomplete``, at least one frame."""
    root = Path(root)
    if not root.is_dir():
        raise ValueError(f"story folder {root} does not exist")
    record = read_record(root)
    status = record.status or "?"
    if status != "complete" and not allow_incomplete:
        raise ValueError(
            f"{root} holds a run with status {status!r}, not 'complete'; to evaluate the frames it has, "
            "add --allow-incomplete"
        )
    record.need(("story_text", "prompts", "frame_characters"), "an evaluation")
    prompts, frame_characters = record.prompts, record.frame_characters
    try:
        story = parse_story(record.story_text)
    except ValueError as exc:
        raise ValueError(f"{record.source}: its story_text does not parse ({exc})") from None
    if not len(story.frames) == len(prompts) == len(frame_characters):
        raise ValueError(
            f"{root}: metadata.json disagrees with itself: {len(story.frames)} frames in story_text, "
            f"{len(prompts)} prompts, {len(frame_characters)} frame_characters entries"
        )
    # follower=True: a view of the folder's layout that checks and writes nothing; frame_path is the one
    # definition of the frames' file names.
    layout = StoryOutput(root, follower=True)
    indices = [i for i in range(len(prompts)) if layout.frame_path(i).is_file()]
    missing = sorted(set(range(len(prompts))) - set(indices))
    if missing and status == "complete":
        raise ValueError(f"{root} says its run is complete, but {layout.frame_path(missing[0])} is missing")
    if not indices:
        raise ValueError(f"{root} holds no frames yet ({layout.frames_dir} has none of the story's frames)")
    return StoryFrames(
        root=root,
        record=record,
        total=len(prompts),
        indices=indices,
        paths=[layout.frame_path(i) for i in indices],
        characters=[frame_characters[i] for i in indices],
        texts=[story.prompt(story.frames[i]) for i in indices],
        prompts=[prompts[i] for i in indices],
    )


def _mean(values) -> float | None:
    values = [float(v) for v in values]
    return math.fsum(values) / len(values) if values else None


def _character_rows(embeddings: Embeddings | dict[str, Embeddings], name: str, rows: list[int]) -> np.ndarray:
    """The (n, D) float64 embeddings of character ``name``'s frames: rows of a per-frame array, or its own
    entry of a per-character dict (masked frames)."""
    if isinstance(embeddings, dict):
        chosen = embeddings.get(name)
        chosen = np.zeros((0, 0)) if chosen is None else chosen
    else:
        chosen = embeddings[rows] if rows else np.zeros((0, 0))
    if isinstance(chosen, torch.Tensor):
        chosen = chosen.detach().to("cpu", torch.float64).numpy()
    return np.asarray(chosen, dtype=np.float64).reshape(len(chosen), -1)


def _stats(embeddings: np.ndarray) -> tuple[dict, PairSummary]:
    matrix = cosine_matrix(embeddings) if len(embeddings) else np.zeros((0, 0))
    summary = summarize_pairs(matrix)
    return {"mean": summary.mean, "std": summary.std, "min": summary.min, "matrix": matrix.tolist()}, summary


def _face_stats(embeddings: np.ndarray, frame_numbers: list[int]) -> dict:
    """Face similarity over the frames with a face (rows not NaN), with how many of the frames had one."""
    found = np.isfinite(embeddings).all(axis=1) if len(embeddings) else np.zeros(0, dtype=bool)
    stats, summary = _stats(embeddings[found])
    detected, total = int(found.sum()), len(frame_numbers)
    reason = None if summary.pairs else f"a face in {detected} of {total} frames: no pair to compare"
    return {
        **stats,
        "pairs": summary.pairs,
        "reason": reason,
        "frames": total,
        "faces_detected": detected,
        "face_frames": [index for index, hit in zip(frame_numbers, found.tolist(), strict=True) if hit],
    }


def build_report(
    frames: StoryFrames,
    clip_images: torch.Tensor,
    clip_texts: torch.Tensor,
    clip_prompts: torch.Tensor,
    dino_images: torch.Tensor | None = None,
    *,
    sources: dict[str, str] | None = None,
    identity: dict[str, Embeddings | dict[str, Embeddings]] | None = None,
    mask: str | None = None,
) -> dict:
    """The report from embeddings, one row per evaluated frame: CLIP image (N, D), CLIP text of the story
    texts and of the styled prompts (N, D), DINO image (N, D') or None. ``sources`` names each encoder's
    checkpoint ({"clip": ..., "dino": ..., "dreamsim": ..., "face": ...}).

    ``identity`` adds identity metrics ("dreamsim", "face") or replaces CLIP-I's and DINO's embeddings:
    name -> either (N, D), one row per evaluated frame, or a dict character -> (n, D), the rows of that
    character's frames in order (frames masked per character). Face rows of NaN are frames without a
    face. ``mask`` names the mask the identity embeddings went through (None: whole frames); CLIP-T always
    uses ``clip_images``, the whole frames.
    """
    embeddings = {"clip_i": clip_images}
    if dino_images is not None:
        embeddings["dino"] = dino_images
    embeddings.update(identity or {})
    characters = {}
    for name in frames.character_names:
        rows = [r for r, names in enumerate(frames.characters) if name in names]
        entry: dict = {"frames": [frames.indices[r] for r in rows]}
        for metric, values in embeddings.items():
            character_rows = _character_rows(values, name, rows)
            if metric == FACE:  # its own pairs: they need not be the frames' pairs
                entry[metric] = _face_stats(character_rows, entry["frames"])
                continue
            entry[metric], summary = _stats(character_rows)
            entry.update(pairs=summary.pairs, reason=summary.reason)
        characters[name] = entry
    clip_t = paired_cosine(clip_images, clip_texts)
    clip_t_styled = paired_cosine(clip_images, clip_prompts)
    per_frame = [
        {
            "index": index,
            "characters": frames.characters[r],
            "clip_t": float(clip_t[r]),
            "clip_t_styled": float(clip_t_styled[r]),
            "text": frames.texts[r],
            "prompt": frames.prompts[r],
        }
        for r, index in enumerate(frames.indices)
    ]
    sources = sources or {}
    tiny = TINY in sources.values()
    return {
        "story_dir": str(frames.root),
        "status": frames.record.status,
        "style": (frames.record.settings or {}).get("style"),
        "frames_total": frames.total,
        "frames_evaluated": len(frames.indices),
        "frames_missing": sorted(set(range(frames.total)) - set(frames.indices)),
        "encoders": {name: sources.get(name) for name in ("clip", "dino", "dreamsim", "face")},
        "identity_metrics": list(embeddings),
        "mask": mask,
        "note": TINY_NOTE if tiny else None,
        "clip_t_mean": _mean(clip_t),
        "clip_t_styled_mean": _mean(clip_t_styled),
        "characters": characters,
        "frames": per_frame,
    }


@dataclass(frozen=True)
class EvalResult:
    """The report (as ``report.json`` holds it) and the written files by kind (json, frames_csv,
    characters_csv, png)."""

    report: dict
    paths: dict[str, Path]


def evaluate_story(
    root: str | os.PathLike,
    clip: ClipEncoder,
    dino: DinoEncoder | None = None,
    *,
    out_dir: str | os.PathLike | None = None,
    allow_incomplete: bool = False,
    batch_size: int = 16,
    progress: Progress = False,
    dreamsim: DreamSimEncoder | None = None,
    face: FaceEncoder | None = None,
    mask_fn: MaskFn | None = None,
) -> EvalResult:
    """Embed a story folder's frames and texts, build the report and write it (``writers.py``) into
    ``out_dir`` (default: ``root/eval``).

    ``dreamsim`` and ``face`` add those identity metrics. ``mask_fn(image, frame_index, character)``
    returns a mask or None (``masks.py``): when given, every identity encoder (CLIP-I, DINO, DreamSim,
    face) sees each character's frames through that character's mask; CLIP-T still sees whole frames.
    """
    from .writers import write_report

    frames = read_story_frames(root, allow_incomplete=allow_incomplete)
    clip_images = clip.encode_images(frames.paths, batch_size=batch_size, progress=progress)
    clip_texts = clip.encode_texts(frames.texts, batch_size=batch_size)
    clip_prompts = clip.encode_texts(frames.prompts, batch_size=batch_size)
    others = {name: e for name, e in (("dino", dino), ("dreamsim", dreamsim), (FACE, face)) if e is not None}
    if mask_fn is None:
        identity = {
            name: encoder.encode_images(frames.paths, batch_size=batch_size, progress=progress)
            for name, encoder in others.items()
        }
    else:
        identity = _masked_identity(frames, {"clip_i": clip, **others}, mask_fn, batch_size, progress)
    sources = {"clip": clip.source, **{name: encoder.source for name, encoder in others.items()}}
    mask = None if mask_fn is None else mask_name(mask_fn)
    report = build_report(
        frames, clip_images, clip_texts, clip_prompts, sources=sources, identity=identity, mask=mask
    )
    paths = write_report(report, Path(out_dir) if out_dir is not None else frames.root / "eval")
    return EvalResult(report, paths)


def _masked_identity(
    frames: StoryFrames, encoders: dict, mask_fn: MaskFn, batch_size: int, progress: Progress
) -> dict[str, dict[str, torch.Tensor]]:
    """Per identity metric, per character: the embeddings of its frames seen through its mask."""
    items = [
        (frames.paths[r], frames.indices[r], name)
        for r, names in enumerate(frames.characters)
        for name in names
    ]
    embedded = encode_masked(items, encoders, mask_fn, batch_size=batch_size, progress=progress)
    owners = [name for _, _, name in items]
    return {
        metric: {
            name: rows[[k for k, owner in enumerate(owners) if owner == name]]
            for name in frames.character_names
        }
        for metric, rows in embedded.items()
    }
