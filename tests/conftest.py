"""Shared test setup. Nothing here touches CUDA beyond asking whether it exists."""

import os

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    # Must be set before csa_kernels' Triton kernel module is imported: Triton decides at decoration time.
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def poisoned_outputs(monkeypatch):
    """Triton output buffers start as NaN, so an element the kernel never writes cannot pass."""
    import csa_kernels.triton_kernel as tk

    new_output = tk.new_output
    monkeypatch.setattr(tk, "new_output", lambda q: new_output(q).fill_(float("nan")))
