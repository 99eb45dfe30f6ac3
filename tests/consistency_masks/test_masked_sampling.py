"""Mask-guided token draws: ``csa_kernels.sample_masked_reference_indices``."""

from __future__ import annotations

import pytest
import torch

from csa_kernels import sample_masked_reference_indices, sample_reference_indices
from csa_kernels.sampling import masked_sample_counts


def region_masks(frames: int, side: int, boxes: list[tuple[int, int, int, int]]) -> torch.Tensor:
    """(frames, side²) masks, frame f's subject the box (top, left, bottom, right) boxes[f]."""
    masks = torch.zeros(frames, side, side, dtype=torch.bool)
    for f, (top, left, bottom, right) in enumerate(boxes):
        masks[f, top:bottom, left:right] = True
    return masks.flatten(1)


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


BOXES = [(0, 0, 8, 8), (4, 6, 14, 16), (8, 2, 16, 10)]


def test_every_draw_inside_the_subject():
    masks = region_masks(3, 16, BOXES)
    idx = sample_masked_reference_indices(masks, 0.2, generator=gen())
    assert idx.shape == (3, round(0.2 * 256))  # S as unmasked sampling
    assert torch.equal(idx, idx.sort(dim=1).values)
    for f in range(3):
        assert masks[f, idx[f]].all()
        assert len(set(idx[f].tolist())) == idx.shape[1]  # without replacement


@pytest.mark.parametrize("share", [0.1, 0.25, 0.5, 1.0])
def test_background_share_exact(share):
    masks = region_masks(3, 16, BOXES)
    rate = 0.25
    idx = sample_masked_reference_indices(masks, rate, share, generator=gen(3))
    count = round(rate * 256)
    inside, outside = masked_sample_counts(256, rate, share)
    assert inside + outside == count == idx.shape[1]
    assert outside == round(share * count)
    for f in range(3):
        assert int((~masks[f, idx[f]]).sum()) == outside
        assert len(set(idx[f].tolist())) == count


def test_small_background_gives_its_draws_to_the_subject():
    masks = torch.ones(1, 100, dtype=torch.bool)
    masks[0, :3] = False  # 3 background tokens, share asks for 10 of 50
    idx = sample_masked_reference_indices(masks, 0.5, 0.2, generator=gen())
    assert int((~masks[0, idx[0]]).sum()) == 3 and len(set(idx[0].tolist())) == 50


def test_empty_or_small_mask_falls_back_to_uniform():
    masks = region_masks(2, 16, [(0, 0, 8, 8), (0, 0, 0, 0)])  # frame 1: empty
    masks_small = region_masks(2, 16, [(0, 0, 8, 8), (0, 0, 2, 2)])  # frame 1: 4 tokens < 51
    uniform = sample_reference_indices(2, 256, 0.2, generator=gen(5))
    for m in (masks, masks_small):
        idx = sample_masked_reference_indices(m, 0.2, generator=gen(5))
        assert torch.equal(idx[1], uniform[1])  # as the unmasked draw of the same generator
        assert m[0, idx[0]].all()


def test_all_true_mask_is_the_unmasked_draw():
    masks = torch.ones(4, 300, dtype=torch.bool)
    for rate in (0.0, 0.3, 1.0):
        expected = sample_reference_indices(4, 300, rate, generator=gen(11))
        assert torch.equal(sample_masked_reference_indices(masks, rate, generator=gen(11)), expected)


def test_seeded():
    masks = region_masks(3, 16, BOXES)
    a = sample_masked_reference_indices(masks, 0.3, 0.1, generator=gen(1))
    b = sample_masked_reference_indices(masks, 0.3, 0.1, generator=gen(1))
    c = sample_masked_reference_indices(masks, 0.3, 0.1, generator=gen(2))
    assert torch.equal(a, b) and not torch.equal(a, c)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"masks": torch.ones(2, 4)}, "bool"),
        ({"masks": torch.ones(4, dtype=torch.bool)}, "bool"),
        ({"rate": 1.5}, "rate"),
        ({"background_share": -0.1}, "background_share"),
    ],
)
def test_bad_arguments(kwargs, match):
    args = {"masks": torch.ones(2, 4, dtype=torch.bool), "rate": 0.5, "background_share": 0.0, **kwargs}
    with pytest.raises(ValueError, match=match):
        sample_masked_reference_indices(**args)
