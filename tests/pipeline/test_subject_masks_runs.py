"""Subject masks wherever a story runs: automatic masks in window mode (chunked: every chunk of a step reads
the masks of the step before), resumed runs (checkpoints keep the maps), and runs over two ranks — window
mode (masks gathered after every step) and bank mode (banks carry their tokens' characters to the ranks
that read them) — equal to one process, given and automatic masks, bounded."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
from dist_helpers import batch_invariant_linear, join, spawn
from story_helpers import MIN_RELATIVE_CHANGE, merged_latents, recorded_latents, relative_change, stacked

import storydiff.runs.lockstep as lockstep
from storydiff import ConsistencyConfig, StoryDiffusionPipeline
from storydiff.consistency.cross_attention_masks import AutoSubjectMasks
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
[Alice] rides a bicycle
[Bob] and [Alice] dance
"""
FRAME_CHARACTERS = [("Alice",), ("Bob",), ("Alice", "Bob"), (), ("Alice",), ("Bob", "Alice")]
SIDE = 64
NO_SKIP = {"warmup_steps": 0, "skip_prob_early": 0.0, "skip_prob_late": 0.0}
CONFIG = {"rate": 0.25, "seed": 1, "window": 1, **NO_SKIP}
#: relative change two runs of one computation batched differently may show (fp32 rounding)
ROUNDING = MIN_RELATIVE_CHANGE / 10
WINDOW = {"mode": "window", "num_inference_steps": 3, "height": SIDE, "width": SIDE, "seed": 3}
BANK = {"num_inference_steps": 3, "height": SIDE, "width": SIDE, "seed": 3, "id_frames": 1}


