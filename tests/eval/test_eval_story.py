"""`storydiff eval` on a real tiny-sd15 story folder, with the tiny random encoders.

One story is generated per module (2 steps): three characters (one seen in a single frame) and an [NC]
frame. The report's numbers are checked against a computation straight from the encoders' models.
"""

from __future__ import annotations

import csv
import itertools
import json
import shutil

import pytest
import torch
from PIL import Image

from storydiff.cli import main
from storydiff.evaluation import build_tiny_encoders, evaluate_story
from storydiff.pages.styles import apply_style

STORY = """\
[Bob] a man with red hair, wearing a black suit
[Alice] a woman in a yellow dress
[Carol] an old woman with a green hat
---
[Bob] walks in the park #Bob takes a walk
[Alice] waters the flowers
[Bob] reads a newspaper
[Alice] rides a bicycle
[Bob] and [Alice] have dinner #Dinner
[Carol] knits by the fire
[NC] a quiet street at night #Night falls
"""
FRAMES = {"Bob": [0, 2, 4], "Alice": [1, 3, 4], "Carol": [5]}
NC_FRAME = 6


@pytest.fixture(scope="module")
def story_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    (root / "story.txt").write_text(STORY)
    out = root / "story"
    argv = ["generate", "--model", "tiny-sd15", "--story", str(root / "story.txt"), "--out", str(out)]
    # 64x64: the tiny model's default is 128x128, and the frames only need to be images
    assert main([*argv, "--steps", "2", "--id-frames", "1", "--height", "64", "--width", "64"]) == 0
    return out


def _eval(*argv) -> int:
    return main(["eval", *map(str, argv)])


