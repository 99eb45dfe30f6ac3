"""Subject masks on Wan story videos (families/wan.py): a shot has one 2D mask per character, on every
latent frame of it.

- unit: a shot's T·h·w tokens map a mask to T repeated grids (exact bools), the state's segments follow,
  and a token count that is not T grids is refused;
- given masks (bank and window mode): every token a shot offers lies in its mask at its latent frame, and
  shots offer tokens of every latent frame; bounded attention changes only the shot that reads two
  characters; the masks a run writes are read back to the same shots;
- automatic masks: ``WanSubjectRecordingProcessor`` is ``WanAttnProcessor`` bit for bit (T2V and the
  2.1 I2V image keys) and feeds the recorder one map per shot (the mean over its latent frames); end to
  end through the CLI: masks/ written, metadata source auto + sha256, seeded runs identical;
- Wan 2.2: both experts' ``attn2`` are recorded; image-to-video shots (keyframes) record whole shots too.
"""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import torch

import storydiff.consistency.state as state_module
import storydiff.families.wan as wan_module
from storydiff import ConsistencyConfig, StoryDiffusionPipeline
from storydiff.cli import main
from storydiff.consistency.cross_attention_masks import SubjectAttentionRecorder, subject_probability
from storydiff.consistency.state import COND, UNCOND, ConsistencyState
from storydiff.consistency.subject_masks import SubjectMasks, token_grid
from storydiff.families.tiny_models import build_tiny_pipeline

STORY = """\
[Ann] a cat
[Bob] a dog
---
[Ann] runs
[Bob] sits
[Ann] and [Bob] play
[NC] a street
"""
FRAME_CHARACTERS = [("Ann",), ("Bob",), ("Ann", "Bob"), ()]
SIDE = 64  # a 4 x 4 token grid per latent frame (VAE 8x, patches 2x2)
GRID = (4, 4)
SHOT_FRAMES = 5  # 2 latent frames a shot
LATENT_FRAMES = 2
TOKENS = LATENT_FRAMES * GRID[0] * GRID[1]
NO_SKIP = {"warmup_steps": 0, "skip_prob_early": 0.0, "skip_prob_late": 0.0}
RUN = {
    "num_inference_steps": 2,
    "progress": False,
    "height": SIDE,
    "width": SIDE,
    "shot_frames": SHOT_FRAMES,
    "style": "none",
    "seed": 3,
}


