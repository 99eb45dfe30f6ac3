"""On a CUDA GPU: a denoising step with consistency on never synchronizes the host — in every mode and
family kind tests/ops/test_sync_free.py's CPU spy covers (its setups, ``host_reads.STORY_SETUPS``), under
``torch.cuda.set_sync_debug_mode("error")`` — and the op replays inside a CUDA graph. Skipped without
CUDA (conftest.py); run on the GPU machine with `pytest -m gpu`."""

import contextlib

import pytest
import torch
from helpers import Case, make_inputs
from host_reads import RUN, STORY, STORY_SETUPS, load_tiny_ip_adapter, story_pipeline

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


@contextlib.contextmanager
def syncs_are_errors():
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode("default")


def story_never_syncs(sp, **settings) -> None:
    """Run the story twice: once to warm up (autotuning, allocations, per-device caches), then with every
    denoiser call (each step, CFG pass or chunk) under sync debug mode "error": a host sync raises."""
    sp(STORY, **{**RUN, **settings})
    for name in ("Bob", "Alice"):  # a kept bank would be read, not written, by the watched story
        if sp.state.bank.has(name):
            sp.state.bank.clear(name)
    torch.cuda.synchronize()
    denoiser = sp.family.denoiser
    forward = denoiser.forward

    def watched(*args, **kwargs):
        with syncs_are_errors():
            return forward(*args, **kwargs)

    denoiser.forward = watched
    try:
        sp(STORY, **{**RUN, **settings, "seed": RUN["seed"] + 1})  # fresh draws reach the GPU too
    finally:
        del denoiser.forward


@pytest.mark.parametrize(("model", "config", "settings", "callers"), STORY_SETUPS)
def test_a_story_never_syncs_the_host(model, config, settings, callers):
    """Bank mode (both schedules), window mode, the tiled form, FLUX and Qwen-Image (key lengths, two-pass
    CFG), in half precision on the Triton kernel (bfloat16 for the DiTs, as they are run)."""
    dtype = torch.float16 if model in ("tiny-sd15", "tiny-sdxl") else torch.bfloat16
    sp = story_pipeline(model, device="cuda", dtype=dtype, **config)
    try:
        story_never_syncs(sp, **settings)
    finally:
        sp.close()


def test_ip_adapter_frames_never_sync_the_host(tmp_path):
    sp = story_pipeline("tiny-sd15", device="cuda", dtype=torch.float16)
    try:
        story_never_syncs(sp, **load_tiny_ip_adapter(sp, tmp_path))
    finally:
        sp.close()
