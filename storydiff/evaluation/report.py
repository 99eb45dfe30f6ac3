"""Evaluate a finished ``storydiff generate`` folder: read its frames and texts, embed, score, write.

Per character: the pairwise similarity of the frames that show it, in each image encoder's space (CLIP-I,
DINO, and optionally DreamSim and dlib face descriptors). Per frame: CLIP-T against the frame's story
text without the style's wording (what the user asked for) and, beside it, against the styled prompt the
model was given. ``[NC]`` frames show no character, so they only get CLIP-T. A frame showing two
characters counts for both: whole frames are compared unless a mask function (``masks.py``) cuts each
character out before the identity encoders see it.

A video story (``settings["shot_frames"]`` set, e.g. Wan) has a shot per story frame, every video frame of
shot i in ``shots/shot_{i:03d}/frame_{j:04d}.png``. Its report has the same sections, a story frame being a
shot: identity compares shots (the mean cosine over pairs of frames sampled from two shots, ``samples``
evenly spaced per shot, first and last included), CLIP-T is the mean over a shot's sampled frames, and
each frame entry adds the shot's temporal stability (the cosine of every frame with the next, each image
encoder, every frame of the shot) beside a ``video`` summary.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from ..pages.output import SHOTS_DIR, StoryOutput, shot_frame_path
from ..pages.record import StoryRecord, read_record
from ..pages.story import parse_story
from ..support.atomic import atomic_path
from ..support.progress import Progress
from .encoders import TINY, ClipEncoder, DinoEncoder
from .masks import MaskFn, encode_masked, mask_coverage, mask_name
from .metrics import (
    PairSummary,
    block_mean_matrix,
    consecutive_cosine,
    cosine_matrix,
    paired_cosine,
    summarize_pairs,
)
from .plots import mask_sheet

if TYPE_CHECKING:
    from .dreamsim import DreamSimEncoder
    from .face import FaceEncoder

__all__ = [
    "DEFAULT_SHOT_SAMPLES",
    "EvalResult",
    "Shot",
    "StoryFrames",
    "build_report",
    "build_video_report",
    "check_video_options",
    "evaluate_story",
    "read_story_frames",
    "sample_positions",
    "shot_frame_path",
]

TINY_NOTE = "tiny random encoders: these numbers only test the plumbing and mean nothing"
# Face similarity is measured only on the frames where a face is found: its own pairs, with the count.
FACE = "face"
Embeddings = torch.Tensor | np.ndarray


# A video story's frames are in its output folder's layout (``pages.output.shot_frame_path``).
#: frames sampled per shot for a video story's identity and CLIP-T: first, middle, last
DEFAULT_SHOT_SAMPLES = 3


def sample_positions(frames: int, samples: int) -> list[int]:
    """``samples`` frame numbers of a clip of ``frames``, evenly spaced with the first and the last
    (rounded down between them): 9 frames, 3 samples -> 0, 4, 8; 1 sample -> the first frame; every frame
    when the clip has no more than ``samples``."""
    if samples < 1:
        raise ValueError(f"frames sampled per shot must be >= 1, got {samples}")
    if samples >= frames:
        return list(range(frames))
    if samples == 1:
        return [0]
    return [k * (frames - 1) // (samples - 1) for k in range(samples)]


@dataclass(frozen=True)
class Shot:
    """One shot of a video story: its story frame number and every video frame's file, in order."""

    index: int
    paths: list[Path]

    @property
    def folder(self) -> Path:
        return self.paths[0].parent


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
    # a video story: the evaluated shots, following ``indices`` (``paths`` are their first frames); None
    # for an image story
    shots: list[Shot] | None = None

    @property
    def is_video(self) -> bool:
        return self.shots is not None

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
    shot_frames = (record.settings or {}).get("shot_frames")
    if shot_frames is not None:
        return _read_video_frames(root, record, story, shot_frames)
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


