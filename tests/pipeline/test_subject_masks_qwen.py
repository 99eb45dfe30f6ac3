"""Subject masks on Qwen-Image (``families/qwen.py``), given and automatic: every token a frame offers lies in
its mask (bank and window mode), bounded reading changes the shared frame, whole-frame masks are no masks;
a description's columns are where its tokens sit among the text keys the transformer gets (after the chat
template's dropped head); automatic masks are recorded from the prompts' pass only, step 0 included, and
are kept, recorded and reproducible."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import torch

import storydiff.consistency.state as state_module
from storydiff import ConsistencyConfig, StoryDiffusionPipeline
from storydiff.consistency.cross_attention_masks import SubjectAttentionRecorder
from storydiff.consistency.state import COND
from storydiff.consistency.subject_masks import SubjectMasks
from storydiff.families.registry import family_of
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
RUN = {"progress": False, "height": SIDE, "width": SIDE}
# true CFG at guidance 15 multiplies what borrowed tokens change in the prompts' pass (test_qwen_image.py:
# at the default 5 the tiny model's frames barely move)
SHARP = {"guidance_scale": 15.0, "num_inference_steps": 2}


@pytest.fixture(scope="module")
def pipe():
    return build_tiny_pipeline("tiny-qwen-image", progress_bar=False)


def story(pipe, text=STORY, *, config=None, **settings):
    """One run of ``text`` on a fresh StoryDiffusionPipeline (no bank left from another run)."""
    sp = StoryDiffusionPipeline(pipe, config or ConsistencyConfig(rate=0.25, seed=1, **NO_SKIP))
    try:
        return sp(text, **{**RUN, **settings})
    finally:
        sp.close()


def halves() -> dict:
    """Alice: the left half of each frame she is in; Bob: the right half."""
    left = np.zeros((SIDE, SIDE), dtype=bool)
    left[:, : SIDE // 2] = True
    side = {"Alice": left, "Bob": ~left}
    return {f: {c: side[c] for c in chars} for f, chars in enumerate(FRAME_CHARACTERS) if chars}


def spy_draws(monkeypatch) -> list:
    """Record (story frame, image tokens, offered positions) of every per-frame draw."""
    seen = []
    real = state_module.ConsistencyState.frame_reference_indices

    def spy(self, layer, frames, image, device):
        rows = real(self, layer, frames, image, device)
        seen.extend((f, image[1] - image[0], row - image[0]) for f, row in zip(frames, rows, strict=True))
        return rows

    monkeypatch.setattr(state_module.ConsistencyState, "frame_reference_indices", spy)
    return seen


def assert_in_masks(seen, masks: SubjectMasks) -> None:
    assert seen
    for frame, tokens, row in seen:
        subject = masks.subject_tokens(frame, tokens)
        if subject is None:  # an [NC] frame draws from the whole frame
            continue
        assert subject[row.cpu()].all(), (frame, tokens)


def pixels(result) -> list[np.ndarray]:
    return [np.asarray(image, dtype=int) for image in result.images]


def test_bank_offers_masked_tokens_and_bounds_the_shared_frame(pipe, monkeypatch):
    """Bank mode: every drawn token lies in its mask; bounded reading changes only the shared frame. The
    story's prompts differ in length (Qwen pads each batch to its longest): the banked tokens' characters
    are found whatever the reader's text length (they are keyed by image tokens)."""
    masks = SubjectMasks.from_mapping(halves(), FRAME_CHARACTERS, (SIDE, SIDE))
    seen = spy_draws(monkeypatch)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # every mask holds enough tokens: no uniform fallback
        bounded = story(pipe, subject_masks=masks, bounded=True, id_frames=1, **SHARP)
    assert {frame for frame, *_ in seen} == {0, 1}  # the identity frames write the banks
    assert_in_masks(seen, masks)
    plain = story(pipe, subject_masks=masks, id_frames=1, **SHARP)
    ours, theirs = pixels(bounded), pixels(plain)
    assert np.abs(ours[2] - theirs[2]).max() > 0  # the shared frame reads its banks bounded
    for frame in (0, 1, 3):  # identity frames and [NC] read no bank: the same either way
        assert np.array_equal(ours[frame], theirs[frame]), frame


def test_window_offers_masked_tokens_and_whole_frames_are_no_masks(pipe, monkeypatch):
    """Window mode draws per frame with or without masks: half masks keep every draw inside, and
    whole-frame masks (any background share: there is no background) give the unmasked frames exactly."""
    masks = SubjectMasks.from_mapping(halves(), FRAME_CHARACTERS, (SIDE, SIDE))
    seen = spy_draws(monkeypatch)
    window = {"mode": "window", "chunk_size": 2, **SHARP}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        masked = story(pipe, subject_masks=masks, **window)
    assert {frame for frame, *_ in seen} == {0, 1, 2, 3}  # every frame offers to its neighbours
    assert_in_masks(seen, masks)
    whole = np.ones((SIDE, SIDE), dtype=bool)
    everything = {f: dict.fromkeys(chars, whole) for f, chars in enumerate(FRAME_CHARACTERS) if chars}
    plain = pixels(story(pipe, **window))
    assert any(np.abs(a - b).max() > 0 for a, b in zip(pixels(masked), plain, strict=True))
    for share in (0.0, 0.5):
        full = story(pipe, subject_masks=everything, background_share=share, **window)
        assert all(np.array_equal(a, b) for a, b in zip(pixels(full), plain, strict=True)), share


