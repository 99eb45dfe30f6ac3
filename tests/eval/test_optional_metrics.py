"""`storydiff eval`'s optional identity metrics (dlib face descriptors, DreamSim) and the mask hook.

The story folder is written by hand (metadata + 64x64 frames, no generation), so every frame is known:
noise and solid colours, none with a face. dlib runs for real where it is installed; DreamSim's package
and weights are never here, so a stand-in module with DreamSim's interface tests the plumbing.
"""

from __future__ import annotations

import csv
import importlib.util
import json
import sys
import types

import numpy as np
import pytest
import torch
from PIL import Image

from storydiff.cli import main
from storydiff.evaluation import build_tiny_encoders, evaluate_story
from storydiff.evaluation.face import FaceEncoder
from storydiff.evaluation.masks import NEUTRAL_GRAY, apply_mask
from storydiff.pages.story import parse_story

STORY = """\
[Bob] a man with red hair
[Alice] a woman in a yellow dress
---
[Bob] walks in the park
[Alice] waters the flowers
[Bob] reads a newspaper
[Bob] and [Alice] have dinner
[NC] a quiet street
"""
FRAMES = {"Bob": [0, 2, 3], "Alice": [1, 3]}
# (frame, character) pairs the identity metrics measure, in frame order
PAIRS = [(0, "Bob"), (1, "Alice"), (2, "Bob"), (3, "Bob"), (3, "Alice")]
SIZE = 64


def _frame(index: int) -> Image.Image:
    if index % 2:  # solid colours on odd frames, noise on even ones
        return Image.new("RGB", (SIZE, SIZE), (40 * index, 200 - 30 * index, 90))
    noise = np.random.default_rng(index).integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)
    return Image.fromarray(noise)


@pytest.fixture(scope="module")
def story_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("optional") / "story"
    (root / "frames").mkdir(parents=True)
    story = parse_story(STORY)
    meta = {
        "status": "complete",
        "story_text": STORY,
        "prompts": [f"{story.prompt(frame)}, comic style" for frame in story.frames],
        "frame_characters": [list(frame.characters) for frame in story.frames],
        "settings": {"style": "comic"},
    }
    (root / "metadata.json").write_text(json.dumps(meta))
    for frame in story.frames:
        _frame(frame.index).save(root / "frames" / f"frame_{frame.index:03d}.png")
    return root


@pytest.fixture(scope="module")
def encoders():
    return build_tiny_encoders()


@pytest.fixture
def numbers_only(monkeypatch):
    """evaluate_story without its files (the PNG costs more than the tiny encoders), for tests of numbers."""
    monkeypatch.setattr("storydiff.evaluation.writers.write_report", lambda report, out_dir: {})


def _eval(*argv) -> int:
    return main(["eval", *map(str, argv)])


def _one_line_error(capsys) -> str:
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and error.startswith("error: "), error
    return error


# --- face -----------------------------------------------------------------------------------------------


def test_face_finds_no_face_in_noise_and_solid_colours(story_dir, tmp_path, capsys):
    pytest.importorskip("dlib")
    assert _eval(story_dir, "--clip", "tiny", "--no-dino", "--face", "--out", tmp_path) == 0
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["identity_metrics"] == ["clip_i", "face"]
    assert "shape_predictor_5_face_landmarks" in report["encoders"]["face"]
    for name, frames in FRAMES.items():
        face = report["characters"][name]["face"]
        counts = {key: face[key] for key in ("faces_detected", "frames", "face_frames", "pairs")}
        assert counts == {"faces_detected": 0, "frames": len(frames), "face_frames": [], "pairs": 0}
        assert face["mean"] is None and f"a face in 0 of {len(frames)} frames" in face["reason"]
        assert report["characters"][name]["pairs"] == len(frames) * (len(frames) - 1) // 2  # CLIP-I's own
    with open(tmp_path / "characters.csv", newline="") as handle:
        rows = {row["character"]: row for row in csv.DictReader(handle)}
    assert rows["Bob"]["face_mean"] == "" and rows["Bob"]["face_pairs"] == "0"
    assert "frames with a detected face: Bob 0/3, Alice 0/2" in capsys.readouterr().out


class _Box:
    def __init__(self, side: int) -> None:
        self.side = side

    def width(self) -> int:
        return self.side

    def height(self) -> int:
        return self.side