def given_masks() -> dict:
    """Alice on the left half, Bob on the right, in every frame that shows them."""
    left = np.zeros((SIDE, SIDE), dtype=bool)
    left[:, : SIDE // 2] = True
    side = {"Alice": left, "Bob": ~left}
    return {f: {c: side[c] for c in chars} for f, chars in enumerate(FRAME_CHARACTERS) if chars}


def story_pipeline(pipe=None) -> StoryDiffusionPipeline:
    pipe = pipe if pipe is not None else build_tiny_pipeline("tiny-sd15", progress_bar=False)
    return StoryDiffusionPipeline(pipe, ConsistencyConfig(**CONFIG), model_name="tiny-sd15")


@pytest.fixture(scope="module")
def tiny():
    return build_tiny_pipeline("tiny-sd15", progress_bar=False)


def run(tiny, **settings):
    """(result, latents in story order) of one story run on a fresh story pipeline."""
    sp = story_pipeline(tiny)
    try:
        with recorded_latents() as latents:
            result = sp(STORY, progress=False, **settings)
        return result, stacked(latents)
    finally:
        sp.close()


# -- window mode, one process ------------------------------------------------------------------------------
def test_chunked_window_reads_the_masks_of_the_step_before(tiny, monkeypatch):
    """Chunks of 2 frames, swept forward then backward: every chunk of step s draws from the same masks,
    those of step s - 1 — although the chunks before it have finished step s (their masks moved on):
    the tokens they left in the boundary cache were drawn under step s - 1's masks. The masks do move
    between steps (else this could not fail): "latest" masks would differ between the chunks of a step."""
    seen: list[tuple[int, tuple[int, ...], str, str]] = []
    before = AutoSubjectMasks.before

    def spy(self, frames, step):
        before(self, frames, step)
        if step:  # (step, chunk, masks handed to the state, the latest masks at that moment)
            used = self.state.subject_masks.digest()
            seen.append((step, tuple(frames), used, self.current().digest()))

    monkeypatch.setattr(AutoSubjectMasks, "before", spy)
    result, latents = run(tiny, subject_masks="auto", bounded=True, chunk_size=2, **WINDOW)
    for step in (1, 2):
        chunks = [entry for entry in seen if entry[0] == step]
        assert len(chunks) == 3 and len({used for _, _, used, _ in chunks}) == 1, step
        assert len({latest for _, _, _, latest in chunks}) > 1, step  # the latest masks moved mid-step
    assert seen[0][2] != next(e for e in seen if e[0] == 2)[2]  # step 2's masks are not step 1's
    assert result.metadata["subject_masks"]["source"] == "auto"
    again, latents_again = run(tiny, subject_masks="auto", bounded=True, chunk_size=2, **WINDOW)
    assert torch.equal(latents, latents_again)
    assert again.metadata["subject_masks"]["sha256"] == result.metadata["subject_masks"]["sha256"]
    _, unbounded = run(tiny, subject_masks="auto", chunk_size=2, **WINDOW)
    assert relative_change(unbounded, latents) >= MIN_RELATIVE_CHANGE


# -- resume ------------------------------------------------------------------------------------------------
class Stop(Exception):
    """A run stopped after its first checkpoint (as a kill would, minus the process)."""


@pytest.mark.parametrize("settings", [WINDOW, {**BANK, "bank_schedule": "lockstep"}], ids=["window", "bank"])
def test_a_resumed_auto_masks_run_equals_the_whole_run(tiny, tmp_path, monkeypatch, settings):
    """Stopped after the step-1 checkpoint and resumed: the latents and the masks of the uninterrupted run
    (the checkpoint keeps the recorder's maps and the masks so far). Mutation twin: the same checkpoint
    resumed without its maps (as if recorded from step 1 on) moves the latents."""
    settings = {**settings, "subject_masks": "auto", "bounded": True, "checkpoint_every": 1}
    whole, whole_latents = run(tiny, out_dir=tmp_path / "whole", **settings)
    save = lockstep.save_checkpoint

    def save_then_stop(*args, **kwargs):
        save(*args, **kwargs)
        raise Stop

    for folder in ("stopped", "forgetful"):
        monkeypatch.setattr(lockstep, "save_checkpoint", save_then_stop)
        with pytest.raises(Stop):
            run(tiny, out_dir=tmp_path / folder, **settings)
        monkeypatch.setattr(lockstep, "save_checkpoint", save)
    resumed, resumed_latents = run(tiny, out_dir=tmp_path / "stopped", resume=True, **settings)
    assert torch.equal(resumed_latents, whole_latents)
    assert resumed.metadata["subject_masks"]["sha256"] == whole.metadata["subject_masks"]["sha256"]
    kept = SubjectMasks.load(tmp_path / "stopped", FRAME_CHARACTERS, (SIDE, SIDE))
    assert kept.digest() == whole.metadata["subject_masks"]["sha256"]

    load = lockstep.load_checkpoint

    def without_maps(*args, **kwargs):
        data = load(*args, **kwargs)
        return {**data, "hook": {"sums": {}, "calls": {}, "found": {}}}

    monkeypatch.setattr(lockstep, "load_checkpoint", without_maps)
    _, forgetful = run(tiny, out_dir=tmp_path / "forgetful", resume=True, **settings)
    assert relative_change(forgetful, whole_latents) >= MIN_RELATIVE_CHANGE


# -- two ranks ---------------------------------------------------------------------------------------------
RUNS = {  # folder -> settings; given masks travel as the mapping (fork: no pickling)
    "window-auto": {**WINDOW, "subject_masks": "auto", "bounded": True, "chunk_size": 6},
    "bank-given": {**BANK, "subject_masks": given_masks(), "bounded": True},
    "bank-auto": {**BANK, "subject_masks": "auto", "bounded": True, "bank_schedule": "stored"},
}


def story_runs(out: Path, names, rank: int) -> None:
    """The RUNS named, one after another, each on a fresh story pipeline (no bank left from the run
    before) over one tiny model; each run's decoded latents saved per rank (``merged_latents``). Linear
    layers row by row: a rank batches only its block in window mode (``batch_invariant_linear``)."""
    tiny = build_tiny_pipeline("tiny-sd15", progress_bar=False)
    for name in names:
        sp = story_pipeline(tiny)
        try:
            with batch_invariant_linear(), recorded_latents() as latents:
                result = sp(STORY, out_dir=out / name, progress=False, **RUNS[name])
        finally:
            sp.close()
        torch.save(latents, out / name / f"latents-rank{rank}.pt")
        record = {"sha256": result.metadata["subject_masks"]["sha256"]}
        (out / name / f"masks-rank{rank}.json").write_text(json.dumps(record))


def ranks_worker(rank, world, rendezvous, out) -> None:
    join(rank, world, rendezvous)
    try:
        story_runs(Path(out), list(RUNS), rank)
    finally:
        dist.destroy_process_group()


def test_two_ranks_equal_one_process(tmp_path):
    """Bank mode with given and with automatic masks, bounded (banks broadcast with their tokens'
    characters): the one-process latents bit for bit; window mode with automatic masks, bounded (every
    rank's masks gathered after each step: a frame's neighbours on the other rank are drawn and bounded by
    their masks): within fp32 rounding of them (``ROUNDING``: a rank encodes only its block's prompts,
    as the distributed module says) — 10x below what unbounded reading moves (``MIN_RELATIVE_CHANGE``,
    ``test_chunked_window_reads_the_masks_of_the_step_before``). Every rank ends with the one-process
    masks."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the ranks run: CPU kernels' summation order depends on the thread count
    try:
        story_runs(tmp_path / "single", list(RUNS), 0)
    finally:
        torch.set_num_threads(threads)
    spawn(ranks_worker, 2, tmp_path, str(tmp_path / "ranks"))
    for name in RUNS:
        single = torch.load(tmp_path / "single" / name / "latents-rank0.pt")
        split = merged_latents(tmp_path / "ranks" / name, 2)
        if name.startswith("bank"):  # the single-process batches: bit for bit
            assert torch.equal(split, stacked(single)), name
        else:  # a rank's text encoder batches its block only: fp32 rounding (measured 1.4e-6)
            assert relative_change(split, stacked(single)) <= ROUNDING, name
        expected = json.loads((tmp_path / "single" / name / "masks-rank0.json").read_text())
        for rank in range(2):
            assert json.loads((tmp_path / "ranks" / name / f"masks-rank{rank}.json").read_text()) == expected
        metadata = json.loads((tmp_path / "ranks" / name / "metadata.json").read_text())
        assert metadata["status"] == "complete" and metadata["world_size"] == 2
