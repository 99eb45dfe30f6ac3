"""The evaluation's numbers on hand-built embeddings, where the right answer can be worked out by hand."""

from __future__ import annotations

import itertools
import re

import numpy as np
import pytest
import torch

from storydiff.evaluation import cosine_matrix, pair_values, paired_cosine, summarize_pairs


def test_identical_frames_are_exactly_one():
    frame = torch.randn(1, 48, generator=torch.Generator().manual_seed(0))
    summary = summarize_pairs(cosine_matrix(frame.repeat(5, 1)))
    assert (summary.pairs, summary.mean, summary.std, summary.min, summary.reason) == (
        10,
        1.0,
        0.0,
        1.0,
        None,
    )


def test_an_orthogonal_frame_lowers_the_mean_by_the_pairs_it_breaks():
    # Four frames: 6 pairs. Replacing one frame by an orthogonal embedding turns its 3 pairs from 1 to 0,
    # so the mean drops from 1 to (6 - 3) / 6 = 0.5, std = 0.5 (three 1s, three 0s), min = 0.
    basis = np.eye(4)
    frames = np.stack([basis[0]] * 4)
    frames[2] = basis[1]
    summary = summarize_pairs(cosine_matrix(frames))
    assert (summary.pairs, summary.mean, summary.std, summary.min) == (6, 0.5, 0.5, 0.0)


@pytest.mark.parametrize("n", [2, 3, 7])
def test_an_unrelated_frame_in_high_dimension(n):
    # A random direction and one made orthogonal to it (Gram-Schmidt): of the n(n-1)/2 pairs, the n-1 with
    # the odd frame drop from 1 to 0, so the mean drops by (n-1) / (n(n-1)/2) = 2/n.
    rng = np.random.default_rng(n)
    frame, other = rng.normal(size=(2, 64))
    other -= (other @ frame) / (frame @ frame) * frame
    frames = np.stack([frame] * n)
    frames[n // 2] = other
    summary = summarize_pairs(cosine_matrix(frames))
    assert summary.mean == pytest.approx(1 - 2 / n, abs=1e-12)
    assert summary.min == pytest.approx(0.0, abs=1e-12)


def test_a_permutation_of_frames_leaves_the_summary_unchanged():
    embeddings = torch.randn(9, 32, generator=torch.Generator().manual_seed(1))
    order = torch.randperm(9, generator=torch.Generator().manual_seed(2))
    matrix, permuted = cosine_matrix(embeddings), cosine_matrix(embeddings[order])
    assert np.array_equal(permuted, matrix[np.ix_(order.numpy(), order.numpy())])
    assert summarize_pairs(permuted) == summarize_pairs(matrix)


def test_cosine_matrix_matches_torch_and_pairs_are_counted_once():
    embeddings = torch.randn(6, 20, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    expected = torch.nn.functional.cosine_similarity(embeddings[:, None], embeddings[None], dim=-1)
    matrix = cosine_matrix(embeddings)
    np.testing.assert_allclose(matrix, expected.numpy(), rtol=0, atol=1e-12)
    pairs = [matrix[i, j] for i, j in itertools.combinations(range(6), 2)]
    assert pair_values(matrix).tolist() == pairs


def test_one_frame_has_no_pair_and_says_so():
    summary = summarize_pairs(cosine_matrix(np.ones((1, 8))))
    assert (summary.pairs, summary.mean, summary.std, summary.min) == (0, None, None, None)
    assert "1 frame: no pair" in summary.reason


def test_paired_cosine_compares_row_i_with_row_i():
    images = np.array([[1.0, 0.0], [1.0, 1.0], [0.0, 2.0]])
    texts = np.array([[0.0, 3.0], [2.0, 2.0], [0.0, -1.0]])
    assert paired_cosine(images, texts).tolist() == [0.0, 1.0, -1.0]


@pytest.mark.parametrize(
    ("embeddings", "message"),
    [(np.ones(4), "expected a (frames, dim) array"), (np.array([[1.0, 0.0], [0.0, 0.0]]), "row 1 is zero")],
)
def test_bad_embeddings_are_a_clear_error(embeddings, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        cosine_matrix(embeddings)