def test_face_pairs_only_frames_with_a_face(story_dir, encoders, tmp_path, numbers_only):
    """A stand-in detector "finds" a face in noise frames (0, 2) only; its descriptor is the frame's mean
    colour, so the one pair Bob has (frames 0 and 2) is their cosine, and Alice (frames 1, 3) has none."""

    def detector(pixels, upsample):
        return [_Box(10), _Box(30)] if pixels.std(axis=(0, 1)).max() > 40 else []

    def shape_predictor(pixels, box):
        assert box.side == 30  # the largest face
        return pixels

    def descriptor(pixels, shape):  # 128 numbers, as dlib's; zero padding leaves the cosine as it was
        return np.pad(shape.mean(axis=(0, 1)), (0, 125))

    recognizer = types.SimpleNamespace(compute_face_descriptor=descriptor)
    face = FaceEncoder(detector, shape_predictor, recognizer, source="stand-in")
    report = evaluate_story(story_dir, encoders[0], face=face, out_dir=tmp_path, batch_size=2).report
    bob, alice = report["characters"]["Bob"]["face"], report["characters"]["Alice"]["face"]
    assert (bob["faces_detected"], bob["frames"], bob["face_frames"], bob["pairs"]) == (2, 3, [0, 2], 1)
    a, b = (np.asarray(_frame(i), dtype=np.float64).mean(axis=(0, 1)) for i in (0, 2))
    assert bob["mean"] == pytest.approx(a @ b / np.linalg.norm(a) / np.linalg.norm(b), abs=1e-6)
    assert (alice["faces_detected"], alice["mean"]) == (0, None)


@pytest.mark.parametrize("missing", ["dlib", "face_recognition_models"])
def test_face_without_its_packages_is_one_line(story_dir, tmp_path, capsys, monkeypatch, missing):
    if missing == "dlib":
        monkeypatch.setitem(sys.modules, "dlib", None)  # import dlib raises ImportError
    else:  # dlib imports; the model files' package is not found
        monkeypatch.setitem(sys.modules, "dlib", types.ModuleType("dlib"))
        real = importlib.util.find_spec
        monkeypatch.setattr(
            "importlib.util.find_spec", lambda name, *a: None if name == missing else real(name, *a)
        )
    assert _eval(story_dir, "--clip", "tiny", "--no-dino", "--face", "--out", tmp_path / "out") == 2
    error = _one_line_error(capsys)
    assert "--face" in error and missing in error and "pip install dlib-bin face-recognition-models" in error
    assert not (tmp_path / "out").exists()


# --- DreamSim -------------------------------------------------------------------------------------------

WEIGHTS = ["dino_vitb16_pretrain.pth", "open_clip_vitb16_pretrain.pth.tar", "clip_vitb16_pretrain.pth.tar"]


def _weights_folder(path):
    path.mkdir()
    for name in WEIGHTS:
        (path / name).write_bytes(b"")
    (path / "ensemble_lora").mkdir()
    return path


def test_dreamsim_not_installed_is_one_line(story_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "dreamsim", None)
    weights = _weights_folder(tmp_path / "weights")
    assert (
        _eval(story_dir, "--clip", "tiny", "--no-dino", "--dreamsim", weights, "--out", tmp_path / "o") == 2
    )
    error = _one_line_error(capsys)
    assert "--dreamsim" in error and "pip install dreamsim" in error and not (tmp_path / "o").exists()


def _pixels(image: Image.Image) -> torch.Tensor:
    """DreamSim's preprocessing, less its resize to 224: (1, 3, H, W) in [0, 1]."""
    return torch.from_numpy(np.asarray(image) / 255.0).permute(2, 0, 1)[None]


class _StandInDreamSim(torch.nn.Module):
    """DreamSim's interface: ``embed`` squeezes a batch of one to a vector, as the real one does."""

    def embed(self, pixels: torch.Tensor) -> torch.Tensor:
        return torch.cat([pixels.mean(dim=(2, 3)), pixels.std(dim=(2, 3))], dim=1).squeeze()


@pytest.fixture
def stand_in_dreamsim(monkeypatch):
    calls = []

    def dreamsim(pretrained=True, device="cuda", cache_dir="./models", **_):
        calls.append(cache_dir)
        print("Using cached", cache_dir)  # the real one prints this; it must not reach our output
        return _StandInDreamSim(), _pixels

    monkeypatch.setitem(sys.modules, "dreamsim", types.SimpleNamespace(dreamsim=dreamsim))
    return calls


def test_dreamsim_plumbing(story_dir, tmp_path, capsys, stand_in_dreamsim):
    weights, out = _weights_folder(tmp_path / "weights"), tmp_path / "out"
    # one frame per batch: embed() hands back a vector, not a (1, D) row
    argv = ["--clip", "tiny", "--no-dino", "--dreamsim", weights, "--batch-size", 1, "--out", out]
    assert _eval(story_dir, *argv) == 0
    assert stand_in_dreamsim == [str(weights)] and "Using cached" not in capsys.readouterr().out
    report = json.loads((out / "report.json").read_text())
    assert report["identity_metrics"] == ["clip_i", "dreamsim"]
    assert report["encoders"]["dreamsim"] == str(weights)
    model = _StandInDreamSim()
    alice = [model.embed(_pixels(_frame(i))) for i in FRAMES["Alice"]]
    distance = 1 - torch.nn.functional.cosine_similarity(*alice, dim=0).item()  # DreamSim's forward()
    assert report["characters"]["Alice"]["dreamsim"]["mean"] == pytest.approx(1 - distance, abs=1e-6)


