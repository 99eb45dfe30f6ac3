"""Timing and peak-memory measurement of one callable, GPU or CPU."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch


def median_ms(fn: Callable[[], object], device: torch.device, *, min_seconds: float = 0.5) -> float:
    """Median wall time of ``fn`` in milliseconds: triton.testing.do_bench on CUDA, repeated calls on CPU
    (and on CUDA without Triton, synchronizing around each call)."""
    if device.type == "cuda":
        try:
            from triton.testing import do_bench
        except ImportError:  # Triton is optional (Linux wheels only)
            pass
        else:
            return float(do_bench(fn, warmup=25, rep=100, return_mode="median"))

    def call() -> None:
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    call()  # warm-up
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < 3 or (time.perf_counter() - start < min_seconds and len(times) < 50):
        t0 = time.perf_counter()
        call()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def peak_extra_mib(fn: Callable[[], object], device: torch.device) -> float | None:
    """Device memory the call needs beyond what is already allocated (CUDA only; None on CPU)."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    torch.cuda.synchronize(device)
    return (torch.cuda.max_memory_allocated(device) - base) / 2**20