def given() -> dict:
    """Ann: the left half below the top quarter; Bob: the right half; the shared shot shows both."""
    ann = np.zeros((SIDE, SIDE), dtype=bool)
    ann[SIDE // 4 :, : SIDE // 2] = True
    bob = np.zeros((SIDE, SIDE), dtype=bool)
    bob[:, SIDE // 2 :] = True
    side = {"Ann": ann, "Bob": bob}
    return {f: {c: side[c] for c in chars} for f, chars in enumerate(FRAME_CHARACTERS) if chars}


@pytest.fixture(scope="module")
def pipe():
    return build_tiny_pipeline("tiny-wan", progress_bar=False)


def story_pipeline(pipe) -> StoryDiffusionPipeline:
    return StoryDiffusionPipeline(pipe, ConsistencyConfig(rate=0.25, seed=1, **NO_SKIP))


def shots(result) -> list[list[bytes]]:
    return [[image.tobytes() for image in shot] for shot in result.images]


# ------------------------------------------------------------------------------------------------ unit


def test_a_shots_tokens_repeat_the_mask_on_every_latent_frame():
    masks = SubjectMasks.from_mapping(given(), FRAME_CHARACTERS, (SIDE, SIDE))
    ann_grid = [0, 0, 0, 0, 1, 1, 0, 0, 1, 1, 0, 0, 1, 1, 0, 0]  # rows 1-3, columns 0-1 of 4 x 4
    bob_grid = [0, 0, 1, 1] * 4
    expected_ann = torch.tensor(ann_grid * LATENT_FRAMES, dtype=torch.bool)
    expected_union = torch.tensor(
        [a | b for a, b in zip(ann_grid, bob_grid, strict=True)] * LATENT_FRAMES, dtype=torch.bool
    )
    assert token_grid(TOKENS, (SIDE, SIDE), LATENT_FRAMES) == GRID
    assert torch.equal(masks.subject_tokens(0, TOKENS, LATENT_FRAMES), expected_ann)
    assert torch.equal(masks.subject_tokens(2, TOKENS, LATENT_FRAMES), expected_union)
    assert masks.subject_tokens(3, TOKENS, LATENT_FRAMES) is None  # [NC]
    # 4 latent frames of 4 x 4 are as many tokens as one 8 x 8 grid: only T tells them apart
    assert token_grid(64, (SIDE, SIDE), 4) == GRID and token_grid(64, (SIDE, SIDE)) == (8, 8)
    assert not torch.equal(masks.subject_tokens(0, 64, 4), masks.subject_tokens(0, 64))
    with pytest.raises(ValueError, match="not 2 latent frames"):
        masks.subject_tokens(0, TOKENS + 1, LATENT_FRAMES)
    with pytest.raises(ValueError, match="no grid"):
        masks.subject_tokens(0, TOKENS)  # 32 tokens are no square grid: a shot needs its T

    state = ConsistencyState(ConsistencyConfig(), [], offload_bank=False)
    state.set_subject_masks(masks, bounded=True)
    state.latent_frames = LATENT_FRAMES
    segments = state.segments([2], (0, TOKENS), TOKENS, torch.device("cpu"))[0]
    ann, bob = torch.tensor(ann_grid, dtype=torch.bool), torch.tensor(bob_grid, dtype=torch.bool)
    expected = (ann.int() * 1 + bob.int() * 2).repeat(LATENT_FRAMES)  # disjoint masks: one owner each
    assert torch.equal(segments, expected.to(torch.int32))


# ------------------------------------------------------------------------------------- given masks


def offered_tokens(monkeypatch) -> list:
    """Spy on the state's per-frame draws: (story frame, token count, drawn positions)."""
    seen = []
    real = state_module.ConsistencyState.frame_reference_indices

    def spy(self, layer, frames, image, device):
        rows = real(self, layer, frames, image, device)
        seen.extend((f, image[1] - image[0], row - image[0]) for f, row in zip(frames, rows, strict=True))
        return rows

    monkeypatch.setattr(state_module.ConsistencyState, "frame_reference_indices", spy)
    return seen


def check_offered(seen: list, masks: SubjectMasks) -> set[int]:
    """Every offered token (t, h, w) lies in its shot's mask at (h, w); returns the shots that offered."""
    assert seen
    frames_seen, offering = set(), set()
    for frame, tokens, row in seen:
        assert tokens == TOKENS
        grid = masks.frame_mask(frame, GRID) if masks.masks.get(frame) else None
        for index in row.tolist():
            t, cell = divmod(index, GRID[0] * GRID[1])
            frames_seen.add(t)
            if grid is not None:
                assert grid[divmod(cell, GRID[1])], (frame, index)
        offering.add(frame)
    assert frames_seen == set(range(LATENT_FRAMES))  # the mask holds on every latent frame
    return offering


def test_given_masks_bank_mode_bounded_and_read_back(pipe, monkeypatch, tmp_path):
    """Bank mode: identity shots offer only masked tokens of both latent frames; the masks a run writes,
    read back, give the same shots; bounded reading changes only the shot reading both banks."""
    masks = SubjectMasks.from_mapping(given(), FRAME_CHARACTERS, (SIDE, SIDE))
    seen = offered_tokens(monkeypatch)
    sp = story_pipeline(pipe)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # no shot falls back to uniform draws
            first = sp(STORY, subject_masks=given(), id_frames=1, out_dir=tmp_path / "a", **RUN)
        assert check_offered(seen, masks) == {0, 1}  # the identity shots write the banks
        record = json.loads((tmp_path / "a" / "metadata.json").read_text())
        kept = SubjectMasks.load(tmp_path / "a", FRAME_CHARACTERS, (SIDE, SIDE))
        assert kept.digest() == record["subject_masks"]["sha256"] == masks.digest()
        assert (tmp_path / "a" / "masks" / "mask_002_Ann.png").is_file()
        again = sp(STORY, subject_masks=str(tmp_path / "a" / "masks"), id_frames=1, **RUN)
        bounded = sp(STORY, subject_masks=given(), bounded=True, id_frames=1, **RUN)
        plain = sp(STORY, id_frames=1, **RUN)
    finally:
        sp.close()
    assert shots(again) == shots(first)
    assert shots(bounded)[:2] == shots(first)[:2]  # identity shots read no bank: bounds change nothing
    assert shots(bounded)[2] != shots(first)[2]  # the shot reading Ann's and Bob's banks
    assert shots(plain)[:2] == shots(first)[:2]  # one identity shot a batch: it borrows from no other
    assert shots(plain)[2] != shots(first)[2]  # the masks change what the banks hold


def test_given_masks_window_mode_every_shot_offers_masked_tokens(pipe, monkeypatch):
    masks = SubjectMasks.from_mapping(given(), FRAME_CHARACTERS, (SIDE, SIDE))
    seen = offered_tokens(monkeypatch)
    sp = story_pipeline(pipe)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            sp(STORY, subject_masks=masks, mode="window", chunk_size=2, bounded=True, **RUN)
    finally:
        sp.close()
    assert check_offered(seen, masks) == {0, 1, 2, 3}  # the shared shot, and [NC] drawn whole


# ----------------------------------------------------------------------------------- automatic masks


@pytest.mark.parametrize("model", ["tiny-wan", "tiny-wan-i2v"])
def test_recording_processor_is_the_stock_processor_and_averages_latent_frames(model):
    """Bit for bit WanAttnProcessor's output (the I2V image keys included); the recorder gets the text
    softmax's probability on the subject columns, one map per shot: the mean over its latent frames."""
    transformer = build_tiny_pipeline(model, progress_bar=False).transformer
    attn = transformer.blocks[0].attn2
    assert (attn.add_k_proj is not None) == (model == "tiny-wan-i2v")
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(2, TOKENS, attn.to_q.in_features, generator=gen)
    text_length = wan_module.TEXT_LENGTH if model == "tiny-wan-i2v" else 32
    image_tokens = 17 if model == "tiny-wan-i2v" else 0
    context = torch.randn(2, image_tokens + text_length, attn.to_k.in_features, generator=gen)
    state = ConsistencyState(ConsistencyConfig(), [], offload_bank=False)
    recorder = SubjectAttentionRecorder((SIDE, SIDE))
    recorder.set_batch([0, 2], [{"Ann": [3, 4]}, {"Ann": [5], "Bob": [1, 2, 7]}])
    state.latent_frames = LATENT_FRAMES  # as WanFamily.prepare sets it for a run
    processor = wan_module.WanSubjectRecordingProcessor(state, recorder)
    with torch.no_grad():
        stock = wan_module.WanAttnProcessor()(attn, hidden, context)
        with state.cfg_pass(UNCOND):  # the negative prompt's pass is not recorded
            assert torch.equal(processor(attn, hidden, context), stock)
        assert not recorder.calls
        with state.cfg_pass(COND):
            out = processor(attn, hidden, context)
        assert torch.equal(out, stock)
        attn.fuse_projections()
        try:
            fused = wan_module.WanAttnProcessor()(attn, hidden, context)  # fused K/V: the same math
            assert torch.equal(processor(attn, hidden, context), fused)
        finally:
            attn.unfuse_projections()
        text = context[:, image_tokens:]
        query = attn.norm_q(attn.to_q(hidden)).unflatten(2, (attn.heads, -1)).transpose(1, 2)
        key = attn.norm_k(attn.to_k(text)).unflatten(2, (attn.heads, -1)).transpose(1, 2)
    columns = torch.zeros(2, 2, text_length, dtype=torch.bool)
    columns[0, 0, [3, 4]] = True
    columns[1, 0, [5]] = True
    columns[1, 1, [1, 2, 7]] = True
    per_token = subject_probability(query, key, columns).mean(dim=2).double()  # [F, C, T·h·w]
    per_shot = per_token.unflatten(2, (LATENT_FRAMES, -1)).mean(dim=2)
    assert recorder.calls == {(0, "Ann"): 2, (2, "Ann"): 2, (2, "Bob"): 2}
    torch.testing.assert_close(recorder.sums[(2, "Bob")] / 2, per_shot[1, 1])
    torch.testing.assert_close(recorder.sums[(0, "Ann")] / 2, per_shot[0, 0])
    assert not torch.allclose(per_token[1, 1, :16], per_token[1, 1, 16:])  # the frames differ: a real mean


def run_cli(tmp_path, model: str, out: str, *extra: str) -> int:
    story = tmp_path / "story.txt"
    story.write_text(STORY)
    args = ["generate", "--model", model, "--story", str(story), "--steps", "2", "--id-frames", "1"]
    args += ["--height", str(SIDE), "--width", str(SIDE), "--shot-frames", str(SHOT_FRAMES)]
    args += ["--rate", "0.25", "--style", "none", "--subject-masks", "auto", "--seed", "3"]
    return main([*args, *extra, "--out", str(tmp_path / out)])


def test_cli_auto_masks_on_wan(tmp_path, monkeypatch):
    """Masks found from attn2 are written, recorded and reproducible; the recorder saw whole shots."""
    recorded = []
    real = SubjectAttentionRecorder.record

    def spy(self, query, key, **kwargs):
        done = real(self, query, key, **kwargs)
        recorded.append((done, query.shape[2], kwargs.get("latent_frames", 1)))
        return done

    monkeypatch.setattr(SubjectAttentionRecorder, "record", spy)
    for out in ("a", "b"):
        assert run_cli(tmp_path, "tiny-wan", out, "--bounded") == 0
    assert recorded and all(r == (True, TOKENS, LATENT_FRAMES) for r in recorded)
    files = {
        out: sorted(p.read_bytes() for p in (tmp_path / out).rglob("*.png") if "masks" not in p.parts)
        for out in "ab"
    }
    assert files["a"] and files["a"] == files["b"]
    record = json.loads((tmp_path / "a" / "metadata.json").read_text())
    assert record["status"] == "complete"
    assert record["subject_masks"]["source"] == "auto" and record["subject_masks"]["bounded"] is True
    kept = SubjectMasks.load(tmp_path / "a", FRAME_CHARACTERS, (SIDE, SIDE))
    assert kept.digest() == record["subject_masks"]["sha256"]
    assert (tmp_path / "a" / "masks" / "mask_002_Bob.png").is_file()
    assert any(not kept.frame_mask(f, GRID).all() for f in (0, 1, 2))  # thresholded, not whole shots


def test_wan22_records_both_experts(monkeypatch):
    pipe = build_tiny_pipeline("tiny-wan2.2", progress_bar=False)
    owner = {id(m): name for name in ("transformer", "transformer_2") for m in getattr(pipe, name).modules()}
    calls = {"transformer": 0, "transformer_2": 0}  # attn2 calls that added to the recorder's maps
    real = wan_module.WanSubjectRecordingProcessor.__call__

    def spy(self, attn, *args, **kwargs):
        before = sum(self.recorder.calls.values())
        out = real(self, attn, *args, **kwargs)
        calls[owner[id(attn)]] += sum(self.recorder.calls.values()) > before
        return out

    monkeypatch.setattr(wan_module.WanSubjectRecordingProcessor, "__call__", spy)
    sp = story_pipeline(pipe)
    try:
        result = sp(STORY, subject_masks="auto", id_frames=1, **{**RUN, "num_inference_steps": 3})
    finally:
        sp.close()
    assert calls["transformer"] > 0 and calls["transformer_2"] > 0, calls
    assert result.metadata["subject_masks"]["source"] == "auto"
    for transformer in (pipe.transformer, pipe.transformer_2):  # put back after the run
        kinds = {type(p).__name__ for n, p in transformer.attn_processors.items() if ".attn2." in n}
        assert kinds == {"WanAttnProcessor"}


@pytest.mark.parametrize("model", ["tiny-wan2.2-i2v", "tiny-wan-i2v"])
def test_image_to_video_shots_record_masks_too(model):
    """Image-to-video with keyframes — Wan 2.2 (two experts) and Wan 2.1 (a CLIP image encoder: attn2
    also holds image keys, a softmax of their own left out of the map): automatic masks record whole
    shots."""
    from PIL import Image

    pipe = build_tiny_pipeline(model, progress_bar=False)
    pixels = np.random.default_rng(0).integers(0, 256, (SIDE, SIDE, 3), dtype=np.uint8)
    recorded = []
    real = SubjectAttentionRecorder.record

    def spy(self, query, key, **kwargs):
        recorded.append((real(self, query, key, **kwargs), kwargs.get("latent_frames", 1)))
        return recorded[-1][0]

    sp = story_pipeline(pipe)
    try:
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(SubjectAttentionRecorder, "record", spy)
            result = sp(
                STORY, keyframes=[Image.fromarray(pixels)] * 4, subject_masks="auto", id_frames=1, **RUN
            )
    finally:
        sp.close()
    assert recorded and all(r == (True, LATENT_FRAMES) for r in recorded)
    assert result.metadata["subject_masks"]["source"] == "auto" and len(result.images[0]) == SHOT_FRAMES


class Stop(Exception):
    """A run stopped right after its first checkpoint."""


def test_window_mode_auto_masks_resume_to_the_whole_run(pipe, tmp_path, monkeypatch):
    """Window mode, automatic masks, bounded, on shots: a run stopped after its step-1 checkpoint and
    resumed gives the uninterrupted run's latents and masks (the checkpoint keeps the maps)."""
    from story_helpers import recorded_latents, stacked

    import storydiff.runs.lockstep as lockstep

    settings = {**RUN, "mode": "window", "chunk_size": 2, "checkpoint_every": 1, "num_inference_steps": 3}
    settings.update(subject_masks="auto", bounded=True)

    def run(out, **extra):
        sp = story_pipeline(pipe)
        try:
            with recorded_latents() as latents:
                result = sp(STORY, out_dir=tmp_path / out, **settings, **extra)
            return result, stacked(latents)
        finally:
            sp.close()

    whole, whole_latents = run("whole")
    save = lockstep.save_checkpoint

    def save_then_stop(*args, **kwargs):
        save(*args, **kwargs)
        raise Stop

    monkeypatch.setattr(lockstep, "save_checkpoint", save_then_stop)
    with pytest.raises(Stop):
        run("stopped")
    monkeypatch.setattr(lockstep, "save_checkpoint", save)
    resumed, resumed_latents = run("stopped", resume=True)
    assert torch.equal(resumed_latents, whole_latents)
    assert resumed.metadata["subject_masks"]["sha256"] == whole.metadata["subject_masks"]["sha256"]
