"""The lockstep bank schedule: one step's bank alive at a time, the same frames as the stored schedule.

Equalities compare the latents frames are decoded from (``story_helpers.recorded_latents``), in a setup where
every step reads the banks (no warm-up, 3 steps); mutation twins show the comparison is sharp."""

import json
import shutil
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch
from story_helpers import (
    KILL_AFTER_FIRST_CHECKPOINT,
    MIN_RELATIVE_CHANGE,
    AllocationTracker,
    bank_of_the_previous_step,
    read_frames,
    recorded_latents,
    relative_change,
    resumed_from_another_step,
    stacked,
)

from storydiff.cli import main
from storydiff.consistency.config import ConsistencyConfig
from storydiff.families.tiny_models import build_tiny_pipeline
from storydiff.pipeline import StoryDiffusionPipeline
from storydiff.runs.checkpoint import CHECKPOINT

# two characters, a frame with both, an [NC] frame
STORY = """\
[Bob] a man with red hair, wearing a black suit
[Alice] a woman in a yellow dress
---
[Bob] walks in the park #Bob takes a walk
[Alice] waters the flowers #Alice at home
[Bob] reads a newspaper
[Bob] and [Alice] have dinner #Dinner
[NC] a quiet street at night #Night falls
[Alice] rides a bicycle
"""
# no warm-up: all 3 steps read the banks (the first, the one that moves the latents most, included)
NO_SKIP = {"warmup_steps": 0, "skip_prob_early": 0.0, "skip_prob_late": 0.0}


def story_run(pipe, rate=0.5, **settings):
    sp = StoryDiffusionPipeline(pipe, ConsistencyConfig(rate=rate, seed=2, **NO_SKIP))
    try:
        return sp(STORY, num_inference_steps=3, id_frames=1, progress=False, seed=5, **settings)
    finally:
        sp.close()


def story_latents(pipe, **settings):
    """(the run's result, the latents of its frames in story order)."""
    with recorded_latents() as latents:
        result = story_run(pipe, **settings)
    return result, stacked(latents)


def pixels(result):
    return np.stack([np.asarray(image) for image in result.images])


@pytest.mark.parametrize(
    ("model", "guidance", "read_batch"),
    [("tiny-sdxl", 5.0, 3), ("tiny-sdxl", 1.0, 1), ("tiny-sd15", 5.0, 1), ("tiny-sd15", 1.0, 3)],
    ids=["sdxl-cfg-rb3", "sdxl-nocfg-rb1", "sd15-cfg-rb1", "sd15-nocfg-rb3"],
)
def test_lockstep_equals_stored_bit_exact(model, guidance, read_batch):
    """The same latents (and frames) under both schedules. Mutation twin (with CFG): a lockstep run whose
    reads get the previous step's bank moves the latents by at least MIN_RELATIVE_CHANGE (measured, max
    |Δ| / max |latent|: sdxl 1.4e-3, sd15 3.1e-3; rate 0 instead: 9.0e-3, 7.1e-3)."""
    pipe = build_tiny_pipeline(model, progress_bar=False)
    common = {"guidance_scale": guidance, "read_batch_size": read_batch}
    lockstep, lockstep_latents = story_latents(pipe, bank_schedule="lockstep", **common)
    stored, stored_latents = story_latents(pipe, bank_schedule="stored", **common)
    assert torch.equal(lockstep_latents, stored_latents)
    assert np.array_equal(pixels(lockstep), pixels(stored))
    if guidance > 1:
        with bank_of_the_previous_step():
            _, previous = story_latents(pipe, bank_schedule="lockstep", **common)
        change = relative_change(previous, lockstep_latents)
        assert change >= MIN_RELATIVE_CHANGE, change
    # the banks were real: both schedules wrote the same bytes, lockstep kept far fewer alive
    assert lockstep.bank_bytes == stored.bank_bytes and all(stored.bank_bytes.values())
    assert lockstep.metadata["bank_peak_bytes"] < stored.metadata["bank_peak_bytes"]


@pytest.fixture(scope="module")
def sd15():
    return build_tiny_pipeline("tiny-sd15", progress_bar=False)


