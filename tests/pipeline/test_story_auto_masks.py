"""Automatic subject masks in story runs (`--subject-masks auto`, ``sp(story, subject_masks="auto")``):
the recorder sees each character's description tokens per frame, step 0 runs unmasked and every later draw
lies in the then-current masks, banked tokens keep their characters across mask updates (stored schedule,
bounded), the final masks are kept and recorded, runs are reproducible, and what cannot run is one line."""

from __future__ import annotations

import json

import pytest
import torch

import storydiff.consistency.state as state_module
import storydiff.runs.lockstep as lockstep
from storydiff import ConsistencyConfig, StoryDiffusionPipeline
from storydiff.cli import main
from storydiff.consistency.cross_attention_masks import AutoSubjectMasks, SubjectAttentionRecorder
from storydiff.consistency.subject_masks import SubjectMasks
from storydiff.families.base import phrase_columns
from storydiff.families.tiny_models import build_tiny_pipeline
from storydiff.pages.story import parse_story
from storydiff.pages.styles import apply_style
from storydiff.runs.settings import RunSettings

STORY = """\
[Alice] a woman in a yellow dress
[Bob] a man with red hair
---
[Alice] waters the flowers
[Bob] walks in the park
[Alice] and [Bob] have dinner
[NC] a quiet street
"""
FRAME_CHARACTERS = [("Alice",), ("Bob",), ("Alice", "Bob"), ()]
DESCRIPTIONS = {"Alice": "a woman in a yellow dress", "Bob": "a man with red hair"}
SIDE = 64
NO_SKIP = {"warmup_steps": 0, "skip_prob_early": 0.0, "skip_prob_late": 0.0}
RUN = {"num_inference_steps": 3, "progress": False, "height": SIDE, "width": SIDE, "id_frames": 1}


@pytest.fixture(scope="module")
def pipes():
    names = ("tiny-sd15", "tiny-flux", "tiny-sd3", "tiny-pixart")
    return {name: build_tiny_pipeline(name, progress_bar=False) for name in names}


def story_pipeline(pipe) -> StoryDiffusionPipeline:
    return StoryDiffusionPipeline(pipe, ConsistencyConfig(rate=0.25, seed=1, **NO_SKIP))


def frames_of(result) -> list[bytes]:
    return [image.tobytes() for image in result.images]


@pytest.mark.parametrize("name", ["tiny-sd15", "tiny-flux", "tiny-sd3", "tiny-pixart"])
def test_recorder_sees_each_description_per_frame(pipes, monkeypatch, name):
    """set_batch gets, per frame of each call, every character's description tokens in its prompt."""
    batches = []
    real = SubjectAttentionRecorder.set_batch

    def spy(self, frames, subjects):
        batches.append((tuple(frames), [dict(s) for s in subjects]))
        return real(self, frames, subjects)

    monkeypatch.setattr(SubjectAttentionRecorder, "set_batch", spy)
    pipe = pipes[name]
    sp = story_pipeline(pipe)
    try:
        sp(STORY, subject_masks="auto", **RUN)
    finally:
        sp.close()
    tokenizer = pipe.tokenizer_2 if name == "tiny-flux" else pipe.tokenizer  # SD3: CLIP-L's positions
    story = parse_story(STORY)
    seen = {}
    for frames, subjects in batches:
        for frame, per_character in zip(frames, subjects, strict=True):
            seen.setdefault(frame, per_character)
            assert seen[frame] == per_character  # the same columns at every call
    assert sorted(seen) == [0, 1, 2, 3]
    for frame, per_character in seen.items():
        assert tuple(sorted(per_character)) == tuple(sorted(FRAME_CHARACTERS[frame]))
        prompt, _ = apply_style(story.prompt(story.frames[frame]), RunSettings().style, "")
        ids = tokenizer(prompt, truncation=True, max_length=77).input_ids
        for character, columns in per_character.items():
            wanted = tokenizer(DESCRIPTIONS[character], add_special_tokens=False).input_ids
            assert [ids[j] for j in columns] == wanted
            assert list(columns) == list(range(columns[0], columns[0] + len(wanted)))
            if name == "tiny-sd15":
                assert columns[0] >= 1  # after CLIP's BOS
                assert tokenizer.decode([ids[j] for j in columns]).strip() == DESCRIPTIONS[character]
    assert len(batches) == 3 * 3  # 2 identity frames (one batch each) + one read batch, 3 steps


