"""The numbers of a story evaluation, computed from embeddings alone (no models, no files).

Identity consistency is the mean cosine similarity over every pair of frames that show one character, in
an image encoder's space (CLIP-I, DINO); prompt fidelity (CLIP-T) is the cosine similarity of a frame's
CLIP image embedding with its own text's CLIP text embedding. Everything is computed in float64, so the
encoders' float32 rounding is the only rounding that shows.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
import torch

__all__ = [
    "PairSummary",
    "block_mean_matrix",
    "consecutive_cosine",
    "cosine_matrix",
    "pair_values",
    "paired_cosine",
    "summarize_pairs",
]


def _unit_rows(embeddings: torch.Tensor | np.ndarray, name: str) -> np.ndarray:
    """(N, D) float64 rows scaled to length 1; ValueError for another shape or a zero row (no direction)."""
    if isinstance(embeddings, torch.Tensor):
        embeddings = embeddings.detach().to("cpu", torch.float64).numpy()
    rows = np.asarray(embeddings, dtype=np.float64)
    if rows.ndim != 2 or rows.shape[1] == 0:
        raise ValueError(f"{name}: expected a (frames, dim) array of embeddings, got shape {rows.shape}")
    norms = np.linalg.norm(rows, axis=1, keepdims=True)
    bad = np.flatnonzero(~np.isfinite(norms[:, 0]) | (norms[:, 0] == 0))
    if bad.size:
        raise ValueError(f"{name}: row {int(bad[0])} is zero or not finite; a cosine needs a direction")
    return rows / norms


def _cosine_of_units(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    # For unit vectors cos = 1 - |a - b|² / 2: a frame compared with an exact duplicate (or itself) scores
    # exactly 1, where a dot product of normalised rows can land an ulp below it.
    return np.clip(1.0 - 0.5 * np.sum((a - b) ** 2, axis=-1), -1.0, 1.0)


def cosine_matrix(embeddings: torch.Tensor | np.ndarray) -> np.ndarray:
    """(N, N) cosine similarities between the rows of ``embeddings`` (N, D); the diagonal is exactly 1.

    One row at a time (N · D memory, not N² · D), so a character seen in hundreds of frames still fits.
    """
    units = _unit_rows(embeddings, "embeddings")
    if not len(units):
        return np.zeros((0, 0))
    return np.stack([_cosine_of_units(units[i], units) for i in range(len(units))])


def paired_cosine(a: torch.Tensor | np.ndarray, b: torch.Tensor | np.ndarray) -> np.ndarray:
    """(N,) cosine similarity of row i of ``a`` with row i of ``b`` (CLIP-T: image i with text i)."""
    units_a, units_b = _unit_rows(a, "image embeddings"), _unit_rows(b, "text embeddings")
    if units_a.shape != units_b.shape:
        raise ValueError(f"paired embeddings must have one shape, got {units_a.shape} and {units_b.shape}")
    return _cosine_of_units(units_a, units_b)


def consecutive_cosine(embeddings: torch.Tensor | np.ndarray) -> np.ndarray:
    """(N - 1,) cosine similarity of row i with row i + 1 (a clip's frames in order: temporal stability)."""
    units = _unit_rows(embeddings, "embeddings")
    return _cosine_of_units(units[:-1], units[1:]) if len(units) > 1 else np.zeros(0)


def block_mean_matrix(embeddings: torch.Tensor | np.ndarray, sizes: list[int]) -> np.ndarray:
    """(G, G) similarities between G groups of consecutive rows of ``embeddings`` (group g has
    ``sizes[g]`` rows): entry (a, b) is the mean cosine over every pair of a row of group a and a row of
    group b (exact sums); the diagonal is 1, as in ``cosine_matrix``. A video story's shot-by-shot identity
    matrix: each shot is the group of its sampled frames."""
    if any(size < 1 for size in sizes) or sum(sizes) != len(embeddings):
        raise ValueError(f"group sizes {sizes} do not split {len(embeddings)} rows into non-empty groups")
    full = cosine_matrix(embeddings) if len(embeddings) else np.zeros((0, 0))
    edges = np.cumsum([0, *sizes])
    groups = len(sizes)
    matrix = np.ones((groups, groups))
    for a in range(groups):
        for b in range(a + 1, groups):
            block = full[edges[a] : edges[a + 1], edges[b] : edges[b + 1]]
            matrix[a, b] = matrix[b, a] = math.fsum(block.ravel().tolist()) / block.size
    return matrix


def pair_values(matrix: np.ndarray) -> np.ndarray:
    """The N(N-1)/2 off-diagonal entries above the diagonal of a symmetric (N, N) matrix: each pair once."""
    matrix = np.asarray(matrix, dtype=np.float64)
    if matrix.ndim != 2 or matrix.shape[0] != matrix.shape[1]:
        raise ValueError(f"expected a square similarity matrix, got shape {matrix.shape}")
    return matrix[np.triu_indices(len(matrix), k=1)]


@dataclass(frozen=True)
class PairSummary:
    """Pairwise similarities of one character's frames: ``pairs`` = N(N-1)/2; ``mean``, ``std``
    (population, so one pair has std 0) and ``min`` over those pairs; all three None with a ``reason``
    when there is no pair (a character in fewer than two frames)."""

    pairs: int
    mean: float | None
    std: float | None
    min: float | None
    reason: str | None = None

    def to_dict(self) -> dict:
        return asdict(self)


def summarize_pairs(matrix: np.ndarray) -> PairSummary:
    """Mean, std and min over the off-diagonal pairs of a similarity matrix.

    Sums are exact (``math.fsum``), so the summary does not depend on the order of the frames.
    """
    values = pair_values(matrix)
    if values.size == 0:
        frames = len(matrix)
        return PairSummary(
            0, None, None, None, f"{frames} frame{'' if frames == 1 else 's'}: no pair to compare"
        )
    mean = math.fsum(values.tolist()) / values.size
    std = math.sqrt(math.fsum(((values - mean) ** 2).tolist()) / values.size)
    return PairSummary(int(values.size), mean, std, float(values.min()))