def test_peak_bank_bytes_do_not_grow_with_steps(sd15):
    """Lockstep keeps one step's bank alive, by the bank's own count and by the bytes of every CPU tensor
    alive at once (measured: a lockstep run's peak is a rate-0 run's + one step's bank + 12 bytes; the
    stored schedule's, + 4 steps' banks - 12 bytes)."""

    def run(schedule, steps, rate=0.5):
        sp = StoryDiffusionPipeline(sd15, ConsistencyConfig(rate=rate, seed=2, **NO_SKIP))
        try:
            with AllocationTracker() as tracker:
                result = sp(
                    STORY, num_inference_steps=steps, id_frames=1, progress=False, bank_schedule=schedule
                )
            return result.metadata, tracker.peak
        finally:
            sp.close()

    stored, tracked_stored = run("stored", 4)
    lock4, tracked4 = run("lockstep", 4)
    lock6, tracked6 = run("lockstep", 6)
    _, tracked_plain = run("lockstep", 4, rate=0.0)  # no bank at all
    consistent_steps = 4 - NO_SKIP["warmup_steps"]
    one_step = sum(stored["bank_bytes"].values()) // consistent_steps
    assert stored["bank_peak_bytes"] == sum(stored["bank_bytes"].values())
    # at most one step's bank alive (every character's, written and read at that step), never two
    assert stored["bank_peak_bytes"] == consistent_steps * one_step
    assert 0 < lock4["bank_peak_bytes"] <= one_step
    assert lock6["bank_peak_bytes"] == lock4["bank_peak_bytes"]  # one step's bank, whatever the steps
    # written: every consistent step's bank (6 vs 4 steps)
    assert (4 - NO_SKIP["warmup_steps"]) * sum(lock6["bank_bytes"].values()) == (
        6 - NO_SKIP["warmup_steps"]
    ) * sum(lock4["bank_bytes"].values())
    # measured independently of the bank's own accounting: all tensors alive at once
    assert tracked6 - tracked4 < one_step, (tracked4, tracked6)
    # above a run without banks: one step's bank (the stored schedule's: every step's), not two
    assert tracked4 - tracked_plain < 1.5 * one_step, (tracked4, tracked_plain, one_step)
    assert tracked_stored - tracked_plain > (consistent_steps - 0.5) * one_step  # the measure sees banks


def test_lockstep_has_no_bank_left_and_records_its_schedule(sd15, tmp_path):
    sp = StoryDiffusionPipeline(sd15, ConsistencyConfig(seed=2, **NO_SKIP))
    try:
        result = sp(STORY, out_dir=tmp_path / "out", num_inference_steps=3, id_frames=1, progress=False)
        assert sp.state.bank.live_bytes == 0  # every step's bank was freed once read
        # and its characters are not "banked" for the next story (an empty bank would be read silently):
        # the next story writes them again and makes the same frames
        assert not sp.state.bank.has("Bob") and not sp.state.bank.has("Alice")
        again = sp(STORY, num_inference_steps=3, id_frames=1, progress=False)
        assert again.metadata["identity_frames"] == result.metadata["identity_frames"]
        assert np.array_equal(pixels(again), pixels(result))
    finally:
        sp.close()
    meta = json.loads((tmp_path / "out" / "metadata.json").read_text())
    assert meta["settings"]["bank_schedule"] == "lockstep" and meta["bank_peak_bytes"] > 0
    assert result.metadata["bank_bytes"]["Bob"] > 0


def test_kill_then_resume_a_lockstep_bank_run(tmp_path):
    """A run killed after its step-2 checkpoint resumes to the uninterrupted run's latents (and frames);
    mutation twin: the same checkpoint resumed as if written at step 3 moves them by at least
    MIN_RELATIVE_CHANGE (measured: 0.26)."""
    story = tmp_path / "story.txt"
    story.write_text(STORY)
    args = ["generate", "--model", "tiny-sd15", "--story", str(story), "--steps", "5", "--id-frames", "1"]
    args += ["--warmup-steps", "0", "--no-skip"]  # every step reads the banks
    with recorded_latents() as whole_latents:
        assert main([*args, "--out", str(tmp_path / "whole")]) == 0
    killed = tmp_path / "killed"
    command = [sys.executable, "-c", KILL_AFTER_FIRST_CHECKPOINT, *args, "--out", str(killed)]
    proc = subprocess.run([*command, "--checkpoint-every", "2"], capture_output=True)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()[-2000:]
    assert torch.load(killed / CHECKPOINT, weights_only=False)["step"] == 2
    assert json.loads((killed / "metadata.json").read_text())["status"] == "running"
    shutil.copytree(killed, tmp_path / "misread")
    with recorded_latents() as resumed_latents:
        assert main(["generate", "--resume", str(killed)]) == 0
    assert torch.equal(stacked(resumed_latents), stacked(whole_latents))
    resumed, whole = read_frames(killed), read_frames(tmp_path / "whole")
    assert len(resumed) == 6 and all(np.array_equal(a, b) for a, b in zip(resumed, whole, strict=True))
    assert not (killed / CHECKPOINT).exists()
    with recorded_latents() as misread_latents, resumed_from_another_step(+1):
        assert main(["generate", "--resume", str(tmp_path / "misread")]) == 0
    change = relative_change(stacked(misread_latents), stacked(whole_latents))
    assert change >= MIN_RELATIVE_CHANGE, change


def test_lockstep_refuses_loaded_banks(tmp_path, capsys):
    story = tmp_path / "story.txt"
    story.write_text(STORY)
    args = ["generate", "--model", "tiny-sd15", "--story", str(story), "--steps", "2", "--id-frames", "1"]
    assert main([*args, "--out", str(tmp_path / "a"), "--save-banks"]) == 0
    bob = tmp_path / "a" / "banks" / "Bob.safetensors"
    capsys.readouterr()
    assert (
        main([*args, "--out", str(tmp_path / "b"), "--load-bank", str(bob), "--bank-schedule", "lockstep"])
        == 2
    )
    assert "--bank-schedule lockstep cannot read banks loaded from files" in capsys.readouterr().err
    assert not (tmp_path / "b").exists()