def test_sdxl_tokenizers_agree_on_positions():
    pipe = build_tiny_pipeline("tiny-sdxl", progress_bar=False)
    story = parse_story(STORY)
    for frame in story.frames:
        prompt, _ = apply_style(story.prompt(frame), RunSettings().style, "")
        for character in frame.characters:
            description = DESCRIPTIONS[character]
            first = phrase_columns(pipe.tokenizer, prompt, description, 77)
            assert first
            assert first == phrase_columns(pipe.tokenizer_2, prompt, description, 77)


def test_truncated_description_warns_and_gets_no_columns(pipes):
    tokenizer = pipes["tiny-sd15"].tokenizer
    prompt = "word " * 80 + "a woman in a yellow dress"
    assert phrase_columns(tokenizer, prompt, "a woman in a yellow dress", 77) == []


@pytest.mark.parametrize("schedule", ["stored", "lockstep"])
def test_draws_after_step_0_lie_in_the_current_masks(pipes, monkeypatch, schedule):
    """Step 0 draws without masks; from step 1 on each frame's offered tokens lie in its masks of that
    moment, which are not the whole frame (they changed after step 0)."""
    seen = []
    real = state_module.ConsistencyState.frame_reference_indices
    steps_without = []
    real_plain = state_module.ConsistencyState.reference_indices

    def spy(self, layer, frames, image, device):
        rows = real(self, layer, frames, image, device)
        for frame, row in zip(frames, rows, strict=True):
            seen.append((self.step, frame, self.subject_masks, image[1] - image[0], row - image[0]))
        return rows

    def plain(self, layer, image, device):
        if self.subject_masks is None:
            steps_without.append(self.step)
        return real_plain(self, layer, image, device)

    monkeypatch.setattr(state_module.ConsistencyState, "frame_reference_indices", spy)
    monkeypatch.setattr(state_module.ConsistencyState, "reference_indices", plain)
    sp = story_pipeline(pipes["tiny-sd15"])
    try:
        sp(STORY, subject_masks="auto", bank_schedule=schedule, **RUN)
    finally:
        sp.close()
    assert set(steps_without) == {0}  # the unmasked warm-up step
    assert {step for step, *_ in seen} == {1, 2}
    partial = 0
    for _, frame, masks, tokens, row in seen:
        subject = masks.subject_tokens(frame, tokens)
        assert subject is not None  # only identity frames (with a character) offer tokens in bank mode
        if int(subject.sum()) >= row.numel():  # else drawn uniformly, with the state's warning
            assert subject[row.cpu()].all()
        partial += not bool(subject.all())
    assert partial  # the masks are no longer the whole frame


def test_swap_keeps_bank_segments():
    """Masks swapped mid-run keep what writers recorded; set_subject_masks clears it."""
    from storydiff.consistency.state import ConsistencyState

    state = ConsistencyState(ConsistencyConfig(), [], offload_bank=False)
    whole = torch.ones(4, 4, dtype=torch.bool)
    masks = SubjectMasks({0: {"Alice": whole}}, [("Alice",)], (SIDE, SIDE))
    state.set_subject_masks(masks, bounded=True)
    state.bank_segments[("Alice", 0, 16, 16)] = torch.ones(1, 4)
    state._draws["x"] = torch.zeros(1)
    state.swap_subject_masks(SubjectMasks({0: {"Alice": ~whole}}, [("Alice",)], (SIDE, SIDE)))
    assert ("Alice", 0, 16, 16) in state.bank_segments and not state._draws and state.bounded
    with pytest.raises(ValueError, match="bounded"):
        state.swap_subject_masks(None, bounded=True)
    state.set_subject_masks(None)
    assert not state.bank_segments


def test_stored_and_lockstep_bounded_agree(pipes):
    """Bounded reads of every step's bank under the stored schedule find the segments banked under the
    masks of their step; per-frame masks make both schedules give the same frames."""

    def run(**settings):
        sp = story_pipeline(pipes["tiny-sd15"])  # a fresh one: no bank from the previous story
        try:
            return sp(STORY, subject_masks="auto", **RUN, **settings)
        finally:
            sp.close()

    stored = run(bounded=True, bank_schedule="stored")
    lockstep = run(bounded=True, bank_schedule="lockstep")
    unbounded = run(bank_schedule="stored")
    assert frames_of(stored) == frames_of(lockstep)
    assert frames_of(stored) != frames_of(unbounded)
    assert stored.metadata["subject_masks"]["bounded"] is True
    assert stored.metadata["subject_masks"]["sha256"] == lockstep.metadata["subject_masks"]["sha256"]


