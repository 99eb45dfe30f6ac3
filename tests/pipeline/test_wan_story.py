"""Video stories on Wan (families/wan.py): each story line a shot, through the story pipeline and the CLI.

- bank mode: lockstep == stored in latents, bit for bit; mutation twins (the other character's bank, the
  previous step's bank, rate 0) move the latents by at least MIN_RELATIVE_CHANGE;
- window mode reads neighbour shots across chunks; a killed window run resumes to the uninterrupted latents
  (twin: resumed as if from another step);
- the output folder: every shot's frames, its GIF, the joined story video, storyboard pages; seeded runs
  give identical files;
- bad input is one line and exit 2: an image-to-video model in `generate`, the official preset, shot
  lengths Wan's VAE cannot take, --shot-frames on an image model, a Wan bank read by an image model.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from story_helpers import (
    MIN_RELATIVE_CHANGE,
    bank_of_the_previous_step,
    banks_swapped,
    recorded_latents,
    relative_change,
    resumed_from_another_step,
    stacked,
)

import storydiff.runs.lockstep as lockstep
from storydiff import ConsistencyConfig, StoryDiffusionPipeline
from storydiff.cli import main
from storydiff.families.tiny_models import build_tiny_pipeline

STORY = """\
[Bob] a man with red hair, wearing a black suit
[Alice] a woman in a yellow dress
---
[Bob] walks in the park #Bob's walk
[Alice] waters the flowers
[Bob] reads a newspaper on a bench
[Bob] and [Alice] have dinner together
[NC] a quiet street at night
"""
NO_SKIP = {"warmup_steps": 0, "skip_prob_early": 0.0, "skip_prob_late": 0.0}


@pytest.fixture(scope="module")
def pipe():
    return build_tiny_pipeline("tiny-wan", progress_bar=False)


def story(pipe, rate=0.5, **settings):
    sp = StoryDiffusionPipeline(pipe, ConsistencyConfig(rate=rate, seed=2, **NO_SKIP))
    try:
        run = {"num_inference_steps": 3, "progress": False, "seed": 5, "style": "none", **settings}
        return sp(STORY, **run)
    finally:
        sp.close()


def story_latents(pipe, **settings):
    with recorded_latents() as latents:
        result = story(pipe, **settings)
    return result, stacked(latents)


def test_bank_schedules_agree_and_consistency_acts(pipe):
    """Identity shots write a bank of video tokens per step; the others read it. Lockstep == stored bit
    for bit; mutation twins move the latents by at least MIN_RELATIVE_CHANGE."""
    lockstep_run, reference = story_latents(pipe, id_frames=1, bank_schedule="lockstep")
    _, stored = story_latents(pipe, id_frames=1, bank_schedule="stored")
    assert torch.equal(stored, reference)
    assert len(lockstep_run.images) == 5 and all(
        len(shot) == pipe.default_num_frames for shot in lockstep_run.images
    )
    _, plain = story_latents(pipe, rate=0.0, id_frames=1)
    with banks_swapped():
        _, swapped = story_latents(pipe, id_frames=1, bank_schedule="lockstep")
    with bank_of_the_previous_step():
        _, previous = story_latents(pipe, id_frames=1, bank_schedule="lockstep")
    changes = {
        "rate 0": relative_change(plain, reference),
        "other character's bank": relative_change(swapped, reference),
        "previous step's bank": relative_change(previous, reference),
    }
    assert all(change >= MIN_RELATIVE_CHANGE for change in changes.values()), changes


def test_window_mode_reads_neighbour_shots_across_chunks(pipe):
    _, whole = story_latents(pipe, mode="window", chunk_size=5)
    _, chunked = story_latents(pipe, mode="window", chunk_size=2)
    _, plain = story_latents(pipe, rate=0.0, mode="window", chunk_size=5)
    assert relative_change(chunked, whole) >= MIN_RELATIVE_CHANGE
    assert relative_change(plain, whole) >= MIN_RELATIVE_CHANGE


def test_window_run_resumes_to_the_uninterrupted_shots(pipe, tmp_path, monkeypatch):
    """Twin: the checkpoint resumed as if written at another step moves the latents by at least
    MIN_RELATIVE_CHANGE."""
    _, whole = story_latents(pipe, mode="window", chunk_size=2, out_dir=tmp_path / "whole")
    save = lockstep.save_checkpoint

    def save_then_fail(*args, **kwargs):
        save(*args, **kwargs)
        raise KeyboardInterrupt

    monkeypatch.setattr(lockstep, "save_checkpoint", save_then_fail)
    with pytest.raises(KeyboardInterrupt):
        story(pipe, mode="window", chunk_size=2, checkpoint_every=1, out_dir=tmp_path / "killed")
    monkeypatch.setattr(lockstep, "save_checkpoint", save)
    shutil.copytree(tmp_path / "killed", tmp_path / "misread")
    run = {"mode": "window", "chunk_size": 2, "checkpoint_every": 1, "resume": True}
    _, resumed = story_latents(pipe, **run, out_dir=tmp_path / "killed")
    assert torch.equal(resumed, whole)
    assert read_tree(tmp_path / "killed") == read_tree(tmp_path / "whole")
    with resumed_from_another_step(+1):
        _, misread = story_latents(pipe, **run, out_dir=tmp_path / "misread")
    assert relative_change(misread, whole) >= MIN_RELATIVE_CHANGE


def read_tree(folder) -> dict[str, bytes]:
    """Every shot frame and storyboard page of a story folder, by name (videos and metadata aside)."""
    return {
        str(path.relative_to(folder)): path.read_bytes()
        for pattern in ("shots/*/frame_*.png", "frames/*.png", "pages/*.png")
        for path in sorted(folder.glob(pattern))
    }


# ------------------------------------------------------------------------------------------- the CLI


def generate(tmp_path, out, *args):
    story_file = tmp_path / "story.txt"
    story_file.write_text(STORY)
    base = ["generate", "--story", str(story_file), "--steps", "2", "--out", str(tmp_path / out)]
    return main([*base, *args])


def test_cli_story_video(tmp_path):
    args = ["--model", "tiny-wan", "--id-frames", "1", "--shot-frames", "5", "--fps", "8"]
    assert generate(tmp_path, "a", *args) == 0
    assert generate(tmp_path, "b", *args) == 0
    folder = tmp_path / "a"
    shots = sorted(p.name for p in (folder / "shots").iterdir() if p.is_dir())
    assert shots == [f"shot_{i:03d}" for i in range(5)]
    assert all(len(list((folder / "shots" / s).glob("frame_*.png"))) == 5 for s in shots)
    assert all((folder / "shots" / f"{s}.gif").is_file() for s in shots)
    assert (folder / "story.gif").is_file() and list((folder / "pages").glob("page_*.png"))
    metadata = json.loads((folder / "metadata.json").read_text())
    assert metadata["status"] == "complete" and metadata["settings"]["shot_frames"] == 5
    assert metadata["settings"]["fps"] == 8.0
    assert metadata["consistency"]["rate"] == 0.1  # Wan's default: shots have many tokens
    tree = read_tree(folder)
    assert tree and tree == read_tree(tmp_path / "b")  # same seed, same files
    assert generate(tmp_path, "w", "--model", "tiny-wan", "--mode", "window", "--chunk-size", "2") == 0
    assert len(list((tmp_path / "w" / "shots").glob("shot_*.gif"))) == 5
    window = json.loads((tmp_path / "w" / "metadata.json").read_text())["settings"]
    assert (window["shot_frames"], window["fps"]) == (9, 16.0)  # the model's, recorded as used
    # storydiff eval reads the shots: identity across shots, CLIP-T and stability within each shot
    assert main(["eval", "--clip", "tiny", "--dino", "tiny", str(folder)]) == 0
    report = json.loads((folder / "eval" / "report.json").read_text())
    assert report["video"]["shot_frames"] == 5 and set(report["video"]["temporal"]) == {"clip_i", "dino"}


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--model", "tiny-wan-i2v"], "storydiff video"),
        (["--model", "tiny-wan", "--preset", "official"], "--scheduler"),
        (["--model", "tiny-wan", "--shot-frames", "8"], "4k+1"),
        (["--model", "tiny-sd15", "--shot-frames", "9"], "--shot-frames applies to video models"),
    ],
    ids=["i2v-in-generate", "official-preset", "shot-frames", "image-model"],
)
def test_cli_refuses_in_one_line(tmp_path, capsys, args, message):
    assert generate(tmp_path, "out", *args) == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error.startswith("error:") and message in error, error
    assert not (tmp_path / "out").exists()


def test_a_wan_bank_is_refused_by_an_image_model(tmp_path, capsys):
    assert generate(tmp_path, "wan", "--model", "tiny-wan", "--id-frames", "1", "--save-banks") == 0
    bank = tmp_path / "wan" / "banks" / "Bob.safetensors"
    assert bank.is_file()
    solo = tmp_path / "solo.txt"
    solo.write_text("[Bob] a man with red hair, wearing a black suit\n---\n[Bob] sits on a chair\n")
    args = [
        "generate",
        "--model",
        "tiny-flux",
        "--story",
        str(solo),
        "--steps",
        "2",
        "--load-bank",
        str(bank),
    ]
    assert main([*args, "--out", str(tmp_path / "flux")]) == 2
    assert "bank" in capsys.readouterr().err
    assert not (tmp_path / "flux").exists()


def test_memory_savers_give_the_same_shots(pipe):
    """VAE slicing and tiling (Wan's VAE: tiles in space; forced small here so they really run) and model
    CPU offload (hooks moving each model as it runs; on a CPU nothing moves) as for image stories."""
    plain = story(pipe, id_frames=1).images
    tiled = build_tiny_pipeline("tiny-wan", progress_bar=False)
    tiled.vae.enable_slicing()
    tiled.vae.enable_tiling(
        tile_sample_min_height=16,
        tile_sample_min_width=16,
        tile_sample_stride_height=8,
        tile_sample_stride_width=8,
    )
    calls = []
    tiled_decode = tiled.vae.tiled_decode
    tiled.vae.tiled_decode = lambda *a, **k: calls.append(1) or tiled_decode(*a, **k)
    tiles = story(tiled, id_frames=1).images
    assert len(calls) == len(plain)
    difference = [np.abs(pixels(a) - pixels(b)).mean() for a, b in zip(tiles, plain, strict=True)]
    assert all(0 <= d < 16 for d in difference), difference
    pytest.importorskip("accelerate")
    offloaded = build_tiny_pipeline("tiny-wan", progress_bar=False)
    offloaded.enable_model_cpu_offload(device="cpu")
    assert hasattr(offloaded.transformer, "_hf_hook")
    same = story(offloaded, id_frames=1).images
    assert all(np.array_equal(pixels(a), pixels(b)) for a, b in zip(same, plain, strict=True))


def pixels(shot) -> np.ndarray:
    return np.stack([np.asarray(frame, dtype=np.int16) for frame in shot])


def test_wan_22_ti2v_5b_is_refused_in_one_line(tmp_path):
    from storydiff.families.registry import family_of

    pipe = build_tiny_pipeline("tiny-wan", progress_bar=False)
    pipe.register_to_config(expand_timesteps=True)
    with pytest.raises(ValueError, match="TI2V-5B"):
        family_of(pipe)


def test_shift_that_would_leave_the_rope_table_is_refused_before_writing(pipe, tmp_path):
    """tiny-wan's RoPE table has 32 positions: shots of 16+ latent frames (61+ frames) cannot shift by T."""
    sp = StoryDiffusionPipeline(pipe, ConsistencyConfig(rope="shift", **NO_SKIP))
    try:
        with pytest.raises(ValueError, match="RoPE positions"):
            sp(STORY, num_inference_steps=1, shot_frames=65, out_dir=tmp_path / "out", progress=False)
    finally:
        sp.close()
    assert not (tmp_path / "out").exists()
