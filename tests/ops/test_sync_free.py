"""The op reads index values (a host-device sync on CUDA) only for the public range check, and never
while tracing, on fake tensors, or from this library's processors: a story's denoising step, in every mode,
reads no tensor value back on the host. GPU-side proofs (sync debug mode, CUDA graph replay) are
tests/pipeline/test_gpu_sync_free.py's, run when a GPU is there."""

import pytest
import torch
from helpers import Case, make_inputs
from host_reads import (
    BANK_CALLERS,
    NO_SKIP,
    RUN,
    STORY,
    STORY_SETUPS,
    guard_forward,
    load_tiny_ip_adapter,
    no_host_reads,
    report,
    story_pipeline,
)

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


# -- every mode, every family kind: a denoising step reads no value back on the host ----------------------


@pytest.fixture
def op_calls(monkeypatch):
    """Every op call as (caller "module:function", check_indices), the pool ranges in their device form.

    On a CPU run the torch path reads CPU ``pool_ranges`` on purpose (``_host_known``: no device, no sync);
    forcing the form it takes for device tensors makes the spy see exactly what a GPU step would read."""
    import sys

    import csa_kernels.torch_path as torch_path

    monkeypatch.setattr(torch_path, "_host_known", lambda ranges: False)
    calls = []
    check = api.check_inputs

    def spy(*args, **kwargs):  # check_indices: the last positional argument
        frame = sys._getframe(1)
        while frame.f_code.co_filename.endswith("api.py"):
            frame = frame.f_back
        calls.append((f"{frame.f_globals['__name__']}:{frame.f_code.co_name}", args[-1]))
        return check(*args, **kwargs)

    monkeypatch.setattr(api, "check_inputs", spy)
    return calls


def watched_story(sp, op_calls, **settings) -> set[str]:
    """Run a story with the denoiser's every call watched: no host read, no pageable index copy, every op
    call with check_indices=False; returns the op's callers (short module name:function)."""
    reads = []
    denoiser = sp.family.denoiser
    guard_forward(denoiser, reads)
    try:
        sp(STORY, **{**RUN, **settings})
    finally:
        del denoiser.forward
    assert not reads, report(reads)
    assert op_calls, "consistency never called the op"
    checking = sorted({caller for caller, check in op_calls if check is not False})
    assert not checking, f"call sites that let the op read index values: {checking}"
    return {caller.rsplit(".", 1)[-1] for caller, _ in op_calls}


@pytest.mark.parametrize(("model", "config", "settings", "callers"), STORY_SETUPS)
def test_a_story_step_reads_nothing_back_on_the_host(model, config, settings, callers, op_calls):
    """Every consistency mode on a UNet and on both kinds of DiT (FLUX's joint attention, Qwen-Image's
    padded prompts): while the denoiser runs, no tensor value comes back to Python and no host index goes
    to the device but pinned and non-blocking (on a GPU: no host sync), and every library call of the op
    says check_indices=False."""
    sp = story_pipeline(model, **config)
    try:
        assert watched_story(sp, op_calls, **settings) == callers
    finally:
        sp.close()


def test_ip_adapter_frames_read_nothing_back_on_the_host(op_calls, tmp_path):
    """Reference images per character (IP-Adapter, its masks per frame) on top of bank mode."""
    sp = story_pipeline("tiny-sd15")
    try:
        settings = load_tiny_ip_adapter(sp, tmp_path)
        assert watched_story(sp, op_calls, **settings) == BANK_CALLERS
    finally:
        sp.close()


def test_joint_mode_reads_nothing_back_on_the_host(op_calls):
    """A batch of frames attending to each other's sampled tokens, no bank (``begin_joint``): every op call
    skips the range check (the indices come from the seeded sampler) and reads nothing back."""
    from storydiff.consistency.config import ConsistencyConfig
    from storydiff.families.attach import apply_consistent_attention, remove_consistent_attention
    from storydiff.families.tiny_models import build_tiny_pipeline

    pipe = build_tiny_pipeline("tiny-sd15", progress_bar=False)
    state = apply_consistent_attention(pipe, ConsistencyConfig(rate=0.5, **NO_SKIP))
    unet, reads = pipe.unet, []
    gen = torch.Generator().manual_seed(0)
    sample = torch.randn(4, unet.config.in_channels, 16, 16, generator=gen)
    context = torch.randn(4, 7, unet.config.cross_attention_dim, generator=gen)
    try:
        state.begin_joint(2)  # 2 frames x CFG halves
        with torch.no_grad(), no_host_reads(reads):
            unet(sample, torch.tensor(10), encoder_hidden_states=context)
    finally:
        state.end()
        remove_consistent_attention(pipe)
    assert not reads, report(reads)
    assert {caller for caller, _ in op_calls} == {"storydiff.consistency.modes:attend"}
    assert all(check is False for _, check in op_calls)


# -- the one way indices reach a device, and the tiled form -----------------------------------------------


def test_host_indices_reach_a_gpu_pinned_and_non_blocking(monkeypatch):
    """``to_device_async`` (and ``index_tensor`` through it): a CPU tensor bound for CUDA is pinned and
    copied with non_blocking=True; anything else is a plain ``.to``. Checked without a GPU by recording the
    calls."""
    from csa_kernels.pool import index_tensor, to_device_async

    calls = []
    monkeypatch.setattr(torch.Tensor, "pin_memory", lambda self: calls.append("pin") or self)
    monkeypatch.setattr(
        torch.Tensor, "to", lambda self, device, **kw: calls.append((str(device), kw)) or self
    )
    host = torch.arange(3)
    to_device_async(host, torch.device("cuda"))
    assert calls == ["pin", ("cuda", {"non_blocking": True})]
    calls.clear()
    to_device_async(host, "cpu")
    assert calls == [("cpu", {})]
    monkeypatch.undo()
    table = index_tensor([(0, 1, 2, 3), (4, 5, 6, 7)], "cpu")
    assert table.dtype == torch.int64 and table.tolist() == [[0, 1, 2, 3], [4, 5, 6, 7]]


def test_the_tiled_form_passes_check_indices_on():
    """``tiled_consistent_attention(check_indices=False)`` reads nothing back on the host and gives what
    the checked call gives."""
    from csa_kernels.tiled import tiled_consistent_attention

    inputs = make_inputs(Case(6, 2, 16, 8, 4, groups=2), torch.float32)
    args = [inputs[name] for name in ("q", "k", "v", "ref_idx")]
    expected = tiled_consistent_attention(*args, tile=2, groups=2, backend="torch")
    reads = []
    with no_host_reads(reads):
        out = tiled_consistent_attention(*args, tile=2, groups=2, backend="torch", check_indices=False)
    assert not reads, report(reads)
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    with no_host_reads(reads):
        tiled_consistent_attention(*args, tile=2, groups=2, backend="torch")
    assert reads  # the default checks the range: it reads the values