def test_a_failed_run_leaves_no_recorder(pipes, monkeypatch):
    """A run that fails midway (here: after its first denoiser call) puts the stock processors back."""

    def fail(self, frames, step):
        raise RuntimeError("stopped")

    monkeypatch.setattr(AutoSubjectMasks, "after", fail)
    sp = story_pipeline(pipes["tiny-sd15"])
    try:
        with pytest.raises(RuntimeError, match="stopped"):
            sp(STORY, subject_masks="auto", **RUN)
        for name, processors in sp.pipe.unet.attn_processors.items():  # nothing left installed
            assert type(processors).__name__ != "SubjectRecordingProcessor", name
        assert sp.state.subject_masks is None and not sp.state.bounded
    finally:
        sp.close()


def run_cli(tmp_path, model, out, *extra):
    story = tmp_path / "story.txt"
    story.write_text(STORY)
    args = ["generate", "--model", model, "--story", str(story), "--steps", "3"]
    args += [] if "--mode" in extra else ["--id-frames", "1"]
    args += ["--height", str(SIDE), "--width", str(SIDE), "--rate", "0.25", "--subject-masks", "auto"]
    return main([*args, *extra, "--out", str(tmp_path / out)])


@pytest.mark.parametrize(
    ("model", "bounded"),
    [
        ("tiny-sd15", False),
        ("tiny-sd15", True),
        ("tiny-flux", True),
        ("tiny-sd3", True),
        ("tiny-pixart", False),
    ],
)
def test_cli_auto_masks(tmp_path, monkeypatch, model, bounded):
    extra = ("--bounded",) if bounded else ()
    for out in ("a", "b"):
        assert run_cli(tmp_path, model, out, *extra) == 0
    frames = {
        out: [(tmp_path / out / f"frames/frame_{i:03d}.png").read_bytes() for i in range(4)] for out in "ab"
    }
    assert frames["a"] == frames["b"]
    record = json.loads((tmp_path / "a" / "metadata.json").read_text())
    assert record["status"] == "complete"
    assert record["subject_masks"]["source"] == "auto"
    assert record["subject_masks"].get("bounded", False) is bounded
    kept = SubjectMasks.load(tmp_path / "a", FRAME_CHARACTERS, (SIDE, SIDE))
    assert kept.digest() == record["subject_masks"]["sha256"]
    assert (tmp_path / "a" / "masks" / "mask_002_Bob.png").is_file()
    if model == "tiny-sd15" and not bounded:  # window mode, stopped after a checkpoint, resumed
        window = ("--mode", "window", "--checkpoint-every", "1")
        assert run_cli(tmp_path, model, "whole", *window) == 0
        save = lockstep.save_checkpoint

        def save_then_stop(*args, **kwargs):
            save(*args, **kwargs)
            raise KeyboardInterrupt  # as Ctrl-C stops a run

        monkeypatch.setattr(lockstep, "save_checkpoint", save_then_stop)
        assert run_cli(tmp_path, model, "stopped", *window) == 130  # the CLI's code for Ctrl-C
        monkeypatch.setattr(lockstep, "save_checkpoint", save)
        assert main(["generate", "--resume", str(tmp_path / "stopped")]) == 0
        for i in range(4):
            name = f"frames/frame_{i:03d}.png"
            assert (tmp_path / "stopped" / name).read_bytes() == (tmp_path / "whole" / name).read_bytes()
        resumed = json.loads((tmp_path / "stopped" / "metadata.json").read_text())["subject_masks"]
        assert resumed == json.loads((tmp_path / "whole" / "metadata.json").read_text())["subject_masks"]


def test_a_family_that_records_no_masks_is_refused_in_one_line(tmp_path, capsys, monkeypatch):
    """Every story family records masks today; one that did not (``records_subject_masks`` False) refuses
    "auto" in one line before any folder is made — from the CLI (before the model loads, by its reserved
    name) and from Python."""
    from storydiff.families.qwen import QwenImageFamily

    monkeypatch.setattr(QwenImageFamily, "records_subject_masks", False)
    capsys.readouterr()
    assert run_cli(tmp_path, "tiny-qwen-image", "bad") == 2
    err = capsys.readouterr().err.strip()
    assert "not Qwen-Image models" in err and "\n" not in err
    assert not (tmp_path / "bad").exists()
    sp = StoryDiffusionPipeline(
        build_tiny_pipeline("tiny-qwen-image", progress_bar=False), ConsistencyConfig(seed=1)
    )
    try:
        with pytest.raises(ValueError, match=r"not Qwen-Image models") as refused:
            sp(STORY, subject_masks="auto", out_dir=tmp_path / "out", **RUN)
    finally:
        sp.close()
    assert "\n" not in str(refused.value)
    assert not (tmp_path / "out").exists()