def test_eval_end_to_end(story_dir, capsys):
    assert _eval(story_dir, "--clip", "tiny", "--dino", "tiny") == 0
    printed = capsys.readouterr().out
    out = story_dir / "eval"
    for name in ("report.json", "frames.csv", "characters.csv", "report.png"):
        assert (out / name).stat().st_size > 0 and str(out / name) in printed
    assert Image.open(out / "report.png").format == "PNG"
    report = json.loads((out / "report.json").read_text())
    assert report["identity_metrics"] == ["clip_i", "dino"] and "mean nothing" in report["note"]
    assert {name: entry["frames"] for name, entry in report["characters"].items()} == FRAMES
    for name in ("Bob", "Alice"):
        entry = report["characters"][name]
        assert entry["pairs"] == 3 and entry["reason"] is None
        assert all(-1 <= entry[m][s] <= 1 for m in ("clip_i", "dino") for s in ("mean", "std", "min"))
    carol = report["characters"]["Carol"]
    assert carol["pairs"] == 0 and carol["clip_i"]["mean"] is None and "no pair" in carol["reason"]
    frames = {f["index"]: f for f in report["frames"]}
    assert sorted(frames) == list(range(7))
    assert frames[NC_FRAME]["characters"] == [] and isinstance(frames[NC_FRAME]["clip_t"], float)
    assert not any(NC_FRAME in entry["frames"] for entry in report["characters"].values())
    # the story text without the style's wording, and the styled prompt the model was given
    assert frames[0]["text"] == "a man with red hair, wearing a black suit walks in the park"
    assert frames[NC_FRAME]["text"] == "a quiet street at night"
    meta = json.loads((story_dir / "metadata.json").read_text())
    for index, frame in frames.items():
        assert frame["prompt"] == meta["prompts"][index] != frame["text"]
        assert apply_style(frame["text"], meta["settings"]["style"])[0] == frame["prompt"]
    with open(out / "frames.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [row["characters"] for row in rows] == ["Bob", "Alice", "Bob", "Alice", "Bob+Alice", "Carol", ""]
    with open(out / "characters.csv", newline="") as handle:
        rows = {row["character"]: row for row in csv.DictReader(handle)}
    assert (
        rows["Carol"]["clip_i_mean"] == ""
        and float(rows["Bob"]["dino_mean"]) == (report["characters"]["Bob"]["dino"]["mean"])
    )
    assert "Bob" in printed and "CLIP-T, mean over 7 frames" in printed


def _cos(a: torch.Tensor, b: torch.Tensor) -> float:
    return torch.nn.functional.cosine_similarity(a.double(), b.double(), dim=-1).item()


def test_report_numbers_equal_a_direct_computation(story_dir, tmp_path):
    clip, dino = build_tiny_encoders()
    report = evaluate_story(story_dir, clip, dino, out_dir=tmp_path).report
    images = [Image.open(story_dir / "frames" / f"frame_{i:03d}.png").convert("RGB") for i in range(7)]
    with torch.no_grad():
        pixels = clip.image_processor(images=images, return_tensors="pt")["pixel_values"]
        clip_images = clip.model.get_image_features(pixel_values=pixels).pooler_output
        pixels = dino.image_processor(images=images, return_tensors="pt")["pixel_values"]
        dino_images = dino.model(pixel_values=pixels).last_hidden_state[:, 0]
        texts = [[f["text"] for f in report["frames"]], [f["prompt"] for f in report["frames"]]]
        clip_texts = [
            clip.model.get_text_features(
                **clip.tokenizer(t, padding=True, truncation=True, max_length=77, return_tensors="pt")
            ).pooler_output
            for t in texts
        ]
    for name, frames in FRAMES.items():
        for metric, embeddings in (("clip_i", clip_images), ("dino", dino_images)):
            pairs = [_cos(embeddings[i], embeddings[j]) for i, j in itertools.combinations(frames, 2)]
            if not pairs:
                continue
            stats = report["characters"][name][metric]
            assert stats["mean"] == pytest.approx(sum(pairs) / len(pairs), abs=1e-6)
            assert stats["min"] == pytest.approx(min(pairs), abs=1e-6)
            assert stats["std"] == pytest.approx(torch.tensor(pairs).std(correction=0).item(), abs=1e-6)
    for frame in report["frames"]:
        i = frame["index"]
        assert frame["clip_t"] == pytest.approx(_cos(clip_images[i], clip_texts[0][i]), abs=1e-6)
        assert frame["clip_t_styled"] == pytest.approx(_cos(clip_images[i], clip_texts[1][i]), abs=1e-6)


def test_no_dino_and_out(story_dir, tmp_path, capsys):
    assert (
        _eval(story_dir, "--clip", "tiny", "--no-dino", "--out", tmp_path / "scores", "--batch-size", 3) == 0
    )
    report = json.loads((tmp_path / "scores" / "report.json").read_text())
    assert report["identity_metrics"] == ["clip_i"] and "dino" not in report["characters"]["Bob"]
    assert "DINO" not in capsys.readouterr().out


@pytest.mark.parametrize(
    ("option", "value"),
    [("--clip", "/nonexistent"), ("--dino", "/nonexistent"), ("--clip", "DINO_FOLDER")],
    ids=["clip-missing", "dino-missing", "clip-given-a-dino-checkpoint"],
)
def test_unloadable_encoder_is_a_one_line_error(story_dir, tmp_path, capsys, option, value):
    if value == "DINO_FOLDER":  # a real checkpoint, but not a CLIP one: its weights must not be random-filled
        value = tmp_path / "dino"
        build_tiny_encoders()[1].model.save_pretrained(value)
        capsys.readouterr()  # save_pretrained's own progress bar
    other = {"--clip": "--dino", "--dino": "--clip"}[option]
    assert _eval(story_dir, option, value, other, "tiny", "--out", tmp_path / "out") == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and error.startswith("error: ") and option in error and str(value) in error
    assert not (tmp_path / "out").exists()


@pytest.fixture
def interrupted_copy(story_dir, tmp_path):
    """The story folder as an interrupted run leaves it: status 'interrupted', frame 3 not yet written."""
    copy = tmp_path / "story"
    shutil.copytree(story_dir, copy, ignore=shutil.ignore_patterns("eval"))
    meta = json.loads((copy / "metadata.json").read_text())
    (copy / "metadata.json").write_text(json.dumps({**meta, "status": "interrupted"}))
    (copy / "frames" / "frame_003.png").unlink()
    return copy


def test_incomplete_folder_needs_allow_incomplete(interrupted_copy, capsys):
    assert _eval(interrupted_copy, "--clip", "tiny", "--dino", "tiny") == 2
    error = capsys.readouterr().err
    assert "'interrupted'" in error and "--allow-incomplete" in error
    assert not (interrupted_copy / "eval").exists()
    assert _eval(interrupted_copy, "--clip", "tiny", "--dino", "tiny", "--allow-incomplete") == 0
    report = json.loads((interrupted_copy / "eval" / "report.json").read_text())
    assert report["frames_missing"] == [3] and report["frames_evaluated"] == 6
    assert report["characters"]["Alice"]["frames"] == [1, 4] and report["characters"]["Alice"]["pairs"] == 1
    assert "not evaluated (no image yet): frames 3" in capsys.readouterr().out


def test_complete_folder_with_a_missing_frame_and_a_plain_folder_are_errors(story_dir, tmp_path, capsys):
    copy = tmp_path / "story"
    shutil.copytree(story_dir, copy)
    (copy / "frames" / "frame_005.png").unlink()
    assert _eval(copy, "--clip", "tiny", "--no-dino") == 2
    assert "frame_005.png is missing" in capsys.readouterr().err
    assert _eval(tmp_path / "frames-only", "--clip", "tiny", "--no-dino") == 2
    assert "does not exist" in capsys.readouterr().err


def test_help_shows_every_default(capsys):
    assert main(["eval", "--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines to the terminal's width
    for default in ("openai/clip-vit-large-patch14", "facebook/dinov2-base", "DIR/eval", "(default: 16)"):
        assert f"(default: {default.removeprefix('(default: ').removesuffix(')')})" in text
    assert "%(default)" not in text and "mean nothing" in text
