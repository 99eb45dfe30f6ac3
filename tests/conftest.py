"""Shared test setup. Nothing here touches CUDA beyond asking whether it exists."""

import os

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    # Must be set before csa_kernels' Triton kernel module is imported: Triton decides at decoration time.
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_configure(config):
    # One intra-op thread: the tests run thousands of tiny-model ops, where a second thread costs more than
    # it gives (measured on a 2-core machine: test_cli_generate + test_ip_adapter in 70 s with one thread,
    # 79 s with two), and a busy machine can stall a multi-threaded op on a descheduled worker (20x slower).
    torch.set_num_threads(1)
    # and the same in the processes tests start (CLI runs killed and resumed in-process): a CPU kernel's
    # summation order depends on the thread count, and those tests compare frames bit for bit
    os.environ["OMP_NUM_THREADS"] = "1"


def pytest_addoption(parser):
    parser.addoption("--run-slow", action="store_true", help="also run tests marked slow (minutes each)")


def pytest_collection_modifyitems(config, items):
    skip_slow = pytest.mark.skip(reason="slow: run with --run-slow")
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if item.get_closest_marker("slow") and not config.getoption("--run-slow"):
            item.add_marker(skip_slow)
        if item.get_closest_marker("gpu") and not HAS_CUDA:
            item.add_marker(skip_gpu)


@pytest.fixture
def poisoned_outputs(monkeypatch):
    """Triton output buffers start as NaN, so an element the kernel never writes cannot pass."""
    import csa_kernels.triton_kernel as tk

    new_output = tk.new_output
    monkeypatch.setattr(tk, "new_output", lambda q: new_output(q).fill_(float("nan")))
