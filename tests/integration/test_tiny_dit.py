"""The offline tiny diffusion transformers (FLUX, SD3.5, PixArt-Σ): built in memory, seeded, runnable."""

import pytest
import torch

from storydiff.families.reserved import TINY_DIT
from storydiff.families.tiny_models import build_tiny_pipeline

CALL = {"height": 64, "width": 64, "num_inference_steps": 1, "max_sequence_length": 16, "output_type": "np"}


@pytest.mark.parametrize("name", TINY_DIT)
def test_tiny_dit_builds_offline_seeded_and_runs(name):
    a, b, c = (build_tiny_pipeline(name, seed=s, progress_bar=False) for s in (0, 0, 1))
    weights = [next(p.transformer.parameters()) for p in (a, b, c)]
    assert torch.equal(weights[0], weights[1]) and not torch.equal(weights[0], weights[2])
    extra = {"use_resolution_binning": False} if name == "tiny-pixart" else {}
    images = a(["a man walks", "a woman sings"], generator=torch.Generator().manual_seed(0), **CALL, **extra)
    assert images.images.shape == (2, 64, 64, 3)


def test_tiny_dit_structure():
    flux = build_tiny_pipeline("tiny-flux", progress_bar=False).transformer
    assert flux.config.guidance_embeds and len(flux.single_transformer_blocks) == 2
    sd3 = build_tiny_pipeline("tiny-sd3", progress_bar=False).transformer
    assert sd3.config.dual_attention_layers == (0,) and sd3.transformer_blocks[0].attn2 is not None
    pixart = build_tiny_pipeline("tiny-pixart", progress_bar=False).transformer
    assert all(name.endswith(("attn1.processor", "attn2.processor")) for name in pixart.attn_processors)