def _read_video_frames(root: Path, record: StoryRecord, story, shot_frames) -> StoryFrames:
    """A video story: shot i is evaluated when ``shots/shot_{i:03d}/`` holds all its ``shot_frames``
    frames. A complete run missing one is an error naming the folder and the first missing file; an
    incomplete run (let through by ``allow_incomplete``) is evaluated on its whole shots."""
    if isinstance(shot_frames, bool) or not isinstance(shot_frames, int) or shot_frames < 1:
        raise ValueError(
            f"{record.source}: settings.shot_frames should be a whole number >= 1, not {shot_frames!r}"
        )
    complete = record.status == "complete"
    shots = []
    for index in range(len(record.prompts)):
        paths = [shot_frame_path(root, index, j) for j in range(shot_frames)]
        missing = next((path for path in paths if not path.is_file()), None)
        if missing is None:
            shots.append(Shot(index, paths))
            continue
        if complete:
            folder = missing.parent
            have = len(list(folder.glob("frame_*.png"))) if folder.is_dir() else 0
            where = f"has {have} of its {shot_frames} frames ({missing.name} is missing)"
            if not folder.is_dir():
                where = "is missing"
            raise ValueError(f"{root} says its video story is complete, but shot folder {folder} {where}")
    if not shots:
        raise ValueError(
            f"{root} holds no whole shot yet ({root / SHOTS_DIR} has no shot folder with all its "
            f"{shot_frames} frames)"
        )
    indices = [shot.index for shot in shots]
    return StoryFrames(
        root=root,
        record=record,
        total=len(record.prompts),
        indices=indices,
        paths=[shot.paths[0] for shot in shots],
        characters=[record.frame_characters[i] for i in indices],
        texts=[story.prompt(story.frames[i]) for i in indices],
        prompts=[record.prompts[i] for i in indices],
        shots=shots,
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
    return _assemble(frames, list(embeddings), sources, mask, clip_t, clip_t_styled, characters, per_frame)


def _assemble(
    frames: StoryFrames,
    metrics: list[str],
    sources: dict[str, str] | None,
    mask: str | None,
    clip_t,
    clip_t_styled,
    characters: dict,
    per_frame: list[dict],
) -> dict:
    """The report's keys, in the order report.json has them (an image story's report has exactly these)."""
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
        "identity_metrics": metrics,
        "mask": mask,
        "note": TINY_NOTE if tiny else None,
        "clip_t_mean": _mean(clip_t),
        "clip_t_styled_mean": _mean(clip_t_styled),
        "characters": characters,
        "frames": per_frame,
    }


def _as_array(values: Embeddings) -> np.ndarray:
    if isinstance(values, torch.Tensor):
        values = values.detach().to("cpu", torch.float64).numpy()
    return np.asarray(values, dtype=np.float64).reshape(len(values), -1)


def _temporal(embeddings: np.ndarray) -> dict:
    """A shot's stability in one encoder: cosine of each frame with the next (``values``, pair j is frames
    j and j + 1), their mean and min, and the pair at the min (the likeliest cut or jump)."""
    values = consecutive_cosine(embeddings) if len(embeddings) > 1 else np.zeros(0)
    if not values.size:
        return {"mean": None, "min": None, "min_pair": None, "values": [], "reason": "1 frame: no pair"}
    return {
        "mean": _mean(values),
        "min": float(values.min()),
        "min_pair": int(values.argmin()),
        "values": values.tolist(),
        "reason": None,
    }


