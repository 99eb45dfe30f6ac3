"""What 12–16 GB users combine consistent attention with: model CPU offload, VAE slicing and tiling, and
torch.compile of the denoiser — each gives the frames it gives without it (CPU, tiny models)."""

import numpy as np
import pytest
import torch
from helpers import compile_test_unet

from storydiff.consistency.config import ConsistencyConfig
from storydiff.consistency.modes import JointMode
from storydiff.families.attach import apply_consistent_attention
from storydiff.families.tiny_models import build_tiny_pipeline
from storydiff.pipeline import StoryDiffusionPipeline

STORY = """\
[Bob] a man with red hair
[Alice] a woman in a yellow dress
---
[Bob] walks in the park
[Alice] waters the flowers
[Bob] and [Alice] have dinner
[NC] a quiet street
[Bob] reads a newspaper
"""
NO_SKIP = {"warmup_steps": 1, "skip_prob_early": 0.0, "skip_prob_late": 0.0}


def frames(pipe, **settings):
    sp = StoryDiffusionPipeline(pipe, ConsistencyConfig(seed=1, **NO_SKIP))
    try:
        result = sp(STORY, num_inference_steps=3, id_frames=1, progress=False, **settings)
    finally:
        sp.close()
    return np.stack([np.asarray(image, dtype=np.int16) for image in result.images])


@pytest.fixture(scope="module")
def plain():
    return frames(build_tiny_pipeline("tiny-sd15", progress_bar=False))


def test_model_cpu_offload_gives_the_same_frames(plain):
    pytest.importorskip("accelerate")  # diffusers' offload hooks come from accelerate (the [dev] extra)
    pipe = build_tiny_pipeline("tiny-sd15", progress_bar=False)
    pipe.enable_model_cpu_offload(device="cpu")  # hooks move each model to the device as it runs
    assert hasattr(pipe.unet, "_hf_hook")
    assert np.array_equal(frames(pipe), plain)


def test_vae_slicing_and_tiling(plain):
    pipe = build_tiny_pipeline("tiny-sd15", progress_bar=False)
    pipe.vae.enable_slicing()
    pipe.vae.enable_tiling()  # frames fit in one tile at this size: nothing to blend
    assert np.array_equal(frames(pipe), plain)
    # forced small tiles: decoding really goes through them, and blending changes pixels only a little
    pipe.vae.tile_sample_min_size, pipe.vae.tile_latent_min_size = 64, 8
    tiled = []
    tiled_decode = pipe.vae.tiled_decode
    pipe.vae.tiled_decode = lambda *a, **k: tiled.append(1) or tiled_decode(*a, **k)
    tiles = frames(pipe)
    assert len(tiled) == len(plain)
    assert 0 < np.abs(tiles - plain).mean() < 8


@pytest.mark.slow  # ~17 s of CPU compile; the op's own fullgraph compile runs by default (tests/ops)
def test_compiled_denoiser_with_our_processors_matches_eager():
    """torch.compile (aot_eager on CPU) of a denoiser with consistent processors installed: the same
    outputs in write and read mode. The processors run eagerly inside the compiled module."""
    unet = compile_test_unet()
    state = apply_consistent_attention(unet, ConsistencyConfig(seed=1, **{**NO_SKIP, "warmup_steps": 0}))
    gen = torch.Generator().manual_seed(0)
    sample, context = torch.randn(4, 4, 8, 8, generator=gen), torch.randn(4, 7, 16, generator=gen)

    def write_then_read(model):
        state.bank.start("Bob")
        state.begin(JointMode(2, writing="Bob"), step=1)  # 2 frames x CFG
        with torch.no_grad():
            written = model(sample, 500, encoder_hidden_states=context).sample
            state.begin_read([("Bob",), ("Bob",)], step=1)
            read = model(sample, 500, encoder_hidden_states=context).sample
        return written, read

    eager = write_then_read(unet)
    compiled = write_then_read(torch.compile(unet, backend="aot_eager"))
    assert all(torch.equal(a, b) for a, b in zip(eager, compiled, strict=True))
    assert not torch.equal(eager[0], eager[1])  # write and read differ: the bank was used
