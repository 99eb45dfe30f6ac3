"""Bounded attention in window mode (consistency/window.py): a frame showing Alice (left) and Bob (right)
reads its story neighbours' sampled tokens through the pool; with bounds, Alice's rows read only Alice's
pool tokens — changing the Bob-only neighbour leaves Alice's and the background rows bit-identical and
moves Bob's — across chunks too (the later chunk reads the earlier one's tokens from the boundary cache)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from storydiff import ConsistencyConfig
from storydiff.consistency.subject_masks import SubjectMasks
from storydiff.consistency.window import WindowMode
from storydiff.families.attach import apply_consistent_attention, remove_consistent_attention
from storydiff.families.tiny_models import build_tiny_pipeline

FRAME_CHARACTERS = [("Alice",), ("Alice", "Bob"), ("Bob",)]
SIDE = 64
NO_SKIP = {"warmup_steps": 0, "skip_prob_early": 0.0, "skip_prob_late": 0.0}


def masks() -> SubjectMasks:
    left = np.zeros((SIDE, SIDE), dtype=bool)
    left[:, : SIDE // 2] = True
    side = {"Alice": left, "Bob": ~left}
    given = {f: {c: side[c] for c in chars} for f, chars in enumerate(FRAME_CHARACTERS)}
    return SubjectMasks.from_mapping(given, FRAME_CHARACTERS, (SIDE, SIDE))


@pytest.fixture(scope="module")
def pipe():
    return build_tiny_pipeline("tiny-sd15", progress_bar=False)


def shared_rows(pipe, bounded: bool, bob_seed: int, chunks) -> tuple[torch.Tensor, torch.Tensor]:
    """Frame 1's attention output (every frame in its chunk), and its token segments."""
    state = apply_consistent_attention(pipe, ConsistencyConfig(rate=0.5, seed=1, window=1, **NO_SKIP))
    try:
        state.set_subject_masks(masks(), bounded=bounded)
        layer = min(state.layers, key=lambda layer: layer.level)
        attn = pipe.unet.get_submodule(layer.name.removesuffix(".processor"))
        tokens = (SIDE // layer.level) ** 2
        gen = [torch.Generator().manual_seed(s) for s in (0, 1, bob_seed)]
        hidden = torch.stack([torch.randn(tokens, attn.to_q.in_features, generator=g) for g in gen])
        mode = WindowMode([True] * 3, window=1)
        state.begin(mode)
        out = {}
        with torch.no_grad():
            for start, stop in chunks:
                mode.begin_chunk(start, stop)
                result = attn(hidden[start:stop])
                for frame in range(start, stop):
                    out[frame] = result[frame - start]
                mode.end_chunk()
        segments = state.segments([1], (0, tokens), tokens, torch.device("cpu"))[0]
    finally:
        state.end()
        remove_consistent_attention(pipe)
    return out[1], segments


@pytest.mark.parametrize("chunks", [[(0, 3)], [(0, 1), (1, 3)]], ids=["one-chunk", "across-chunks"])
@pytest.mark.parametrize("bounded", [True, False])
def test_bounded_window_rows_see_only_their_own_character(pipe, bounded, chunks):
    before, segments = shared_rows(pipe, bounded, bob_seed=2, chunks=chunks)
    after, _ = shared_rows(pipe, bounded, bob_seed=3, chunks=chunks)  # another Bob-only frame 2
    alice, bob = segments == 1, segments == 2
    assert alice.any() and bob.any() and not (alice & bob).any()
    assert not torch.equal(before[bob], after[bob])
    if bounded:
        assert torch.equal(before[alice], after[alice])
    else:
        assert not torch.equal(before[alice], after[alice])
