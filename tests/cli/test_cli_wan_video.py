"""`storydiff video --model WAN_I2V`: an image story animated shot by shot, or as first–last-frame
transitions (motion/keyframe_video.py), with consistent attention across the clips.

- shots: a clip per story frame, starting on it (tests/pipeline/test_wan.py: each shot's own keyframe);
- transitions between 3 keyframes make 2 clips; at rate 0 each clip is the stock pipeline's first–last-
  frame clip for its two keyframes, bit for bit; consistency changes them;
- --svd still names SVD models; bad combinations are one line and exit 2, before anything is written.
"""

from __future__ import annotations

import dataclasses
import json
from itertools import pairwise

import pytest
import torch
from PIL import Image
from story_helpers import recorded_latents, stacked

from storydiff import ConsistencyConfig, StoryDiffusionPipeline
from storydiff.cli import main
from storydiff.families.registry import family_of
from storydiff.families.tiny_models import build_tiny_pipeline
from storydiff.motion.keyframe_video import keyframe_story, transition_story

STORY = """\
[Bob] a man with red hair
[Alice] a woman in a yellow dress
---
[Bob] walks in the park #the walk
[Alice] waters the flowers
[Bob] and [Alice] have dinner together
"""


@pytest.fixture(scope="module")
def image_story(tmp_path_factory):
    folder = tmp_path_factory.mktemp("story")
    story = folder / "story.txt"
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
        str(folder / "out"),
    ]
    assert main([*args, "--id-frames", "1", "--height", "32", "--width", "32"]) == 0
    return folder / "out"


def video(story_dir, out, *args):
    return main(
        ["video", "--story-dir", str(story_dir), "--out", str(out), "--steps", "2", "--frames", "5", *args]
    )


def test_shots_of_an_image_story(image_story, tmp_path):
    assert video(image_story, tmp_path / "v", "--model", "tiny-wan2.2-i2v") == 0
    folder = tmp_path / "v"
    assert sorted(p.name for p in (folder / "shots").glob("shot_*.gif")) == [
        f"shot_{i:03d}.gif" for i in range(3)
    ]
    assert len(list((folder / "shots" / "shot_002").glob("frame_*.png"))) == 5
    metadata = json.loads((folder / "metadata.json").read_text())
    assert metadata["status"] == "complete" and metadata["model"] == "tiny-wan2.2-i2v"
    assert metadata["settings"]["shot_frames"] == 5


def test_transitions_are_the_stock_first_last_frame_clips_at_rate_zero(image_story):
    """3 keyframes → 2 clips, clip i from keyframe i to keyframe i + 1: each clip (run on its own, rate 0)
    is the stock pipeline's clip for image=keyframe i, last_image=keyframe i + 1, bit for bit."""
    pipe = build_tiny_pipeline("tiny-wan2.2-i2v", progress_bar=False)
    story, keyframes = transition_story(image_story)
    assert len(keyframes) == 2 and len(story.frames) == 2
    frames = [Image.open(image_story / "frames" / f"frame_{i:03d}.png").convert("RGB") for i in range(3)]
    for (first, last), (before, after) in zip(keyframes, pairwise(frames), strict=True):
        assert first.tobytes() == before.tobytes() and last.tobytes() == after.tobytes()
    run = {"num_inference_steps": 2, "seed": 3, "shot_frames": 5, "height": 32, "width": 32, "style": "none"}
    run |= {"mode": "window", "chunk_size": 1, "progress": False, "keyframes": keyframes}
    outputs = {}
    for rate in (0.0, 0.5):
        sp = StoryDiffusionPipeline(pipe, ConsistencyConfig(rate=rate, warmup_steps=0))
        with recorded_latents() as latents:
            result = sp(story, **run)
        sp.close()
        outputs[rate] = stacked(latents)
    prompts, seeds = result.metadata["prompts"], result.metadata["frame_seeds"]
    family_of(pipe)  # prompt cleaning without ftfy, as the family sets it up
    for clip, (first, last) in enumerate(keyframes):
        stock = pipe(
            image=first,
            last_image=last,
            prompt=prompts[clip],
            negative_prompt=result.metadata["negative_prompts"][clip],
            num_frames=5,
            height=32,
            width=32,
            num_inference_steps=2,
            max_sequence_length=pipe.tokenizer.model_max_length,
            generator=torch.Generator().manual_seed(seeds[clip]),
            output_type="latent",
        ).frames
        assert torch.equal(outputs[0.0][clip : clip + 1], stock), clip
    assert not torch.equal(outputs[0.5], outputs[0.0])


