"""Masks from cross-attention: the logsumexp probability, Otsu's threshold, the recorder."""

from __future__ import annotations

import math

import pytest
import torch

from storydiff.consistency.cross_attention_masks import (
    SubjectAttentionRecorder,
    otsu_histogram_threshold,
    otsu_threshold,
    subject_probability,
    threshold_map,
)
from storydiff.consistency.subject_masks import level_grid, resize_mask


def full_softmax_reference(q, k, columns, scale, bias=None) -> torch.Tensor:
    """float64: softmax over every key, summed over the subject columns. columns (B, C, L)."""
    scores = (q.double() @ k.double().transpose(-1, -2)) * scale
    if bias is not None:
        scores = scores + bias.double()
    prob = scores.softmax(dim=-1)  # [B, H, N, L]
    return torch.einsum("bhnl,bcl->bchn", prob, columns.double())


@pytest.mark.parametrize("block", [1, 5, 256], ids=lambda b: f"block{b}")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_logsumexp_equals_full_softmax(block, dtype):
    gen = torch.Generator().manual_seed(0)
    B, H, N, L, D = 3, 2, 37, 13, 8
    q = torch.randn(B, H, N, D, generator=gen, dtype=dtype) * 2
    k = torch.randn(B, H, L, D, generator=gen, dtype=dtype) * 2
    columns = torch.zeros(B, 2, L, dtype=torch.bool)
    columns[0, 0, [2, 3]] = True
    columns[0, 1, [7]] = True
    columns[1, 0, [0, 12]] = True  # row 1: second character absent (all False)
    columns[2, :, 5:9] = True
    got = subject_probability(q, k, columns, block=block)
    expected = full_softmax_reference(q, k, columns, D**-0.5)
    tol = 1e-12 if dtype == torch.float64 else 2e-6
    torch.testing.assert_close(got.double(), expected, atol=tol, rtol=tol)
    assert (got[1, 1] == 0).all()
    # (B, L) columns: one character; a scale and an additive mask as the host's softmax uses them
    bias = torch.zeros(B, 1, 1, L, dtype=dtype)
    bias[:, :, :, 10:] = -math.inf  # padding keys left out of the softmax
    single = subject_probability(q, k, columns[:, 0], scale=0.3, bias=bias, block=block)
    expected = full_softmax_reference(q, k, columns[:, :1], 0.3, bias)[:, 0]
    torch.testing.assert_close(single.double(), expected, atol=tol, rtol=tol)
    as_bool = subject_probability(q, k, columns[:, 0], scale=0.3, bias=bias == 0, block=block)
    torch.testing.assert_close(as_bool, single)


def test_not_a_softmax_over_the_subject_columns_alone():
    q = torch.randn(1, 1, 4, 8)
    k = torch.randn(1, 1, 6, 8)
    columns = torch.zeros(1, 6, dtype=torch.bool)
    columns[0, 2] = True
    prob = subject_probability(q, k, columns)
    assert (prob < 1).all() and (prob > 0).all()  # alone, one column would always get probability 1


def between_class_variance(counts: list[float], split: int) -> float:
    """By the definition: bins [0, split] against (split, end]."""
    total = sum(counts)
    w0 = sum(counts[: split + 1]) / total
    w1 = 1 - w0
    if w0 == 0 or w1 == 0:
        return -1.0
    m0 = sum(i * c for i, c in enumerate(counts[: split + 1])) / (w0 * total)
    m1 = sum(i * c for i, c in enumerate(counts[split + 1 :], start=split + 1)) / (w1 * total)
    return w0 * w1 * (m0 - m1) ** 2


def test_otsu_on_constructed_histograms():
    two_spikes = torch.zeros(256)
    two_spikes[10], two_spikes[200] = 30, 70
    # every split between the spikes ties: the middle of them, halfway between the modes
    assert otsu_histogram_threshold(two_spikes) == (10 + 199) / 2 + 1
    three = torch.tensor([0, 10, 0, 0, 10, 0, 0, 0, 0, 0, 0, 80.0])  # 1 and 4 against 11
    assert otsu_histogram_threshold(three) == (4 + 10) / 2 + 1
    gen = torch.Generator().manual_seed(1)
    for _ in range(5):
        counts = torch.randint(0, 20, (32,), generator=gen).float()
        split = otsu_histogram_threshold(counts)
        values = [between_class_variance(counts.tolist(), t) for t in range(31)]
        # the split's last class-0 bin (the middle of a tie) maximises the between-class variance
        assert values[math.floor(split - 1)] == pytest.approx(max(values))
    assert otsu_histogram_threshold(torch.tensor([0.0, 5.0, 0.0])) == 3  # one value: nothing to split


def test_otsu_threshold_of_values():
    gen = torch.Generator().manual_seed(2)
    low = torch.rand(300, generator=gen) * 0.2
    high = 0.7 + torch.rand(100, generator=gen) * 0.3
    t = otsu_threshold(torch.cat([low, high]))
    assert 0.2 <= t <= 0.7
    t = otsu_threshold(torch.tensor([2.0, 2.1, 9.0, 9.5]), value_range=(0.0, 10.0))
    assert 2.1 < t < 9.0


