"""Subject masks in a real story batch: tiny-sd15 with consistent attention, masks on the state.

Every token a frame offers at every consistent level comes from its subject mask; a frame whose mask is
empty offers uniformly drawn tokens (one warning); masks recorded from the UNet's own cross-attention during
one pass feed the draws of the next.
"""

from __future__ import annotations

import warnings

import pytest
import torch

from storydiff import ConsistencyConfig, apply_consistent_attention, remove_consistent_attention
from storydiff.consistency.cross_attention_masks import (
    SubjectAttentionRecorder,
    install_subject_recorder,
    remove_subject_recorder,
)
from storydiff.consistency.subject_masks import SubjectMasks
from storydiff.families.tiny_models import build_tiny_pipeline

SIZE = (128, 128)
FRAMES = [("Bob",), ("Alice",), ("Bob",)]
PROMPTS = ["Bob walks in the park", "Alice waters the flowers", "Bob reads on a bench"]
NO_SKIP = {"warmup_steps": 0, "skip_prob_early": 0.0, "skip_prob_late": 0.0}


@pytest.fixture(scope="module")
def pipe():
    return build_tiny_pipeline("tiny-sd15", progress_bar=False)


def run(pipe, state, steps: int = 2):
    generators = [torch.Generator().manual_seed(i) for i in range(3)]
    return pipe(
        PROMPTS,
        num_inference_steps=steps,
        guidance_scale=5.0,
        height=SIZE[0],
        width=SIZE[1],
        generator=generators,
        callback_on_step_end=state.step_callback,
        output_type="latent",
    ).images


def test_story_batch_draws_from_the_masks(pipe):
    quadrant = torch.zeros(SIZE, dtype=torch.bool)
    quadrant[:64, :64] = True
    bottom = torch.zeros(SIZE, dtype=torch.bool)
    bottom[64:] = True
    empty = torch.zeros(SIZE, dtype=torch.bool)
    masks = SubjectMasks({0: {"Bob": quadrant}, 1: {"Alice": bottom}, 2: {"Bob": empty}}, FRAMES, SIZE)
    state = apply_consistent_attention(pipe, ConsistencyConfig(rate=0.2, **NO_SKIP))
    try:
        drawn = []
        original = state.frame_reference_indices

        def spy(layer, frames, image, device):
            idx = original(layer, frames, image, device)
            drawn.append((layer.level, tuple(frames), image[1] - image[0], idx))
            return idx

        state.frame_reference_indices = spy
        state.set_subject_masks(masks)
        state.begin_joint(3, frames=[0, 1, 2])
        with pytest.warns(UserWarning, match=r"frame 2 \(Bob\): its subject mask holds 0 of"):
            latents = run(pipe, state)
        assert torch.isfinite(latents).all()
        assert {level for level, *_ in drawn} == {8, 16, 32}  # up blocks of the tiny UNet
        uniform = apply_consistent_attention(pipe, ConsistencyConfig(rate=0.2, **NO_SKIP))  # masks off
        for level, frames, tokens, idx in drawn:
            assert frames == (0, 1, 2) and idx.shape[1] == round(0.2 * tokens)  # S as without masks
            for row in (0, 1):
                assert masks.subject_tokens(row, tokens)[idx[row]].all(), (level, row)
        # the empty mask's frame draws exactly what it would without masks (step 1: the last draws)
        uniform.set_step(1)
        last = {level: (tokens, idx) for level, _, tokens, idx in drawn}
        for level, (tokens, idx) in last.items():
            layer = next(layer for layer in state.layers if layer.level == level)
            expected = uniform.frame_reference_indices(layer, [2], (0, tokens), torch.device("cpu"))
            assert torch.equal(idx[2:], expected), level
    finally:
        remove_consistent_attention(pipe)


def test_masks_recorded_in_one_pass_feed_the_next(pipe):
    state = apply_consistent_attention(pipe, ConsistencyConfig(rate=0.2, **NO_SKIP))
    recorder = SubjectAttentionRecorder(SIZE)
    recorder.set_batch([0, 1, 2], [{"Bob": [1]}, {"Alice": [1]}, {"Bob": [1]}])  # the first word's token
    replaced = install_subject_recorder(pipe.unet, recorder)
    try:
        state.begin_joint(3)
        run(pipe, state)
        remove_subject_recorder(pipe.unet, replaced)
        assert set(recorder.calls) == {(0, "Bob"), (1, "Alice"), (2, "Bob")}
        masks = recorder.masks(FRAMES)
        assert masks.mask(0, "Bob").shape == (8, 8)
        state.set_subject_masks(masks, background_share=0.25)
        state.begin_joint(3, frames=[0, 1, 2])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # a random UNet's map may leave a mask too small
            latents = run(pipe, state)
        assert torch.isfinite(latents).all()
    finally:
        remove_consistent_attention(pipe)
