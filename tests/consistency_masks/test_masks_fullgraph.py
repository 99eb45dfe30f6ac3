"""Masked draws inside a traced processor: a whole UNet with subject masks compiles with ``fullgraph=True``
(the draws, the mask lookup and the small-mask warning run at trace time; the result is a graph constant),
and computes what the eager UNet computes (as ``tests/integration/test_fullgraph.py`` without masks)."""

import pytest
import torch
from helpers import compile_test_unet

from storydiff.consistency.config import ConsistencyConfig
from storydiff.consistency.subject_masks import SubjectMasks
from storydiff.families.attach import ConsistentAttnProcessor, apply_consistent_attention


def test_masked_unet_compiles_fullgraph(monkeypatch):
    monkeypatch.setattr(ConsistentAttnProcessor, "__call__", ConsistentAttnProcessor.__call__.__wrapped__)
    unet = compile_test_unet()  # one consistent level: 8x8 tokens of a 64x64 image
    config = ConsistencyConfig(seed=1, rate=0.5, warmup_steps=0, skip_prob_early=0.0, skip_prob_late=0.0)
    state = apply_consistent_attention(unet, config)
    top = torch.zeros(64, 64, dtype=torch.bool)
    top[:32] = True
    masks = SubjectMasks(
        {0: {"Bob": top}, 1: {"Bob": torch.zeros(64, 64, dtype=torch.bool)}}, [("Bob",)] * 2, (64, 64)
    )
    gen = torch.Generator().manual_seed(0)
    sample, context = torch.randn(4, 4, 8, 8, generator=gen), torch.randn(4, 7, 16, generator=gen)

    def run(model, subject_masks=masks):
        state.set_subject_masks(subject_masks)
        state.begin_joint(2, frames=[0, 1])
        with torch.no_grad():
            return model(sample, 500, encoder_hidden_states=context).sample

    with pytest.warns(UserWarning, match=r"frame 1 \(Bob\): its subject mask holds 0"):
        eager = run(unet)
    compiled = torch.compile(unet, fullgraph=True, backend="aot_eager")
    with pytest.warns(UserWarning, match=r"frame 1 \(Bob\)"):
        traced = run(compiled)
    assert torch.equal(eager, traced)
    assert not torch.equal(eager, run(unet, None))  # the masks changed what frame 0 offers
