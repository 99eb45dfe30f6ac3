"""On a CUDA GPU: a denoising step with consistency on never synchronizes the host, and the op replays
inside a CUDA graph. Skipped without CUDA (conftest.py); run on the GPU machine with `pytest -m gpu`."""

import pytest
import torch
from helpers import Case, make_inputs

from csa_kernels import consistent_attention

pytestmark = pytest.mark.gpu


def test_a_denoising_step_never_syncs_the_host():
    from storydiff.consistency.config import ConsistencyConfig
    from storydiff.families.attach import apply_consistent_attention, remove_consistent_attention
    from storydiff.families.tiny_models import build_tiny_pipeline

    pipe = build_tiny_pipeline("tiny-sd15", dtype=torch.float16, progress_bar=False, device="cuda")
    config = ConsistencyConfig(rate=0.5, warmup_steps=0, skip_prob_early=0.0, skip_prob_late=0.0)
    state = apply_consistent_attention(pipe, config)
    unet = pipe.unet
    gen = torch.Generator(device="cuda").manual_seed(0)
    sample = torch.randn(
        4, unet.config.in_channels, 16, 16, generator=gen, device="cuda", dtype=torch.float16
    )
    context = torch.randn(4, 7, unet.config.cross_attention_dim, generator=gen, device="cuda").half()
    timestep = torch.tensor(10, device="cuda")
    try:
        state.begin_joint(2)
        with torch.no_grad():
            unet(sample, timestep, encoder_hidden_states=context)  # first call: allocations, autotuning
            state.set_step(1)  # fresh draws: they must reach the GPU without a sync too
            torch.cuda.synchronize()
            torch.cuda.set_sync_debug_mode("error")
            try:
                unet(sample, timestep, encoder_hidden_states=context)
            finally:
                torch.cuda.set_sync_debug_mode("default")
    finally:
        state.end()
        remove_consistent_attention(pipe)


def test_the_op_replays_in_a_cuda_graph():
    inputs = make_inputs(Case(8, 10, 1024, 64, 512, groups=2, bank=64), torch.float16, device="cuda")
    expected = consistent_attention(**inputs)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up on a side stream, as CUDA graph capture wants
        consistent_attention(**inputs)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):  # the range check is skipped during capture
        out = consistent_attention(**inputs)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, expected)
