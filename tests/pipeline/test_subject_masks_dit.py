"""Given subject masks and bounded attention on diffusion transformers (joint text+image sequences: only
the image span carries masks and segments): every token a FLUX or SD3 frame offers lies in its mask, and
bounded reading changes the shared frame only where characters meet."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

import storydiff.consistency.state as state_module
from storydiff import ConsistencyConfig, StoryDiffusionPipeline
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
"""
FRAME_CHARACTERS = [("Alice",), ("Bob",), ("Alice", "Bob"), ()]
SIDE = 64
NO_SKIP = {"warmup_steps": 0, "skip_prob_early": 0.0, "skip_prob_late": 0.0}


def given() -> dict:
    left = np.zeros((SIDE, SIDE), dtype=bool)
    left[:, : SIDE // 2] = True
    side = {"Alice": left, "Bob": ~left}
    return {f: {c: side[c] for c in chars} for f, chars in enumerate(FRAME_CHARACTERS) if chars}


@pytest.mark.parametrize("model", ["tiny-flux", "tiny-sd3"])
def test_dit_offers_masked_tokens_and_bounds_the_shared_frame(model, monkeypatch):
    pipe = build_tiny_pipeline(model, progress_bar=False)
    masks = SubjectMasks.from_mapping(given(), FRAME_CHARACTERS, (SIDE, SIDE))
    seen = []
    real = state_module.ConsistencyState.frame_reference_indices

    def spy(self, layer, frames, image, device):
        rows = real(self, layer, frames, image, device)
        seen.extend((f, image[1] - image[0], row - image[0]) for f, row in zip(frames, rows, strict=True))
        return rows

    monkeypatch.setattr(state_module.ConsistencyState, "frame_reference_indices", spy)

    def run(bounded: bool):
        sp = StoryDiffusionPipeline(pipe, ConsistencyConfig(rate=0.25, seed=1, **NO_SKIP))
        try:
            settings = {"num_inference_steps": 2, "id_frames": 1, "height": SIDE, "width": SIDE}
            return sp(STORY, subject_masks=masks, bounded=bounded, progress=False, **settings)
        finally:
            sp.close()

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # every mask holds enough tokens: no uniform fallback
        bounded = run(True)
    assert seen
    for frame, tokens, row in seen:
        assert masks.subject_tokens(frame, tokens)[row.cpu()].all(), (frame, tokens)
    plain = run(False)
    pixels = [np.asarray(image, dtype=int) for image in (bounded.images[2], plain.images[2])]
    assert np.abs(pixels[0] - pixels[1]).max() > 0  # the shared frame reads its banks bounded
    for frame in (0, 1, 3):  # identity frames and [NC] read no bank: the same either way
        assert np.array_equal(np.asarray(bounded.images[frame]), np.asarray(plain.images[frame]))