def test_keyframe_story_is_the_image_story(image_story):
    story, keyframes = keyframe_story(image_story)
    assert [f.characters for f in story.frames] == [("Bob",), ("Alice",), ("Bob", "Alice")]
    assert all(last is None for _, last in keyframes)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--model", "tiny-wan-i2v", "--transitions"], "FLF2V"),
        (["--model", "tiny-wan"], "storydiff generate"),
        (["--model", "tiny-svd", "--transitions"], "--transitions applies to Wan"),
        (["--model", "tiny-wan2.2-i2v", "--predictor", "p"], "--predictor applies to Stable Video Diffusion"),
        (["--model", "tiny-wan2.2-i2v", "--motion-bucket-id", "127"], "--motion-bucket-id applies to Stable"),
        (["--model", "tiny-wan2.2-i2v", "--frames", "6"], "4k+1"),
    ],
    ids=["i2v-cannot-end", "text-to-video", "svd-transitions", "svd-flag", "svd-default-value", "frames"],
)
def test_refusals(image_story, tmp_path, capsys, args, message):
    assert video(image_story, tmp_path / "out", *args) == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error.startswith("error:") and message in error, error
    assert not (tmp_path / "out").exists()


def test_model_and_svd_together_are_refused(image_story, tmp_path, capsys):
    assert video(image_story, tmp_path / "out", "--model", "tiny-svd", "--svd", "tiny-svd") == 2
    assert "not allowed with" in capsys.readouterr().err


def test_a_transition_is_conditioned_on_both_keyframes(image_story):
    """Clip i's condition: the mask marks its first and last video frames as given, and its first latent
    frame is keyframe i's own VAE latent (Wan's causal VAE encodes the first frame alone; the last latent
    frame encodes the final 4 frames, zeros and keyframe i + 1, as the stock pipeline does)."""
    from diffusers.pipelines.wan.pipeline_wan_i2v import retrieve_latents

    from storydiff.runs.plan import RunPlan
    from storydiff.runs.settings import RunSettings

    pipe = build_tiny_pipeline("tiny-wan2.2-i2v", progress_bar=False)
    family = family_of(pipe)
    story, keyframes = transition_story(image_story)
    plan = RunPlan.from_prompts(story.prompts(), RunSettings(shot_frames=9, height=32, width=32))
    family.prepare(dataclasses.replace(plan, keyframes=tuple(keyframes)))
    for clip, (first, _) in enumerate(keyframes):
        condition, images = family.shot_condition(clip, 32, 32)
        mask, latents = condition[:, :4], condition[:, 4:]
        assert images is None  # Wan 2.2 I2V has no image encoder
        assert mask[0, :, 0].eq(1).all() and mask[0, :, 1].eq(0).all()  # first latent frame given
        assert mask[0, :3, -1].eq(0).all() and mask[0, 3, -1].eq(1).all()  # only the very last frame
        pixels = pipe.video_processor.preprocess(first, height=32, width=32)[:, :, None]
        own = retrieve_latents(pipe.vae.encode(pixels), sample_mode="argmax")[:, :, 0]
        assert torch.equal(latents[:, :, 0], own)
    # another last image changes clip 0's last latent frame only
    first, _ = keyframes[0]
    changed = family_of(pipe)
    changed.prepare(dataclasses.replace(plan, keyframes=((first, first), *keyframes[1:])))
    moved = changed.shot_condition(0, 32, 32)[0][:, 4:]
    latents = family.shot_condition(0, 32, 32)[0][:, 4:]
    assert torch.equal(moved[:, :, :-1], latents[:, :, :-1]) and not torch.equal(moved, latents)
