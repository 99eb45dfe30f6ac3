"""Given subject masks in story runs (`--subject-masks DIR`, ``sp(story, subject_masks=...)``): every token a
frame offers (identity frames writing banks, window-mode neighbours) lies inside its characters' masks; the
masks are kept in the output folder, recorded, and a resume reads them back; bad folders are one line."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
from PIL import Image

import storydiff.consistency.state as state_module
from storydiff import ConsistencyConfig, StoryDiffusionPipeline
from storydiff.cli import main
from storydiff.consistency.subject_masks import SubjectMasks
from storydiff.families.tiny_models import build_tiny_pipeline

STORY = """\
[Alice] a woman in a yellow dress
[Bob] a man with red hair
---
[Alice] waters the flowers
[Bob] walks in the park
[Alice] and [Bob] have dinner
[NC] a quiet street
[Bob] reads a newspaper
"""
FRAME_CHARACTERS = [("Alice",), ("Bob",), ("Alice", "Bob"), (), ("Bob",)]
SIDE = 64
NO_SKIP = {"warmup_steps": 0, "skip_prob_early": 0.0, "skip_prob_late": 0.0}


def write_masks(folder, frames=range(5)):
    """Alice: the left half below the top quarter; Bob: the right half; both: the union."""
    folder.mkdir(parents=True, exist_ok=True)
    for frame in frames:
        shown = FRAME_CHARACTERS[frame]
        if not shown:
            continue
        mask = np.zeros((SIDE, SIDE), dtype=np.uint8)
        if "Alice" in shown:
            mask[SIDE // 4 :, : SIDE // 2] = 255
        if "Bob" in shown:
            mask[SIDE // 4 :, SIDE // 2 :] = 255
        Image.fromarray(mask).save(folder / f"mask_{frame:03d}.png")
    return folder


@pytest.fixture(scope="module")
def pipe():
    return build_tiny_pipeline("tiny-sd15", progress_bar=False)


def offered(pipe, monkeypatch, masks, **settings):
    """Run the story and record, per story frame, every token index it offered (per level's token count)."""
    seen = []
    real = state_module.ConsistencyState.frame_reference_indices

    def spy(self, layer, frames, image, device):
        rows = real(self, layer, frames, image, device)
        seen.extend(
            (frame, image[1] - image[0], row - image[0]) for frame, row in zip(frames, rows, strict=True)
        )
        return rows

    monkeypatch.setattr(state_module.ConsistencyState, "frame_reference_indices", spy)
    # rate 0.25: every mask here holds enough tokens at every level for its draws (no uniform fallback)
    sp = StoryDiffusionPipeline(pipe, ConsistencyConfig(rate=0.25, seed=1, **NO_SKIP))
    try:
        run = {"num_inference_steps": 2, "progress": False, "height": SIDE, "width": SIDE, **settings}
        result = sp(STORY, subject_masks=masks, **run)
    finally:
        sp.close()
    return result, seen


@pytest.mark.parametrize("mode", ["bank", "window"])
def test_every_offered_token_lies_in_the_frame_mask(pipe, monkeypatch, tmp_path, mode):
    folder = write_masks(tmp_path / "masks")
    masks = SubjectMasks.from_folder(folder, FRAME_CHARACTERS, (SIDE, SIDE))
    settings = {"id_frames": 1} if mode == "bank" else {"mode": "window", "chunk_size": 2}
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no frame falls back to uniform draws
        _, seen = offered(pipe, monkeypatch, str(folder), **settings)
    assert seen  # identity frames (bank) or every frame (window) offered tokens
    for frame, tokens, row in seen:
        subject = masks.subject_tokens(frame, tokens)
        if subject is None:  # an [NC] frame draws from the whole frame
            continue
        assert subject[row.cpu()].all(), (frame, tokens)


def test_masks_are_kept_recorded_and_change_the_frames(pipe, tmp_path, monkeypatch):
    folder = write_masks(tmp_path / "given")
    with_masks, _ = offered(pipe, monkeypatch, str(folder), id_frames=1, out_dir=tmp_path / "out")
    without, _ = offered(pipe, monkeypatch, None, id_frames=1)
    record = json.loads((tmp_path / "out" / "metadata.json").read_text())
    assert record["subject_masks"]["source"] == str(folder)
    kept = SubjectMasks.load(tmp_path / "out", FRAME_CHARACTERS, (SIDE, SIDE))
    assert kept.digest() == record["subject_masks"]["sha256"]
    pixels = [np.asarray(image, dtype=int) for image in with_masks.images]
    plain = [np.asarray(image, dtype=int) for image in without.images]
    assert any(np.abs(a - b).max() > 0 for a, b in zip(pixels, plain, strict=True))


def test_cli_subject_masks_and_resume(tmp_path, capsys):
    import storydiff.runs.lockstep as lockstep

    story = tmp_path / "story.txt"
    story.write_text(STORY)
    folder = write_masks(tmp_path / "masks")
    args = ["generate", "--model", "tiny-sd15", "--story", str(story), "--steps", "2", "--mode", "window"]
    args += [
        "--subject-masks",
        str(folder),
        "--height",
        str(SIDE),
        "--width",
        str(SIDE),
        "--checkpoint-every",
        "1",
    ]
    assert main([*args, "--out", str(tmp_path / "whole")]) == 0
    save = lockstep.save_checkpoint

    def save_then_stop(*a, **k):
        save(*a, **k)
        raise KeyboardInterrupt

    lockstep.save_checkpoint = save_then_stop
    try:
        assert main([*args, "--out", str(tmp_path / "killed")]) == 130
    finally:
        lockstep.save_checkpoint = save
    assert main(["generate", "--resume", str(tmp_path / "killed")]) == 0
    for frame in range(5):
        name = f"frames/frame_{frame:03d}.png"
        assert (tmp_path / "killed" / name).read_bytes() == (tmp_path / "whole" / name).read_bytes()
    capsys.readouterr()
    # a folder missing a frame's mask, and no folder at all: one line, exit 2, nothing written
    (folder / "mask_004.png").unlink()
    assert main([*args, "--out", str(tmp_path / "bad")]) == 2
    assert "frame 4 (Bob): no mask mask_004.png" in capsys.readouterr().err
    assert (
        main([*args[:-8], "--subject-masks", str(tmp_path / "nowhere"), "--out", str(tmp_path / "bad")]) == 2
    )
    assert "--subject-masks" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()


def test_video_stories_refuse_masks(tmp_path):
    pipe = build_tiny_pipeline("tiny-wan", progress_bar=False)
    sp = StoryDiffusionPipeline(pipe)
    try:
        with pytest.raises(ValueError, match="image stories"):
            sp(STORY, subject_masks=str(write_masks(tmp_path / "m")), num_inference_steps=1, progress=False)
    finally:
        sp.close()
