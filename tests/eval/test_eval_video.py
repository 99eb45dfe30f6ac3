"""`storydiff eval` on a video story: identity across shots, CLIP-T per shot, temporal stability per shot.

The folder is written by hand in the layout a video story run writes (metadata.json with
``settings["shot_frames"]``, every video frame as ``shots/shot_000/frame_0000.png``, the stills in
``frames/``), so every frame is known: Bob is the same red disc on the same background in both his shots
(drifting the other way in the second), Alice a blue square in one shot and a green triangle on another
background in the other, and the last shot ([NC], no character) cuts to noise half-way. The encoders are
the tiny random ones: their numbers mean nothing, but identical pictures embed identically and very
different ones apart.
"""

from __future__ import annotations

import csv
import itertools
import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from storydiff.cli import main
from storydiff.evaluation import (
    block_mean_matrix,
    build_report,
    build_tiny_encoders,
    consecutive_cosine,
    evaluate_story,
    read_story_frames,
)
from storydiff.evaluation.report import DEFAULT_SHOT_SAMPLES, sample_positions, shot_frame_path
from storydiff.evaluation.writers import frames_csv, summary_lines
from storydiff.pages.record import StoryRecord
from storydiff.pages.story import parse_story

STORY = """\
[Bob] a man with red hair
[Alice] a woman in a yellow dress
---
[Bob] walks in the park
[Alice] waters the flowers
[Bob] reads a newspaper
[Alice] rides a bicycle
[NC] a quiet street at night
"""
FRAMES = {"Bob": [0, 2], "Alice": [1, 3]}
SHOT_FRAMES, SIZE = 5, 64
JUMP_SHOT, JUMP_PAIR = 4, 2  # the [NC] shot cuts to noise between its frames 2 and 3


def _draw(background, colour, shape: str, x: int) -> Image.Image:
    image = Image.new("RGB", (SIZE, SIZE), background)
    box = (x, 20, x + 24, 44)
    draw = ImageDraw.Draw(image)
    if shape == "disc":
        draw.ellipse(box, fill=colour)
    elif shape == "square":
        draw.rectangle(box, fill=colour)
    else:
        draw.polygon([(x, 44), (x + 12, 20), (x + 24, 44)], fill=colour)
    return image


def _shot_frame(shot: int, j: int) -> Image.Image:
    if shot == 0:  # Bob, drifting right
        return _draw((230, 230, 230), (200, 30, 30), "disc", 10 + j)
    if shot == 2:  # Bob again, drifting left
        return _draw((230, 230, 230), (200, 30, 30), "disc", 14 - j)
    if shot == 1:  # Alice as a blue square
        return _draw((40, 40, 40), (30, 60, 220), "square", 20 + j)
    if shot == 3:  # Alice as a green triangle
        return _draw((250, 220, 120), (20, 180, 40), "triangle", 20 + j)
    if j > JUMP_PAIR:  # the [NC] shot: a cut to noise after frame 2
        return Image.fromarray(np.random.default_rng(j).integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8))
    return _draw((20, 20, 60), (90, 90, 90), "square", 5 + 2 * j)  # a street at night


def _write_video_story(root, *, status: str = "complete"):
    story = parse_story(STORY)
    root.mkdir(parents=True)
    StoryRecord(
        model="tiny-wan",
        story_text=STORY,
        settings={"style": "comic", "shot_frames": SHOT_FRAMES, "fps": 8},
        prompts=[f"{story.prompt(frame)}, comic style" for frame in story.frames],
        characters={name: c.description for name, c in story.characters.items()},
        frame_characters=[list(frame.characters) for frame in story.frames],
        status=status,
    ).write(root)
    (root / "frames").mkdir()
    for frame in story.frames:
        shot_frame_path(root, frame.index, 0).parent.mkdir(parents=True)
        for j in range(SHOT_FRAMES):
            _shot_frame(frame.index, j).save(shot_frame_path(root, frame.index, j))
        _shot_frame(frame.index, 0).save(root / "frames" / f"frame_{frame.index:03d}.png")
    return root


@pytest.fixture(scope="module")
def video_dir(tmp_path_factory):
    return _write_video_story(tmp_path_factory.mktemp("video") / "story")


@pytest.fixture(scope="module")
def encoders():
    return build_tiny_encoders()


@pytest.fixture(scope="module")
def report(video_dir, encoders, tmp_path_factory):
    return evaluate_story(video_dir, *encoders, out_dir=tmp_path_factory.mktemp("scores")).report


def _eval(*argv) -> int:
    return main(["eval", *map(str, argv)])


def test_sample_positions():
    assert DEFAULT_SHOT_SAMPLES == 3
    assert sample_positions(9, 3) == [0, 4, 8] and sample_positions(10, 3) == [0, 4, 9]
    assert sample_positions(81, 1) == [0] and sample_positions(2, 3) == [0, 1]
    assert sample_positions(5, 5) == [0, 1, 2, 3, 4] and sample_positions(81, 2) == [0, 80]
    with pytest.raises(ValueError, match=">= 1"):
        sample_positions(5, 0)


