import pytest
import torch

from csa_kernels import sample_reference_indices


@pytest.mark.parametrize(
    ("frames", "tokens", "rate"), [(4, 1024, 0.5), (3, 63, 0.3), (2, 988, 0.7), (1, 5, 1.0)]
)
def test_shape_sorted_unique_in_range(frames, tokens, rate):
    idx = sample_reference_indices(frames, tokens, rate, generator=torch.Generator().manual_seed(0))
    assert idx.dtype == torch.int64 and idx.shape == (frames, round(rate * tokens))
    assert (idx[:, 1:] > idx[:, :-1]).all(), "rows must be sorted and without repeats"
    assert idx.min() >= 0 and idx.max() < tokens


def test_rate_zero_gives_empty_rows():
    assert sample_reference_indices(3, 100, 0.0).shape == (3, 0)


def test_rate_one_takes_every_token():
    assert torch.equal(sample_reference_indices(2, 9, 1.0), torch.arange(9).repeat(2, 1))


def test_seeded_generator_reproducible_and_frames_differ():
    a = sample_reference_indices(4, 256, 0.5, generator=torch.Generator().manual_seed(7))
    b = sample_reference_indices(4, 256, 0.5, generator=torch.Generator().manual_seed(7))
    c = sample_reference_indices(4, 256, 0.5, generator=torch.Generator().manual_seed(8))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert not torch.equal(a[0], a[1]), "frames draw independently"


def test_roughly_uniform():
    idx = sample_reference_indices(2000, 10, 0.3, generator=torch.Generator().manual_seed(0))
    counts = torch.bincount(idx.flatten(), minlength=10).float()
    expected = 2000 * 3 / 10
    assert ((counts - expected).abs() < 0.1 * expected).all(), counts


@pytest.mark.parametrize("rate", [-0.1, 1.5, float("nan"), "0.5"])
def test_rate_outside_unit_interval(rate):
    with pytest.raises(ValueError, match="rate"):
        sample_reference_indices(2, 10, rate)


@pytest.mark.parametrize(
    ("frames", "tokens", "name"), [(0, 10, "num_frames"), (2, 0, "num_tokens"), (2.0, 10, "num_frames")]
)
def test_bad_counts(frames, tokens, name):
    with pytest.raises(ValueError, match=name):
        sample_reference_indices(frames, tokens, 0.5)
