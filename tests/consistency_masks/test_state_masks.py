"""ConsistencyState with subject masks: draws from the subject, seeded, batch-invariant; off = as before."""

from __future__ import annotations

import warnings

import pytest
import torch

from storydiff.consistency.config import ConsistencyConfig
from storydiff.consistency.state import ConsistencyState, LayerInfo
from storydiff.consistency.subject_masks import SubjectMasks

SIZE = (64, 64)  # level 8: 8x8 = 64 tokens, level 16: 4x4
FRAMES = [("Bob",), ("Alice",), ("Bob",), ()]
LAYERS = [LayerInfo("a.attn1.processor", 0, 8), LayerInfo("b.attn1.processor", 1, 16)]
CPU = torch.device("cpu")


def box(top, left, bottom, right, size=SIZE) -> torch.Tensor:
    mask = torch.zeros(size, dtype=torch.bool)
    mask[top:bottom, left:right] = True
    return mask


REGIONS = {0: box(0, 0, 32, 48), 1: box(16, 16, 64, 64), 2: box(32, 0, 64, 32)}


def subject_masks(regions=REGIONS) -> SubjectMasks:
    return SubjectMasks({f: {FRAMES[f][0]: m} for f, m in regions.items()}, FRAMES, SIZE)


def state(masks=None, share=0.0, rate=0.25) -> ConsistencyState:
    s = ConsistencyState(ConsistencyConfig(rate=rate, seed=3), LAYERS, offload_bank=False)
    if masks is not None:
        s.set_subject_masks(masks, background_share=share)
    return s


def tokens_of(layer: LayerInfo) -> int:
    return 64 if layer.level == 8 else 16


def test_every_draw_inside_the_subject_region():
    masks = subject_masks()
    s = state(masks)
    for step in range(3):
        s.begin_joint(3, frames=[0, 1, 2])
        s.set_step(step)
        for layer in LAYERS:
            n = tokens_of(layer)
            idx = s.reference_indices(layer, (0, n), CPU)
            assert idx.shape == (3, round(0.25 * n))  # S as without masks
            for row, frame in enumerate([0, 1, 2]):
                assert masks.subject_tokens(frame, n)[idx[row]].all()
    # window mode's per-frame draws, with the image tokens after 5 text tokens (joint text+image hosts)
    idx = s.frame_reference_indices(LAYERS[0], range(0, 3), (5, 69), CPU)
    for row in range(3):
        assert masks.subject_tokens(row, 64)[idx[row] - 5].all()


@pytest.mark.parametrize("share", [0.125, 0.25, 0.5])
def test_background_share_exact(share):
    masks = subject_masks()
    s = state(masks, share=share)
    s.begin_joint(3, frames=[0, 1, 2])
    idx = s.reference_indices(LAYERS[0], (0, 64), CPU)  # S = 16
    for row in range(3):
        outside = (~masks.subject_tokens(row, 64)[idx[row]]).sum()
        assert outside == round(share * 16)


def test_batch_invariant_and_seeded():
    masks = subject_masks()
    together = state(masks)
    together.begin_joint(3, frames=[0, 1, 2])
    rows = together.reference_indices(LAYERS[0], (0, 64), CPU)
    alone = state(masks)
    alone.begin_write("Bob", 1, frames=[2])
    assert torch.equal(alone.reference_indices(LAYERS[0], (0, 64), CPU), rows[2:3])
    window = state(masks)
    assert torch.equal(window.frame_reference_indices(LAYERS[0], [1, 0], (0, 64), CPU), rows[[1, 0]])
    again = state(masks)
    again.begin_joint(3, frames=[0, 1, 2])
    assert torch.equal(again.reference_indices(LAYERS[0], (0, 64), CPU), rows)
    again.set_step(1)
    assert not torch.equal(again.reference_indices(LAYERS[0], (0, 64), CPU), rows)


def test_masks_off_is_todays_draws():
    plain = state()
    plain.begin_joint(3)
    before = [plain.reference_indices(layer, (0, tokens_of(layer)), CPU) for layer in LAYERS]
    window_before = plain.frame_reference_indices(LAYERS[0], range(4), (0, 64), CPU)
    s = state(subject_masks())
    s.set_subject_masks(None)  # on, then off again
    s.begin_joint(3)
    after = [s.reference_indices(layer, (0, tokens_of(layer)), CPU) for layer in LAYERS]
    assert all(torch.equal(a, b) for a, b in zip(before, after, strict=True))
    assert torch.equal(s.frame_reference_indices(LAYERS[0], range(4), (0, 64), CPU), window_before)
    # whole-frame masks draw exactly the unmasked per-frame draws; an [NC] frame draws as without masks
    full = state(subject_masks({f: torch.ones(SIZE, dtype=torch.bool) for f in range(3)}))
    assert torch.equal(full.frame_reference_indices(LAYERS[0], range(4), (0, 64), CPU), window_before)


def test_empty_mask_falls_back_to_uniform_with_one_warning():
    regions = dict(REGIONS)
    regions[1] = torch.zeros(SIZE, dtype=torch.bool)  # Alice's mask is empty
    s = state(subject_masks(regions))
    uniform = state().frame_reference_indices(LAYERS[0], range(3), (0, 64), CPU)
    with pytest.warns(UserWarning, match=r"frame 1 \(Alice\): its subject mask holds 0 of 64 tokens"):
        idx = s.frame_reference_indices(LAYERS[0], range(3), (0, 64), CPU)
    assert torch.equal(idx[1], uniform[1])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once per frame: later steps and levels stay quiet
        for step in (1, 2):
            s.set_step(step)
            for layer in LAYERS:
                s.frame_reference_indices(layer, range(3), (0, tokens_of(layer)), CPU)


def test_joint_batch_must_name_its_frames():
    s = state(subject_masks())
    s.begin_joint(3)
    with pytest.raises(RuntimeError, match="story frames are unknown"):
        s.reference_indices(LAYERS[0], (0, 64), CPU)
    with pytest.raises(ValueError, match="names 2 story frames for a batch of 3"):
        s.begin_joint(3, frames=[0, 1])
    with pytest.raises(ValueError, match="background_share"):
        s.set_subject_masks(subject_masks(), background_share=1.5)