def test_block_mean_and_consecutive_cosine():
    rows = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [1.0, 1.0]])
    # groups {0, 1} and {2, 3}: cosines 1, 1/sqrt2 (row 0), 0, 1/sqrt2 (row 1) -> mean (1 + sqrt2) / 4
    matrix = block_mean_matrix(rows, [2, 2])
    assert matrix == pytest.approx(np.array([[1.0, (1 + 2**0.5) / 4], [(1 + 2**0.5) / 4, 1.0]]))
    assert consecutive_cosine(rows) == pytest.approx([0.0, 0.0, 2**-0.5])
    assert consecutive_cosine(rows[:1]).size == 0
    with pytest.raises(ValueError, match="do not split"):
        block_mean_matrix(rows, [2, 1])


def test_report_has_the_video_sections(report):
    assert report["identity_metrics"] == ["clip_i", "dino"] and "mean nothing" in report["note"]
    video = report["video"]
    assert video["shot_frames"] == SHOT_FRAMES and video["fps"] == 8 and video["samples_per_shot"] == 3
    assert video["temporal_metrics"] == ["clip_i", "dino"]
    assert report["frames_evaluated"] == 5 and report["frames_missing"] == []
    assert {name: entry["frames"] for name, entry in report["characters"].items()} == FRAMES
    for shot in report["frames"]:
        assert shot["video_frames"] == SHOT_FRAMES and shot["sampled_frames"] == [0, 2, 4]
        # CLIP-T per shot: the mean over its sampled frames
        assert len(shot["clip_t_sampled"]) == 3 and -1 <= shot["clip_t"] <= 1
        assert shot["clip_t"] == pytest.approx(sum(shot["clip_t_sampled"]) / 3, abs=1e-12)
        assert isinstance(shot["clip_t_styled"], float) and shot["prompt"].endswith("comic style")
        for metric in ("clip_i", "dino"):
            stats = shot["temporal"][metric]
            assert len(stats["values"]) == SHOT_FRAMES - 1 and stats["min"] == min(stats["values"])
    assert report["clip_t_mean"] == pytest.approx(sum(f["clip_t"] for f in report["frames"]) / 5, abs=1e-12)
    for name in FRAMES:
        entry = report["characters"][name]
        assert entry["pairs"] == 1 and entry["reason"] is None and len(entry["clip_i"]["matrix"]) == 2


def test_identity_across_shots_of_one_character_beats_a_changed_one(report):
    for metric in ("clip_i", "dino"):
        bob, alice = (report["characters"][name][metric]["mean"] for name in ("Bob", "Alice"))
        assert bob > alice + 0.02, (metric, bob, alice)


def test_temporal_stability_flags_the_jump(report):
    for metric in ("clip_i", "dino"):
        stats = {shot["index"]: shot["temporal"][metric] for shot in report["frames"]}
        jump = stats.pop(JUMP_SHOT)
        assert jump["min_pair"] == JUMP_PAIR
        assert all(jump["min"] < other["min"] - 0.02 for other in stats.values()), metric
        summary = report["video"]["temporal"][metric]
        assert summary["min_shot"] == JUMP_SHOT and summary["min"] == jump["min"]
        means = [shot["temporal"][metric]["mean"] for shot in report["frames"]]
        assert summary["mean"] == pytest.approx(sum(means) / len(means), abs=1e-12)


def _cos(a: torch.Tensor, b: torch.Tensor) -> float:
    return torch.nn.functional.cosine_similarity(a.double(), b.double(), dim=-1).item()


def test_numbers_equal_a_direct_computation(video_dir, encoders, report):
    clip, dino = encoders
    shots = {s: [_shot_frame(s, j) for j in range(SHOT_FRAMES)] for s in range(5)}
    for metric, encoder in (("clip_i", clip), ("dino", dino)):
        rows = {s: encoder.encode_images(images) for s, images in shots.items()}
        for name, (a, b) in FRAMES.items():
            pairs = [_cos(rows[a][i], rows[b][j]) for i, j in itertools.product((0, 2, 4), repeat=2)]
            assert report["characters"][name][metric]["mean"] == pytest.approx(sum(pairs) / 9, abs=1e-6)
        for shot in report["frames"]:
            embedded = rows[shot["index"]]
            expected = [_cos(embedded[j], embedded[j + 1]) for j in range(SHOT_FRAMES - 1)]
            assert shot["temporal"][metric]["values"] == pytest.approx(expected, abs=1e-6)
    texts = clip.encode_texts([shot["text"] for shot in report["frames"]])
    for r, shot in enumerate(report["frames"]):
        images = clip.encode_images([shots[shot["index"]][j] for j in (0, 2, 4)])
        expected = [_cos(image, texts[r]) for image in images]
        assert shot["clip_t_sampled"] == pytest.approx(expected, abs=1e-6)