def test_threshold_map():
    subject_map = torch.full((8, 8), 0.05)
    subject_map[2:6, 1:5] = 0.6
    subject_map[3, 3] = 0.9
    subject_map[0, 7] = 0.12  # noise
    mask = threshold_map(subject_map)
    expected = torch.zeros(8, 8, dtype=torch.bool)
    expected[2:6, 1:5] = True
    assert torch.equal(mask, expected)
    assert not threshold_map(torch.full((4, 4), 0.3)).any()  # flat: nothing stands out


def iou(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a & b).sum()) / max(float((a | b).sum()), 1.0)


def region(size, top, left, bottom, right) -> torch.Tensor:
    mask = torch.zeros(size, dtype=torch.bool)
    mask[top:bottom, left:right] = True
    return mask


def constructed_attention(region_mask: torch.Tensor, heads: int, length: int, cols: list[int], gen):
    """(H, N, D) queries and (H, L, D) keys: queries in the region score high on the subject columns."""
    dim = 16
    direction = torch.randn(heads, 1, dim, generator=gen)
    direction = direction / direction.norm(dim=-1, keepdim=True)
    inside = region_mask.flatten().float()[None, :, None] * 2 - 1  # +1 in the region, -1 outside
    q = torch.randn(heads, region_mask.numel(), dim, generator=gen) * 0.3 + 3 * inside * direction
    k = torch.randn(heads, length, dim, generator=gen) * 0.3
    k[:, cols] = 3 * direction
    return q, k


def test_recorder_recovers_known_regions_at_every_level():
    size = (128, 128)  # level 16: 8x8, the recorded grid
    recorder = SubjectAttentionRecorder(size)
    assert recorder.grid == (8, 8)
    gen = torch.Generator().manual_seed(4)
    regions = {
        (0, "Bob"): region((8, 8), 0, 0, 4, 4),
        (1, "Alice"): region((8, 8), 4, 2, 8, 8),
        (2, "Bob"): region((8, 8), 0, 4, 4, 8),
        (2, "Alice"): region((8, 8), 4, 0, 8, 4),
    }
    subjects = [{"Bob": [1, 2]}, {"Alice": [4]}, {"Bob": [1], "Alice": [5, 6]}]
    recorder.set_batch([0, 1, 2], subjects)
    length, heads = 12, 2
    for _layer in range(3):
        qs, ks = [], []
        for frame, per_character in enumerate(subjects):
            q = torch.zeros(heads, 64, 16)
            k = torch.randn(heads, length, 16, generator=gen) * 0.3
            for character, cols in per_character.items():
                q_c, k_c = constructed_attention(regions[(frame, character)], heads, length, cols, gen)
                q += q_c
                k[:, cols] = k_c[:, cols]
            qs.append(q)
            ks.append(k)
        q, k = torch.stack(qs), torch.stack(ks)
        noise = torch.randn_like(q)  # the unconditional half of a CFG batch: not recorded
        assert recorder.record(torch.cat([noise, q]), torch.cat([torch.randn_like(k), k]))
    assert not recorder.record(torch.randn(3, 2, 256, 16), torch.randn(3, 2, length, 16))  # level 8: ignored
    masks = recorder.masks([("Bob",), ("Alice",), ("Bob", "Alice"), ()])
    for level in (8, 16, 32):
        grid = level_grid(size, level)
        for (frame, character), known in regions.items():
            got = masks.mask(frame, character, grid)
            assert iou(got, resize_mask(known, grid)) >= 0.9, (level, frame, character)
    with pytest.raises(ValueError, match="frame 3: no cross-attention recorded for Carol"):
        recorder.masks([("Bob",), ("Alice",), ("Bob", "Alice"), ("Carol",)])


def test_recorder_errors_and_pause():
    recorder = SubjectAttentionRecorder((64, 64))  # level 16: 4x4
    with pytest.raises(ValueError, match="2 frames but subject tokens for 1"):
        recorder.set_batch([0, 1], [{"Bob": [1]}])
    with pytest.raises(ValueError, match=r"frame 0 \(Bob\): no subject token columns"):
        recorder.set_batch([0], [{"Bob": []}])
    recorder.set_batch([0, 1], [{"Bob": [1]}, {"Bob": [9]}])
    with pytest.raises(RuntimeError, match="not a multiple of the 2 frames"):
        recorder.record(torch.randn(3, 1, 16, 4), torch.randn(3, 1, 8, 4))
    with pytest.raises(ValueError, match=r"frame 1 \(Bob\): subject column 9 past the 8 text keys"):
        recorder.record(torch.randn(2, 1, 16, 4), torch.randn(2, 1, 8, 4))
    recorder.active = False
    assert not recorder.record(torch.randn(2, 1, 16, 4), torch.randn(2, 1, 8, 4))
    assert recorder.maps() == {}
