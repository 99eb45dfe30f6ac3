"""The op reads ``ref_idx`` values (a host-device sync on CUDA) only for the public range check, and never
while tracing, on fake tensors, or from this library's processors. GPU-side proofs (sync debug mode, CUDA
graph replay) live in tests/ops/test_gpu.py's marked tests when a GPU is there."""

import pytest
import torch
from helpers import Case, make_inputs

import csa_kernels.api as api
from csa_kernels import consistent_attention


class ReadValues(Exception):
    pass


def test_range_check_reads_values_only_when_asked(monkeypatch):
    inputs = make_inputs(Case(4, 2, 16, 8, 4, groups=2, bank=3), torch.float32)
    expected = consistent_attention(**inputs, backend="torch")

    def no_reading(*args, **kwargs):
        raise ReadValues

    monkeypatch.setattr(torch.Tensor, "min", no_reading)
    monkeypatch.setattr(torch.Tensor, "max", no_reading)
    with pytest.raises(ReadValues):  # the default checks the range: it reads the values
        consistent_attention(**inputs, backend="torch")
    out = consistent_attention(**inputs, backend="torch", check_indices=False)
    torch.testing.assert_close(out, expected, rtol=0, atol=0)


def test_fake_tensors_skip_the_range_check():
    """Under FakeTensorMode the values do not exist: the call traces instead of failing on a read."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    inputs = make_inputs(Case(4, 2, 16, 8, 4, groups=2, window=1, bank=3), torch.float32)
    with FakeTensorMode() as mode:
        fake = {k: mode.from_tensor(v) if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}
        out = consistent_attention(**fake, backend="torch")
    assert out.shape == inputs["q"].shape


def test_the_processors_call_the_op_without_reading_indices(monkeypatch):
    """A UNet step with consistency on: every op call skips the range check (indices come from the
    seeded sampler), so a denoising step never waits for the GPU."""
    from storydiff.consistency.config import ConsistencyConfig
    from storydiff.families.attach import apply_consistent_attention, remove_consistent_attention
    from storydiff.families.tiny_models import build_tiny_pipeline

    calls = []
    check = api.check_inputs

    def spy(*args):
        calls.append((args[3].numel(), args[-1]))  # (ref_idx size, check_indices)
        return check(*args)

    monkeypatch.setattr(api, "check_inputs", spy)
    pipe = build_tiny_pipeline("tiny-sd15", progress_bar=False)
    state = apply_consistent_attention(
        pipe, ConsistencyConfig(rate=0.5, warmup_steps=0, skip_prob_early=0.0, skip_prob_late=0.0)
    )
    try:
        unet = pipe.unet
        gen = torch.Generator().manual_seed(0)
        sample = torch.randn(4, unet.config.in_channels, 16, 16, generator=gen)
        context = torch.randn(4, 7, unet.config.cross_attention_dim, generator=gen)
        state.begin_joint(2)  # 2 frames x CFG halves
        with torch.no_grad():
            unet(sample, 10, encoder_hidden_states=context)
    finally:
        state.end()
        remove_consistent_attention(pipe)
    assert calls and any(size for size, _ in calls)
    assert all(flag is False for _, flag in calls)
