"""Given subject masks in story runs (`--subject-masks DIR`, ``sp(story, subject_masks=...)``): every token a
frame offers (identity frames writing banks, window-mode neighbours) lies inside its characters' masks; the
masks are kept in the output folder, recorded, and a resume reads them back; bad folders are one line."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import torch
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


# ---------------------------------------------------------------------------------- bounded attention


def per_character_masks() -> dict:
    """Alice: the left half, Bob: the right half, each in every frame that shows them."""
    left = np.zeros((SIDE, SIDE), dtype=bool)
    left[:, : SIDE // 2] = True
    side = {"Alice": left, "Bob": ~left}
    return {f: {c: side[c] for c in chars} for f, chars in enumerate(FRAME_CHARACTERS) if chars}


@pytest.mark.parametrize("bounded", [True, False])
def test_bounded_rows_see_only_their_own_character(pipe, bounded):
    """A frame showing Alice (left) and Bob (right) reads both banks. Bounded: writing another Bob bank
    leaves Alice's rows and the background rows bit-identical and moves Bob's; without bounds it moves
    Alice's rows too (the test can fail)."""
    from storydiff.families.attach import apply_consistent_attention, remove_consistent_attention

    masks = SubjectMasks.from_mapping(per_character_masks(), FRAME_CHARACTERS, (SIDE, SIDE))
    state = apply_consistent_attention(pipe, ConsistencyConfig(rate=0.5, seed=1, **NO_SKIP))
    try:
        state.set_subject_masks(masks, bounded=bounded)
        layer = min(state.layers, key=lambda layer: layer.level)  # the most tokens
        attn = pipe.unet.get_submodule(layer.name.removesuffix(".processor"))
        tokens = (SIDE // layer.level) ** 2

        def hidden(seed: int):
            return torch.randn(
                1, tokens, attn.to_q.in_features, generator=torch.Generator().manual_seed(seed)
            )

        def read_shared() -> torch.Tensor:
            state.begin_read([("Alice", "Bob")], step=0, frames=[2])
            return attn(hidden(2))

        with torch.no_grad():
            state.begin_write("Alice", 1, frames=[0])
            attn(hidden(0))
            state.begin_write("Bob", 1, frames=[1])
            attn(hidden(1))
            before = read_shared()
            state.begin_write("Bob", 1, frames=[1])
            attn(hidden(3))  # another bank for Bob
            after = read_shared()
        state.set_subject_masks(masks, bounded=True)
        segments = state.segments([2], (0, tokens), tokens, torch.device("cpu"))[0]
    finally:
        state.end()
        remove_consistent_attention(pipe)
    alice, bob = segments == 1, segments == 2
    assert alice.any() and bob.any()
    assert not torch.equal(before[0, bob], after[0, bob])
    if bounded:
        assert torch.equal(before[0, alice], after[0, alice])
        assert torch.equal(before[0, ~(alice | bob)], after[0, ~(alice | bob)])
    else:
        assert not torch.equal(before[0, alice], after[0, alice])


def test_cli_bounded(tmp_path, capsys):
    """--subject-masks with per-character files (mask_002_Alice.png, mask_002_Bob.png) and --bounded:
    runs, same seed gives the same frames, differs from unbounded, resumes from the kept masks; misuse is
    one line."""
    story = tmp_path / "story.txt"
    story.write_text(STORY)
    folder = write_masks(tmp_path / "masks")
    for character, columns in (("Alice", slice(0, SIDE // 2)), ("Bob", slice(SIDE // 2, SIDE))):
        own = np.zeros((SIDE, SIDE), dtype=np.uint8)
        own[:, columns] = 255
        Image.fromarray(own).save(folder / f"mask_002_{character}.png")
    args = ["generate", "--model", "tiny-sd15", "--story", str(story), "--steps", "2", "--id-frames", "1"]
    args += ["--subject-masks", str(folder), "--height", str(SIDE), "--width", str(SIDE), "--rate", "0.25"]
    for out in ("a", "b"):
        assert main([*args, "--bounded", "--out", str(tmp_path / out)]) == 0
    assert main([*args, "--out", str(tmp_path / "plain")]) == 0
    frames = {
        out: [(tmp_path / out / f"frames/frame_{i:03d}.png").read_bytes() for i in range(5)] for out in "ab"
    }
    assert frames["a"] == frames["b"]
    plain = [(tmp_path / "plain" / f"frames/frame_{i:03d}.png").read_bytes() for i in range(5)]
    assert frames["a"][2] != plain[2]  # the shared frame reads the banks bounded
    record = json.loads((tmp_path / "a" / "metadata.json").read_text())
    assert record["subject_masks"]["bounded"] is True
    assert (tmp_path / "a" / "masks" / "mask_002_Bob.png").is_file()
    capsys.readouterr()
    base = args[: args.index("--subject-masks")]
    assert main([*base, "--bounded", "--out", str(tmp_path / "bad")]) == 2
    assert "--bounded needs --subject-masks" in capsys.readouterr().err
    assert main([*base, "--subject-masks", "off", "--bounded", "--out", str(tmp_path / "bad")]) == 2
    assert "--bounded needs --subject-masks" in capsys.readouterr().err  # off: no masks
    window = [a for a in args if a not in ("--id-frames", "1")]
    assert (
        main([*window, "--bounded", "--mode", "window", "--tile", "2", "--out", str(tmp_path / "bad")]) == 2
    )
    assert "--tile" in capsys.readouterr().err  # the tiled form averages whole frames: no bounds
    assert not (tmp_path / "bad").exists()


def test_eval_measures_identity_on_the_runs_masks(pipe, tmp_path, capsys):
    """`storydiff eval` on a run that kept subject masks measures identity on them (per-character files in
    shared frames), unless --no-masks; the report names the masks."""
    folder = write_masks(tmp_path / "given")
    sp = StoryDiffusionPipeline(pipe, ConsistencyConfig(rate=0.25, seed=1, **NO_SKIP))
    try:
        sp(
            STORY,
            subject_masks=per_character_masks(),
            num_inference_steps=1,
            id_frames=1,
            progress=False,
            height=SIDE,
            width=SIDE,
            out_dir=tmp_path / "run",
        )
    finally:
        sp.close()
    assert folder.is_dir() and (tmp_path / "run" / "masks" / "mask_002_Alice.png").is_file()
    assert main(["eval", "--clip", "tiny", "--dino", "tiny", str(tmp_path / "run")]) == 0
    report = json.loads((tmp_path / "run" / "eval" / "report.json").read_text())
    assert report["mask"] == str(tmp_path / "run" / "masks")
    with Image.open(tmp_path / "run" / "eval" / "masks.png") as sheet:  # the overlays: one pair per use
        assert sheet.width > 2 * SIDE and sheet.height > SIDE
    assert main(["eval", "--clip", "tiny", "--dino", "tiny", "--no-masks", str(tmp_path / "run")]) == 0
    assert json.loads((tmp_path / "run" / "eval" / "report.json").read_text())["mask"] is None
    from storydiff.evaluation.masks import MaskDir

    kept = MaskDir(tmp_path / "run" / "masks")
    image = Image.new("RGB", (SIDE, SIDE))
    alice, bob = (np.asarray(kept(image, 2, name)) > 127 for name in ("Alice", "Bob"))
    assert alice[:, : SIDE // 2].all() and not alice[:, SIDE // 2 :].any() and np.array_equal(bob, ~alice)


def test_background_share_draws_that_share_outside_the_masks(pipe, monkeypatch, tmp_path, capsys):
    folder = write_masks(tmp_path / "masks")
    masks = SubjectMasks.from_folder(folder, FRAME_CHARACTERS, (SIDE, SIDE))
    seen = []
    real = state_module.ConsistencyState.frame_reference_indices

    def spy(self, layer, frames, image, device):
        rows = real(self, layer, frames, image, device)
        seen.extend(
            (frame, image[1] - image[0], row - image[0]) for frame, row in zip(frames, rows, strict=True)
        )
        return rows

    monkeypatch.setattr(state_module.ConsistencyState, "frame_reference_indices", spy)
    sp = StoryDiffusionPipeline(pipe, ConsistencyConfig(rate=0.25, seed=1, **NO_SKIP))
    try:
        run = {"num_inference_steps": 1, "progress": False, "height": SIDE, "width": SIDE, "id_frames": 1}
        sp(STORY, subject_masks=str(folder), background_share=0.5, out_dir=tmp_path / "out", **run)
    finally:
        sp.close()
    checked = 0
    for frame, tokens, row in seen:
        subject = masks.subject_tokens(frame, tokens)
        if subject is None or tokens < 64:  # exact shares need enough draws: the 1/8 level (16 of 64)
            continue
        outside = (~subject[row.cpu()]).sum().item()
        assert outside == round(0.5 * row.numel()), (frame, tokens, outside, row.numel())
        checked += 1
    assert checked
    record = json.loads((tmp_path / "out" / "metadata.json").read_text())
    assert record["subject_masks"]["background_share"] == 0.5
    story = tmp_path / "story.txt"
    story.write_text(STORY)
    args = [
        "generate",
        "--model",
        "tiny-sd15",
        "--story",
        str(story),
        "--steps",
        "1",
        "--out",
        str(tmp_path / "x"),
    ]
    assert main([*args, "--background-share", "0.3"]) == 2
    assert "--background-share applies with --subject-masks" in capsys.readouterr().err