def build_video_report(
    frames: StoryFrames,
    clip_images: Embeddings,
    clip_texts: Embeddings,
    clip_prompts: Embeddings,
    *,
    sources: dict[str, str] | None = None,
    identity: dict[str, Embeddings] | None = None,
    samples: int = DEFAULT_SHOT_SAMPLES,
) -> dict:
    """The report of a video story from embeddings of every video frame of its evaluated shots, shot after
    shot: CLIP image (F, D) and ``identity`` ("dino", "dreamsim": (F, D')); CLIP text of the story texts
    and of the styled prompts, one row per shot (N, D).

    The same sections as ``build_report``, a story frame being a shot: per character the shot-by-shot
    matrix (``block_mean_matrix`` of the ``samples`` frames sampled from each shot) and its mean, std and
    min over shot pairs; per shot CLIP-T, the mean over its sampled frames, and ``temporal``: per image
    encoder, the cosine of every frame with the next. Then ``video``: the sampling and the temporal means.
    """
    shots = frames.shots or []
    embeddings = {"clip_i": _as_array(clip_images), **{k: _as_array(v) for k, v in (identity or {}).items()}}
    sizes = [len(shot.paths) for shot in shots]
    starts = np.cumsum([0, *sizes]).tolist()
    if starts[-1] != len(embeddings["clip_i"]):
        raise ValueError(
            f"{starts[-1]} video frames in the shots, but {len(embeddings['clip_i'])} embeddings"
        )
    positions = [sample_positions(size, samples) for size in sizes]
    sampled = [[starts[r] + j for j in chosen] for r, chosen in enumerate(positions)]
    characters = {}
    for name in frames.character_names:
        shown = [r for r, names in enumerate(frames.characters) if name in names]
        entry: dict = {"frames": [frames.indices[r] for r in shown]}
        rows = [row for r in shown for row in sampled[r]]
        for metric, values in embeddings.items():
            matrix = block_mean_matrix(values[rows], [len(sampled[r]) for r in shown])
            summary = summarize_pairs(matrix)
            entry[metric] = {
                "mean": summary.mean,
                "std": summary.std,
                "min": summary.min,
                "matrix": matrix.tolist(),
            }
            reason = (
                None
                if summary.pairs
                else f"{len(shown)} shot{'' if len(shown) == 1 else 's'}: no pair to compare"
            )
            entry.update(pairs=summary.pairs, reason=reason)
        characters[name] = entry
    texts, prompts = _as_array(clip_texts), _as_array(clip_prompts)
    clip_t, clip_t_styled, per_frame = [], [], []
    for r, index in enumerate(frames.indices):
        images = embeddings["clip_i"][sampled[r]]
        to_text = paired_cosine(images, np.repeat(texts[r : r + 1], len(images), axis=0))
        to_prompt = paired_cosine(images, np.repeat(prompts[r : r + 1], len(images), axis=0))
        clip_t.append(_mean(to_text))
        clip_t_styled.append(_mean(to_prompt))
        per_frame.append(
            {
                "index": index,
                "characters": frames.characters[r],
                "clip_t": clip_t[-1],
                "clip_t_styled": clip_t_styled[-1],
                "text": frames.texts[r],
                "prompt": frames.prompts[r],
                "video_frames": sizes[r],
                "sampled_frames": positions[r],
                "clip_t_sampled": to_text.tolist(),
                "temporal": {
                    metric: _temporal(values[starts[r] : starts[r + 1]])
                    for metric, values in embeddings.items()
                },
            }
        )
    report = _assemble(frames, list(embeddings), sources, None, clip_t, clip_t_styled, characters, per_frame)
    settings = frames.record.settings or {}
    temporal = {}
    for metric in embeddings:
        shot_stats = [
            (f["index"], f["temporal"][metric])
            for f in per_frame
            if f["temporal"][metric]["mean"] is not None
        ]
        worst = min(shot_stats, key=lambda item: item[1]["min"], default=(None, {"min": None}))
        temporal[metric] = {
            "mean": _mean(stats["mean"] for _, stats in shot_stats),
            "min": worst[1]["min"],
            "min_shot": worst[0],
        }
    report["video"] = {
        "shot_frames": settings.get("shot_frames"),
        "fps": settings.get("fps"),
        "samples_per_shot": samples,
        "temporal_metrics": list(embeddings),
        "temporal": temporal,
    }
    return report


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
    shot_samples: int = DEFAULT_SHOT_SAMPLES,
) -> EvalResult:
    """Embed a story folder's frames and texts, build the report and write it (``writers.py``) into
    ``out_dir`` (default: ``root/eval``).

    ``dreamsim`` and ``face`` add those identity metrics. ``mask_fn(image, frame_index, character)``
    returns a mask or None (``masks.py``): when given, every identity encoder (CLIP-I, DINO, DreamSim,
    face) sees each character's frames through that character's mask; CLIP-T still sees whole frames.

    A video story (``StoryFrames.is_video``) is scored by ``build_video_report``: every video frame is
    embedded once per image encoder, ``shot_samples`` frames per shot feed identity and CLIP-T, all of
    them temporal stability. Face descriptors and masks are per still frame and are refused there.
    """
    from .writers import write_report

    frames = read_story_frames(root, allow_incomplete=allow_incomplete)
    if frames.is_video:
        check_video_options(frames, face=face is not None, mask=mask_fn is not None)
        report = _video_report(frames, clip, dino, dreamsim, shot_samples, batch_size, progress)
        paths = write_report(report, Path(out_dir) if out_dir is not None else frames.root / "eval")
        return EvalResult(report, paths)
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
        seen: dict = {}  # the masks the encoders got, as thumbnails for the overlay sheet
        identity = _masked_identity(
            frames, {"clip_i": clip, **others}, _remembering(mask_fn, seen), batch_size, progress
        )
    sources = {"clip": clip.source, **{name: encoder.source for name, encoder in others.items()}}
    mask = None if mask_fn is None else mask_name(mask_fn)
    report = build_report(
        frames, clip_images, clip_texts, clip_prompts, sources=sources, identity=identity, mask=mask
    )
    folder = Path(out_dir) if out_dir is not None else frames.root / "eval"
    paths = write_report(report, folder)
    if mask_fn is not None:  # what the identity encoders saw, beside each frame with its mask outlined
        items = [
            (frames.paths[r], frames.indices[r], name)
            for r, names in enumerate(frames.characters)
            for name in names
        ]
        if items:
            sheet = folder / "masks.png"
            folder.mkdir(parents=True, exist_ok=True)
            with atomic_path(sheet) as tmp:
                mask_sheet(items, seen).save(tmp, format="PNG")
            paths["masks_png"] = sheet
    return EvalResult(report, paths)


