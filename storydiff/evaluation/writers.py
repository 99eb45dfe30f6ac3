"""Writing an evaluation report: ``report.json`` (everything), two CSV tables, a PNG, a printed summary.

Every file is written under a temporary name and renamed into place (``atomic.py``), so an evaluation cut
short never leaves a half-written report beside a finished story.
"""

from __future__ import annotations

import csv
import io
from pathlib import Path

from ..support.atomic import atomic_path, write_json, write_text
from .plots import report_figure

__all__ = ["summary_lines", "write_report"]

_LABELS = {"clip_i": "CLIP-I", "dino": "DINO", "dreamsim": "DreamSim", "face": "face"}
_STATS = ("mean", "std", "min")


def _csv(header: list[str], rows: list[list]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(["" if value is None else value for value in row] for row in rows)
    return buffer.getvalue()


def frames_csv(report: dict) -> str:
    """One row per evaluated frame: index, characters ('+'-joined, empty for [NC]), CLIP-T, texts; for a
    video story (a row per shot), then its video frames, the sampled ones ('+'-joined) and, per image
    encoder, the mean and min cosine of consecutive frames with the pair at the min."""
    header = ["index", "characters", "clip_t", "clip_t_styled", "text", "prompt"]
    rows = [
        [f["index"], "+".join(f["characters"]), f["clip_t"], f["clip_t_styled"], f["text"], f["prompt"]]
        for f in report["frames"]
    ]
    if "video" in report:
        metrics = report["video"]["temporal_metrics"]
        header += ["video_frames", "sampled_frames"]
        header += [f"{m}_temporal_{s}" for m in metrics for s in ("mean", "min", "min_pair")]
        for row, f in zip(rows, report["frames"], strict=True):
            row += [f["video_frames"], "+".join(map(str, f["sampled_frames"]))]
            row += [f["temporal"][m][s] for m in metrics for s in ("mean", "min", "min_pair")]
    return _csv(header, rows)


def characters_csv(report: dict) -> str:
    """One row per character: its frames, pairs, and mean/std/min per identity metric (empty, with the
    reason, when it has no pair); with the face metric, also its frames with a detected face
    ('+'-joined) and the face metric's own pairs."""
    metrics = report["identity_metrics"]
    face = ["face_frames", "face_pairs"] if "face" in metrics else []
    header = ["character", "frames", "pairs", *(f"{m}_{s}" for m in metrics for s in _STATS), *face, "reason"]
    rows = []
    for name, entry in report["characters"].items():
        stats = [entry[m][s] for m in metrics for s in _STATS]
        if face:
            stats += ["+".join(map(str, entry["face"]["face_frames"])), entry["face"]["pairs"]]
        rows.append([name, "+".join(map(str, entry["frames"])), entry["pairs"], *stats, entry["reason"]])
    return _csv(header, rows)


def write_report(report: dict, out_dir: Path) -> dict[str, Path]:
    """Write report.json, frames.csv, characters.csv and report.png into ``out_dir``; their paths by kind."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {
        "json": write_json(out_dir / "report.json", report),
        "frames_csv": write_text(out_dir / "frames.csv", frames_csv(report)),
        "characters_csv": write_text(out_dir / "characters.csv", characters_csv(report)),
    }
    png = out_dir / "report.png"
    with atomic_path(png) as tmp:
        report_figure(report).savefig(tmp, format="png", dpi=110)
    paths["png"] = png
    return paths


def _stat(value: dict) -> str:
    return "-" if value["mean"] is None else f"{value['mean']:.3f} ± {value['std']:.3f}"


def summary_lines(report: dict) -> list[str]:
    """A short table for the terminal: per character mean ± std per identity metric, then mean CLIP-T."""
    metrics = report["identity_metrics"]
    names = list(report["characters"])
    width = max([len("character"), *map(len, names)])
    unit = "shots" if "video" in report else "frames"
    header = f"{'character':<{width}}  {unit}  " + "  ".join(f"{_LABELS.get(m, m):<15}" for m in metrics)
    lines = [header.rstrip()]
    for name, entry in report["characters"].items():
        cells = "  ".join(f"{_stat(entry[m]):<15}" for m in metrics)
        reason = f"  ({entry['reason']})" if entry["reason"] else ""
        lines.append(f"{name:<{width}}  {len(entry['frames']):>6}  {cells}{reason}".rstrip())
    evaluated = report["frames_evaluated"]
    if "video" in report:
        lines += _video_lines(report)
    else:
        lines.append(
            f"CLIP-T, mean over {evaluated} frame{'' if evaluated == 1 else 's'}: "
            f"{report['clip_t_mean']:.3f} (story text), {report['clip_t_styled_mean']:.3f} (styled prompt)"
        )
    if "face" in metrics:
        counts = [
            f"{name} {e['face']['faces_detected']}/{e['face']['frames']}"
            for name, e in report["characters"].items()
        ]
        lines.append(f"frames with a detected face: {', '.join(counts)}")
    if report.get("mask"):
        lines.append(f"identity measured through masks ({report['mask']}); CLIP-T on whole frames")
    if report["frames_missing"]:
        what = (
            "not evaluated (not all its frames yet): shots"
            if "video" in report
            else "not evaluated (no image yet): frames"
        )
        lines.append(f"{what} {', '.join(map(str, report['frames_missing']))}")
    if report["note"]:
        lines.append(f"note: {report['note']}")
    return lines


def _number(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def _video_lines(report: dict) -> list[str]:
    """A video story's CLIP-T over shots, then temporal stability: per shot mean / min per encoder."""
    video, shots = report["video"], report["frames"]
    count = len(shots)
    lines = [
        f"CLIP-T, mean over {count} shot{'' if count == 1 else 's'} ({video['samples_per_shot']} sampled "
        f"frames each): {report['clip_t_mean']:.3f} (story text), {report['clip_t_styled_mean']:.3f} "
        "(styled prompt)",
        "temporal stability (cosine of consecutive frames), mean / min:",
    ]
    metrics = video["temporal_metrics"]
    header = "  shot  frames  " + "  ".join(f"{_LABELS.get(m, m):<15}" for m in metrics)
    lines.append(header.rstrip())
    for shot in shots:
        cells = "  ".join(
            f"{_number(shot['temporal'][m]['mean']) + ' / ' + _number(shot['temporal'][m]['min']):<15}"
            for m in metrics
        )
        lines.append(f"  {shot['index']:>4}  {shot['video_frames']:>6}  {cells}".rstrip())
    overall = "  ".join(
        f"{_number(video['temporal'][m]['mean']) + ' / ' + _number(video['temporal'][m]['min']):<15}"
        for m in metrics
    )
    lines.append(f"  {'all':>4}  {'':>6}  {overall}".rstrip())
    return lines
