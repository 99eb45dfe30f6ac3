"""The UNet suite's read cases: one frame denoised against the identity bank, for every provider."""

import pytest
import torch

from storydiff.benchmark import unet_suite
from storydiff.benchmark.unet_suite import PROVIDERS, UNetCase, run_unet_suite


def test_read_case_reads_each_providers_bank(monkeypatch):
    calls = []

    def once(fn, device):  # one step instead of timed repetitions
        calls.append(fn())
        return 1.0

    monkeypatch.setattr(unet_suite, "median_ms", once)
    case = UNetCase("tiny-64-read", 64, frames=2, phase="read")
    rows = run_unet_suite(
        [case], list(PROVIDERS), size="tiny", device=torch.device("cpu"), dtype=torch.float32, env={}
    )
    assert [row["status"] for row in rows] == ["ok"] * len(PROVIDERS), rows
    # a read step runs one frame under CFG: batch 2, whatever the number of identity frames
    assert all(out.sample.shape[0] == 2 for out in calls)
    a, b, ours = (row["bank_mib_per_step"] for row in rows)
    assert ours == pytest.approx(a, rel=1e-6) and b == pytest.approx(a / 2, rel=0.3)
    assert rows[2]["speedup_vs_official_a"] == pytest.approx(1.0)