def _remembering(mask_fn: MaskFn, seen: dict, size: int = 128) -> MaskFn:
    """``mask_fn``, keeping a small copy of each mask it returns in ``seen`` by (frame index, character)."""

    def remember(image, index, character):
        mask = mask_fn(image, index, character)
        if mask is not None and hasattr(mask, "convert"):
            seen[(index, character)] = mask_coverage(mask).resize((size, size))
        return mask

    remember.source = mask_name(mask_fn)  # what the report records
    return remember


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


def check_video_options(frames: StoryFrames, *, face: bool = False, mask: bool = False) -> None:
    """ValueError for what a video story cannot be scored with (face descriptors, per-frame masks)."""
    if not frames.is_video:
        return
    refused = [
        what for what, given in (("face identity (--face)", face), ("masks (--mask-dir)", mask)) if given
    ]
    if refused:
        raise ValueError(
            f"{frames.root} is a video story: {' and '.join(refused)} apply to image stories only; "
            "CLIP-I, DINO and DreamSim score its shots"
        )


def _video_report(
    frames: StoryFrames,
    clip: ClipEncoder,
    dino: DinoEncoder | None,
    dreamsim: DreamSimEncoder | None,
    samples: int,
    batch_size: int,
    progress: Progress,
) -> dict:
    """Embed every video frame of the evaluated shots once per image encoder, and the shots' texts."""
    sample_positions(1, samples)  # a wrong count fails before any encoding
    paths = [path for shot in frames.shots or [] for path in shot.paths]
    clip_images = clip.encode_images(paths, batch_size=batch_size, progress=progress)
    others = {name: e for name, e in (("dino", dino), ("dreamsim", dreamsim)) if e is not None}
    identity = {
        name: encoder.encode_images(paths, batch_size=batch_size, progress=progress)
        for name, encoder in others.items()
    }
    return build_video_report(
        frames,
        clip_images,
        clip.encode_texts(frames.texts, batch_size=batch_size),
        clip.encode_texts(frames.prompts, batch_size=batch_size),
        sources={"clip": clip.source, **{name: encoder.source for name, encoder in others.items()}},
        identity=identity,
        samples=samples,
    )