def test_cli_writes_the_same_files_with_video_columns(video_dir, tmp_path, capsys):
    out = tmp_path / "scores"
    assert _eval(video_dir, "--clip", "tiny", "--no-dino", "--shot-samples", 2, "--out", out) == 0
    printed = capsys.readouterr().out
    for name in ("report.json", "frames.csv", "characters.csv", "report.png"):
        assert (out / name).stat().st_size > 0 and str(out / name) in printed
    assert Image.open(out / "report.png").format == "PNG"
    report = json.loads((out / "report.json").read_text())
    assert report["video"]["samples_per_shot"] == 2 and report["identity_metrics"] == ["clip_i"]
    assert all(shot["sampled_frames"] == [0, SHOT_FRAMES - 1] for shot in report["frames"])
    with open(out / "frames.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [row["index"] for row in rows] == ["0", "1", "2", "3", "4"]
    assert (
        rows[JUMP_SHOT]["clip_i_temporal_min_pair"] == str(JUMP_PAIR) and rows[0]["sampled_frames"] == "0+4"
    )
    assert float(rows[1]["clip_i_temporal_mean"]) == pytest.approx(
        report["frames"][1]["temporal"]["clip_i"]["mean"]
    )
    with open(out / "characters.csv", newline="") as handle:
        assert {row["character"]: row["frames"] for row in csv.DictReader(handle)} == {
            "Bob": "0+2",
            "Alice": "1+3",
        }
    assert "CLIP-T, mean over 5 shots (2 sampled frames each)" in printed
    assert "temporal stability" in printed and "character  shots" in printed


def test_missing_shot_frames_are_an_error_naming_the_folder(video_dir, tmp_path, capsys):
    copy = tmp_path / "story"
    shutil.copytree(video_dir, copy, ignore=shutil.ignore_patterns("eval"))
    (copy / "shots" / "shot_002" / "frame_0003.png").unlink()
    assert _eval(copy, "--clip", "tiny", "--no-dino", "--out", tmp_path / "out") == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and str(copy / "shots" / "shot_002") in error
    assert "has 4 of its 5 frames (frame_0003.png is missing)" in error and not (tmp_path / "out").exists()
    shutil.rmtree(copy / "shots" / "shot_001")
    with pytest.raises(ValueError, match=r"shot folder .*shot_001 is missing"):
        read_story_frames(copy)
    # an interrupted run: its whole shots are evaluated with --allow-incomplete
    record = StoryRecord.read(copy)
    record.status = "interrupted"
    record.write(copy)
    frames = read_story_frames(copy, allow_incomplete=True)
    assert frames.is_video and frames.indices == [0, 3, 4]
    assert [shot.folder.name for shot in frames.shots] == ["shot_000", "shot_003", "shot_004"]
    shutil.rmtree(copy / "shots")
    with pytest.raises(ValueError, match="holds no whole shot yet"):
        read_story_frames(copy, allow_incomplete=True)


def test_face_and_masks_are_refused_before_loading(video_dir, tmp_path, capsys):
    for extra in (["--face"], ["--mask-dir", tmp_path]):
        assert _eval(video_dir, "--clip", "/nonexistent", "--no-dino", *extra) == 2
        error = capsys.readouterr().err
        assert "is a video story" in error and "image stories only" in error and "nonexistent" not in error


def test_an_image_story_report_is_unchanged(tmp_path, encoders):
    """The same folder without ``shot_frames`` is an image story: the report of its stills has exactly the
    image report's keys and columns, and equals build_report's from the stills' embeddings."""
    root = _write_video_story(tmp_path / "story")
    record = StoryRecord.read(root)
    record.settings = {"style": "comic", "shot_frames": None}
    record.write(root)
    frames = read_story_frames(root)
    assert not frames.is_video and frames.paths[0] == root / "frames" / "frame_000.png"
    clip, dino = encoders
    report = evaluate_story(root, clip, dino, out_dir=tmp_path / "scores").report
    assert list(report) == [
        "story_dir",
        "status",
        "style",
        "frames_total",
        "frames_evaluated",
        "frames_missing",
        "encoders",
        "identity_metrics",
        "mask",
        "note",
        "clip_t_mean",
        "clip_t_styled_mean",
        "characters",
        "frames",
    ]
    assert list(report["frames"][0]) == ["index", "characters", "clip_t", "clip_t_styled", "text", "prompt"]
    assert frames_csv(report).splitlines()[0] == "index,characters,clip_t,clip_t_styled,text,prompt"
    direct = build_report(
        frames,
        clip.encode_images(frames.paths),
        clip.encode_texts(frames.texts),
        clip.encode_texts(frames.prompts),
        sources={"clip": "tiny", "dino": "tiny"},
        identity={"dino": dino.encode_images(frames.paths)},
    )
    assert json.loads((tmp_path / "scores" / "report.json").read_text()) == json.loads(json.dumps(direct))
    assert "CLIP-T, mean over 5 frames" in "\n".join(summary_lines(report))
