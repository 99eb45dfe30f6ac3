"""A whole UNet with consistent processors compiles with ``fullgraph=True``: no graph break and no host
sync anywhere on the denoising path (reading an index value or a tensor's data to decide something would
be a data-dependent break, which fullgraph turns into an error).

The processors normally run as eager islands in a compiled denoiser (``ConsistentAttnProcessor.__call__``
is ``torch.compiler.disable``d: their decisions depend on the step, so tracing them recompiles per step);
here their undecorated body is traced, which is what a CUDA-graph user with a fixed schedule would run.
The per-step draws become graph constants guarded by the step: a new step recompiles and draws anew.
"""

import pytest
import torch
from helpers import compile_test_unet

from storydiff.consistency.config import ConsistencyConfig
from storydiff.consistency.modes import JointMode
from storydiff.families.attach import ConsistentAttnProcessor, apply_consistent_attention


@pytest.mark.parametrize(
    "steps",
    [
        pytest.param((1,), id="one-step"),
        pytest.param((1, 2), marks=pytest.mark.slow, id="new-step-recompiles"),
    ],
)
def test_whole_unet_with_traced_processors_compiles_fullgraph(monkeypatch, steps):
    monkeypatch.setattr(ConsistentAttnProcessor, "__call__", ConsistentAttnProcessor.__call__.__wrapped__)
    unet = compile_test_unet()
    config = ConsistencyConfig(seed=1, rate=0.5, warmup_steps=0, skip_prob_early=0.0, skip_prob_late=0.0)
    state = apply_consistent_attention(unet, config)
    gen = torch.Generator().manual_seed(0)
    sample, context = torch.randn(4, 4, 8, 8, generator=gen), torch.randn(4, 7, 16, generator=gen)

    def write_then_read(model, step):
        state.bank.start("Bob")
        state.begin(JointMode(2, writing="Bob"), step=step)  # 2 frames x CFG
        with torch.no_grad():
            written = model(sample, 500, encoder_hidden_states=context).sample
            state.begin_read([("Bob",), ("Bob",)], step=step)
            read = model(sample, 500, encoder_hidden_states=context).sample
        return written, read

    compiled = torch.compile(unet, fullgraph=True, backend="aot_eager")
    for step in steps:  # a second step's draws differ: compiled again, not replayed
        eager = write_then_read(unet, step)
        traced = write_then_read(compiled, step)
        assert all(torch.equal(a, b) for a, b in zip(eager, traced, strict=True)), step
        assert not torch.equal(eager[0], eager[1])  # write and read differ: the bank was used
    if len(steps) > 1:
        assert not torch.equal(write_then_read(unet, 1)[1], write_then_read(unet, 2)[1])