def test_dreamsim_missing_weights_is_one_line(story_dir, tmp_path, capsys, stand_in_dreamsim):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert _eval(story_dir, "--clip", "tiny", "--no-dino", "--dreamsim", empty, "--out", tmp_path / "o") == 2
    error = _one_line_error(capsys)
    assert str(empty) in error and "ensemble_lora" in error and stand_in_dreamsim == []


def test_dreamsim_installed_without_weights(story_dir, tmp_path, capsys):
    pytest.importorskip("dreamsim")
    assert (
        _eval(story_dir, "--clip", "tiny", "--no-dino", "--dreamsim", tmp_path, "--out", tmp_path / "o") == 2
    )
    assert "lacks DreamSim's weights" in _one_line_error(capsys)


# --- masks ----------------------------------------------------------------------------------------------


def test_apply_mask_keeps_white_and_grays_black():
    image = Image.new("RGB", (4, 2), (10, 200, 30))
    mask = Image.new("L", (4, 2), 0)
    mask.putpixel((0, 0), 255)
    cut_out = Image.new("RGBA", (4, 2), (0, 0, 0, 0))  # a background remover's output: alpha is the mask
    cut_out.putpixel((0, 0), (1, 2, 3, 255))
    for masked in (apply_mask(image, mask), apply_mask(image, cut_out)):
        assert masked.getpixel((0, 0)) == (10, 200, 30) and masked.getpixel((3, 1)) == NEUTRAL_GRAY
    with pytest.raises(ValueError, match="mask is 2x2, frame is 4x2"):
        apply_mask(image, Image.new("L", (2, 2)))


def _identity(report) -> dict:
    return {(n, m): e[m] for n, e in report["characters"].items() for m in report["identity_metrics"]}


def test_a_mask_that_blanks_everything_makes_every_frame_alike(story_dir, encoders, tmp_path, numbers_only):
    clip, dino = encoders
    whole = evaluate_story(story_dir, clip, dino, out_dir=tmp_path / "whole").report
    calls = []

    def blank(image, index, character):
        calls.append((index, character))
        return Image.new("L", image.size, 0)

    masked = evaluate_story(
        story_dir, clip, dino, out_dir=tmp_path / "masked", mask_fn=blank, batch_size=2
    ).report
    assert calls == PAIRS and masked["mask"].endswith("blank")
    for key, stats in _identity(masked).items():
        assert stats["mean"] == pytest.approx(1, abs=1e-6) and stats["min"] == pytest.approx(1, abs=1e-6), key
        assert _identity(whole)[key]["min"] < 0.999, key  # the frames themselves differ
    # CLIP-T sees whole frames whatever the mask
    clip_t = [f["clip_t"] for f in whole["frames"]]
    assert [f["clip_t"] for f in masked["frames"]] == pytest.approx(clip_t, abs=1e-6)


def test_no_mask_leaves_the_numbers_unchanged(story_dir, encoders, tmp_path, numbers_only):
    clip, dino = encoders
    whole = evaluate_story(story_dir, clip, dino, out_dir=tmp_path / "whole").report
    unmasked = evaluate_story(
        story_dir, clip, dino, out_dir=tmp_path / "none", mask_fn=lambda *_: None
    ).report
    for key, stats in _identity(unmasked).items():
        expected = _identity(whole)[key]
        for stat in ("mean", "std", "min"):
            assert stats[stat] == pytest.approx(expected[stat], abs=1e-6), (key, stat)
        np.testing.assert_allclose(stats["matrix"], expected["matrix"], atol=1e-6)
    assert whole["mask"] is None and unmasked["mask"] == "<lambda>"


def test_mask_dir(story_dir, tmp_path, capsys):
    masks = tmp_path / "masks"
    masks.mkdir()
    assert _eval(story_dir, "--clip", "tiny", "--no-dino", "--mask-dir", masks, "--out", tmp_path / "o") == 2
    assert "--mask-dir" in _one_line_error(capsys) and not (tmp_path / "o").exists()
    for index in range(5):  # frame 4 is [NC]: its mask is never read
        Image.new("L", (SIZE, SIZE), 0).save(masks / f"mask_{index:03d}.png")
    assert _eval(story_dir, "--clip", "tiny", "--no-dino", "--mask-dir", masks, "--out", tmp_path / "o") == 0
    report = json.loads((tmp_path / "o" / "report.json").read_text())
    assert report["mask"] == str(masks)
    assert report["characters"]["Bob"]["clip_i"]["min"] == pytest.approx(1, abs=1e-6)
    assert "identity measured through masks" in capsys.readouterr().out
    Image.new("L", (SIZE // 2, SIZE), 0).save(masks / "mask_002.png")
    assert _eval(story_dir, "--clip", "tiny", "--no-dino", "--mask-dir", masks, "--out", tmp_path / "p") == 2
    error = _one_line_error(capsys)
    assert "frame 2" in error and "mask is 32x64, frame is 64x64" in error