def test_columns_are_the_description_among_the_text_keys(pipe):
    """Each frame's columns, shifted past the template's dropped head, spell the description in the
    templated ids; the text embeddings the transformer gets change first at the first column when the
    description's characters change (the text encoder is causal), and nowhere before it."""
    family = family_of(pipe)
    assert family.records_subject_masks
    tokenizer, dropped = pipe.tokenizer, pipe.prompt_template_encode_start_idx
    parsed = parse_story(STORY)
    for frame in parsed.frames:
        prompt, _ = apply_style(parsed.prompt(frame), RunSettings().style, "")
        ids = tokenizer(pipe.prompt_template_encode.format(prompt)).input_ids
        for character in frame.characters:
            description = DESCRIPTIONS[character]
            columns = family.subject_token_columns(prompt, description)
            assert columns == list(range(columns[0], columns[0] + len(columns)))
            assert tokenizer.decode([ids[dropped + j] for j in columns]) == description
            # the same bytes replaced by others of the same length: the same token count
            other = prompt.replace(description, "z" * len(description), 1)
            (embeds, _), (changed, _) = (
                family.encode([p], [], False, SIDE, SIDE)[1] for p in (prompt, other)
            )
            assert embeds.shape == changed.shape and columns[-1] < embeds.shape[1]
            moved = (embeds[0] - changed[0]).abs().amax(dim=-1) > 0
            assert int(moved.nonzero()[0]) == columns[0], (frame.index, character)
    assert family.subject_token_columns("a quiet street", "a man with red hair") == []
    assert family.subject_token_columns("x " * 600 + "a man with red hair", "a man with red hair") == []


def test_auto_masks_are_kept_recorded_and_reproducible(pipe, tmp_path):
    results = [
        story(pipe, subject_masks="auto", id_frames=1, num_inference_steps=3, out_dir=tmp_path / out)
        for out in "ab"
    ]
    frames = [[image.tobytes() for image in result.images] for result in results]
    assert frames[0] == frames[1]
    record = json.loads((tmp_path / "a" / "metadata.json").read_text())
    assert record["status"] == "complete"
    assert record["subject_masks"]["source"] == "auto"
    kept = SubjectMasks.load(tmp_path / "a", FRAME_CHARACTERS, (SIDE, SIDE))
    assert (
        kept.digest() == record["subject_masks"]["sha256"] == results[1].metadata["subject_masks"]["sha256"]
    )
    names = sorted(path.name for path in (tmp_path / "a" / "masks").iterdir())
    assert "mask_002_Bob.png" in names and "mask_002_Alice.png" in names
    for name in names:
        assert (tmp_path / "a" / "masks" / name).read_bytes() == (
            tmp_path / "b" / "masks" / name
        ).read_bytes()


def test_recorder_sees_every_step_of_the_prompts_pass_only(pipe, monkeypatch):
    """With a warm-up step (its calls borrow nothing and run diffusers' own processor), every consistent
    layer call of every step of the prompts' pass is recorded, the negatives' never: each (frame,
    character) map counts steps x layers calls, and both characters' maps vary over the frame."""
    recorders, passes = [], []
    init, observe = SubjectAttentionRecorder.__init__, SubjectAttentionRecorder.observe

    def keep(self, *args, **kwargs):
        init(self, *args, **kwargs)
        recorders.append(self)

    def count(self, state, *args, **kwargs):
        passes.append(state.current_pass.group)
        return observe(self, state, *args, **kwargs)

    monkeypatch.setattr(SubjectAttentionRecorder, "__init__", keep)
    monkeypatch.setattr(SubjectAttentionRecorder, "observe", count)
    config = ConsistencyConfig(rate=0.25, seed=1, **{**NO_SKIP, "warmup_steps": 1})
    steps, layers = 3, len(pipe.transformer.transformer_blocks)
    story(pipe, config=config, subject_masks="auto", id_frames=1, num_inference_steps=steps)
    (recorder,) = [r for r in recorders if r.calls]  # the run's (a pre-flight check may make another)
    # 3 batches (two identity frames, then the read batch), per step: both passes, every layer
    assert passes.count(COND) == passes.count(1 - COND) == 3 * steps * layers
    assert sorted(recorder.calls) == [(0, "Alice"), (1, "Bob"), (2, "Alice"), (2, "Bob")]
    assert set(recorder.calls.values()) == {steps * layers}
    for entry, subject_map in recorder.maps().items():
        assert torch.isfinite(subject_map).all() and subject_map.max() > subject_map.min() > 0, entry
