"""MemorySampler and its plots, on the CPU: host-RSS sampling, NVML degradation, error hand-off, PNGs.

The NVML path is exercised with fakes for pynvml and torch.cuda, since these machines have neither a GPU
nor the NVML library; the fakes check that init/shutdown stay paired and that a fallback never touches CUDA.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pynvml
import pytest
import torch

from storydiff.benchmark import memory
from storydiff.benchmark.memory import (
    MemorySampler,
    Sample,
    memory_timeline_figure,
    peak_vs_length_figure,
    plot_memory_timeline,
    plot_peak_vs_length,
)

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
MB = 10**6
CUDA_FUNCS = (
    "is_available",
    "current_device",
    "get_device_properties",
    "memory_allocated",
    "memory_reserved",
    "max_memory_allocated",
    "reset_peak_memory_stats",
    "synchronize",
)


def wait_until(condition: Callable[[], bool], timeout_s: float = 3.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.002)
    return condition()


def counter(counts: dict[str, int], key: str) -> Callable[..., None]:
    def bump(*args: object) -> None:
        counts[key] += 1

    return bump


def sampler_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "memory-sampler"]


def assert_png(path: Path) -> None:
    data = path.read_bytes()
    assert len(data) > len(PNG_SIGNATURE)
    assert data.startswith(PNG_SIGNATURE)


@pytest.fixture
def no_cuda(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Every torch.cuda call used by the sampler fails the test (in the thread, that surfaces at stop())."""
    calls: list[str] = []

    def forbidden(name: str) -> Callable[..., object]:
        def call(*args: object, **kwargs: object) -> object:
            calls.append(name)
            raise AssertionError(f"torch.cuda.{name} called after falling back to host memory")

        return call

    for name in CUDA_FUNCS:
        monkeypatch.setattr(torch.cuda, name, forbidden(name))
    return calls


def test_host_rss_sampling_sees_allocation() -> None:
    with MemorySampler(device=torch.device("cpu"), interval_s=0.005) as sampler:
        assert sampler.running
        assert len(sampler.samples) >= 1  # start() returns only after the first sample
        baseline = sampler.samples[0].used_bytes
        sampler.mark("alloc")
        buffer = np.ones(200 * MB, dtype=np.uint8)  # np.ones writes every page, so RSS really grows
        risen = wait_until(lambda: sampler.samples[-1].used_bytes >= baseline + 150 * MB)
        sampler.mark("free")
        del buffer
        n = len(sampler.samples)
        wait_until(lambda: len(sampler.samples) > n)
    assert risen, "RSS did not rise by 150 MB after touching a 200 MB buffer"
    assert not sampler.running
    assert not sampler_threads()
    samples = sampler.samples
    assert len(samples) >= 3
    assert sampler.source == "host-rss"
    assert "cpu" in sampler.note
    assert sampler.torch_peak_bytes is None
    assert all(s.torch_allocated is None and s.torch_reserved is None for s in samples)
    ts = [s.t for s in samples]
    assert ts == sorted(ts)
    assert [label for _, label in sampler.marks] == ["alloc", "free"]
    assert all(0.0 <= t <= samples[-1].t for t, _ in sampler.marks)
    assert sampler.peak_bytes is not None
    assert all(sampler.peak_bytes >= s.used_bytes for s in samples)
    assert sampler.peak_bytes >= baseline + 150 * MB

    sampler.stop()  # idempotent: no error, no new sample
    sampler.stop()
    assert len(sampler.samples) == len(samples)
    with pytest.raises(RuntimeError, match="already started"):
        sampler.start()
    with pytest.raises(RuntimeError, match="running"):
        sampler.mark("late")


def test_stop_is_prompt_with_long_interval() -> None:
    sampler = MemorySampler(device="cpu", interval_s=60.0).start()
    t0 = time.perf_counter()
    sampler.stop()
    assert time.perf_counter() - t0 < 1.0  # Event.wait wakes at once, no waiting out the interval
    assert len(sampler.samples) == 2  # first at start, last at stop


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="interval_s"):
        MemorySampler(device="cpu", interval_s=0)
    with pytest.raises(RuntimeError, match="running"):
        MemorySampler(device="cpu").mark("too early")


@pytest.mark.parametrize(
    "error",
    [pynvml.NVMLError_LibraryNotFound, lambda: pynvml.NVMLError(pynvml.NVML_ERROR_LIBRARY_NOT_FOUND)],
    ids=["subclass", "generic-with-code"],
)
def test_nvml_missing_falls_back_to_host_rss(
    monkeypatch: pytest.MonkeyPatch, no_cuda: list[str], error: Callable[[], Exception]
) -> None:
    shutdowns: list[int] = []

    def init() -> None:
        raise error()

    monkeypatch.setattr(pynvml, "nvmlInit", init)
    monkeypatch.setattr(pynvml, "nvmlShutdown", lambda: shutdowns.append(1))
    with MemorySampler(device=torch.device("cuda"), interval_s=0.005) as sampler:
        wait_until(lambda: len(sampler.samples) >= 2)
        sampler.mark("work")
    assert sampler.source == "host-rss"
    assert "NVML unavailable (NVMLError_LibraryNotFound)" in sampler.note
    assert "host memory" in sampler.note
    assert no_cuda == []
    assert shutdowns == []  # init failed, so nothing to shut down
    assert sampler.torch_peak_bytes is None
    assert len(sampler.samples) >= 3
    assert all(s.used_bytes > 0 and s.torch_allocated is None for s in sampler.samples)


def test_nvml_without_gpu_falls_back_and_shuts_down(monkeypatch: pytest.MonkeyPatch) -> None:
    counts = {"init": 0, "shutdown": 0}

    def no_device(*args: object) -> object:
        raise pynvml.NVMLError(pynvml.NVML_ERROR_INVALID_ARGUMENT)

    monkeypatch.setattr(pynvml, "nvmlInit", counter(counts, "init"))
    monkeypatch.setattr(pynvml, "nvmlShutdown", counter(counts, "shutdown"))
    monkeypatch.setattr(pynvml, "nvmlDeviceGetHandleByUUID", no_device)
    monkeypatch.setattr(pynvml, "nvmlDeviceGetHandleByIndex", no_device)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i: SimpleNamespace(uuid="abcd"))
    with MemorySampler(device=torch.device("cuda", 3), interval_s=0.005) as sampler:
        pass
    assert sampler.source == "host-rss"
    assert "NVML cannot read GPU 3" in sampler.note
    assert counts == {"init": 1, "shutdown": 1}


def test_nvml_path_with_fakes(monkeypatch: pytest.MonkeyPatch) -> None:
    """Device-level NVML memory plus torch counters; NVML initialised and shut down exactly once."""
    counts = {"init": 0, "shutdown": 0, "reset": 0}
    used = iter(range(1_000, 10**9, 1_000))
    lookups: list[str] = []

    def by_uuid(uuid: str) -> str:
        lookups.append(uuid)
        return "handle"

    def mem_info(handle: str) -> SimpleNamespace:
        assert handle == "handle"
        assert counts["init"] == 1 and counts["shutdown"] == 0  # only between init and shutdown
        return SimpleNamespace(used=next(used))

    monkeypatch.setattr(pynvml, "nvmlInit", counter(counts, "init"))
    monkeypatch.setattr(pynvml, "nvmlShutdown", counter(counts, "shutdown"))
    monkeypatch.setattr(pynvml, "nvmlDeviceGetHandleByUUID", by_uuid)
    monkeypatch.setattr(pynvml, "nvmlDeviceGetMemoryInfo", mem_info)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i: SimpleNamespace(uuid="1234-5678"))
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda i: 100)
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda i: 200)
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda i: 300)
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", counter(counts, "reset"))
    with MemorySampler(device=torch.device("cuda"), interval_s=0.002) as sampler:
        wait_until(lambda: len(sampler.samples) >= 3)
    assert sampler.source == "nvml"
    assert "cuda:1" in sampler.note
    assert lookups == ["GPU-1234-5678"]
    assert counts == {"init": 1, "shutdown": 1, "reset": 1}
    assert sampler.torch_peak_bytes == 300
    samples = sampler.samples
    assert len(samples) >= 3
    assert all(s.torch_allocated == 100 and s.torch_reserved == 200 for s in samples)
    assert sampler.peak_bytes == samples[-1].used_bytes  # the fake's readings only grow


def test_sampling_error_surfaces_at_stop(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = {"n": 0}
    real = memory.host_rss_bytes

    def flaky() -> int:
        calls["n"] += 1
        if calls["n"] >= 3:
            raise OSError("boom")
        return real()

    monkeypatch.setattr(memory, "host_rss_bytes", flaky)
    sampler = MemorySampler(device="cpu", interval_s=0.002)
    with pytest.raises(RuntimeError, match="sampling thread failed") as info, sampler:
        assert wait_until(lambda: sampler.error is not None)
    assert isinstance(info.value.__cause__, OSError)
    assert not sampler.running
    sampler.stop()  # reported once; a second stop stays quiet
    assert isinstance(sampler.error, OSError)


def test_first_sample_error_raises_at_start(monkeypatch: pytest.MonkeyPatch) -> None:
    def broken() -> int:
        raise OSError("no memory reading")

    monkeypatch.setattr(memory, "host_rss_bytes", broken)
    sampler = MemorySampler(device="cpu")
    with pytest.raises(RuntimeError, match="no memory reading"):
        sampler.start()
    assert not sampler.running


def test_body_exception_wins_and_sampler_error_is_warned(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = {"n": 0}
    real = memory.host_rss_bytes

    def flaky() -> int:
        calls["n"] += 1
        if calls["n"] >= 2:
            raise OSError("boom")
        return real()

    monkeypatch.setattr(memory, "host_rss_bytes", flaky)
    sampler = MemorySampler(device="cpu", interval_s=0.002)
    with pytest.warns(RuntimeWarning, match="boom"), pytest.raises(KeyError, match="body"), sampler:
        wait_until(lambda: sampler.error is not None)
        raise KeyError("body")


def test_a_later_sample_failing_before_start_returns_is_reported_at_the_end(monkeypatch) -> None:
    """On a loaded machine the sampling thread can take its second sample (and fail) before start() wakes
    from waiting for the first: start() must still return, the error comes at the end. Forced here by
    holding start() until the thread has failed."""
    calls = {"n": 0}
    real = memory.host_rss_bytes

    def fails_second(*args) -> int:
        calls["n"] += 1
        if calls["n"] >= 2:
            raise OSError("boom")
        return real()

    monkeypatch.setattr(memory, "host_rss_bytes", fails_second)
    sampler = MemorySampler(device="cpu", interval_s=0.002)
    first_sample = sampler._first_sample

    class LateWake:  # the main thread wakes only once the second sample has failed
        def set(self) -> None:
            first_sample.set()

        def wait(self, timeout=None) -> bool:
            first_sample.wait()
            while sampler.error is None and sampler.running:
                time.sleep(0.001)
            return True

    sampler._first_sample = LateWake()
    with pytest.warns(RuntimeWarning, match="boom"), pytest.raises(KeyError, match="body"), sampler:
        assert sampler.error is not None  # failed already, and start() returned all the same
        raise KeyError("body")


def lines_by_label(fig) -> dict[str, tuple[list[float], list[float]]]:
    (ax,) = fig.axes
    return {line.get_label(): (list(line.get_xdata()), list(line.get_ydata())) for line in ax.lines}


def test_plot_memory_timeline(tmp_path: Path) -> None:
    with MemorySampler(device="cpu", interval_s=0.002) as sampler:
        sampler.mark("write Bob")
        wait_until(lambda: len(sampler.samples) >= 3)
        sampler.mark("write Alice")
    synthetic = [Sample(0.01 * i, (1 << 30) + i * (1 << 26), i << 20, i << 21) for i in range(10)]
    runs = {"cpu run": sampler, "gpu run": synthetic}

    fig = memory_timeline_figure(runs)
    lines = lines_by_label(fig)
    gib = float(1 << 30)  # the synthetic run peaks above 1 GiB, so the whole plot is in GiB
    assert fig.axes[0].get_ylabel() == "memory (GiB)"
    assert lines["cpu run"] == ([s.t for s in sampler.samples], [s.used_bytes / gib for s in sampler.samples])
    assert lines["gpu run"] == ([s.t for s in synthetic], [s.used_bytes / gib for s in synthetic])
    # torch's allocated counter is drawn only for the run that sampled it (host RSS has none)
    assert lines["gpu run (torch allocated)"] == (
        [s.t for s in synthetic],
        [s.torch_allocated / gib for s in synthetic],
    )
    assert "cpu run (torch allocated)" not in lines
    # each mark: a vertical line at its time, labelled with its text
    mark_lines = [xs for label, (xs, _) in lines.items() if label.startswith("_")]
    assert sorted(xs[0] for xs in mark_lines) == sorted(t for t, _ in sampler.marks)
    assert sorted(t.get_text() for t in fig.axes[0].texts) == ["write Alice", "write Bob"]

    out = plot_memory_timeline(runs, tmp_path / "sub" / "timeline.png")
    assert out == tmp_path / "sub" / "timeline.png"
    assert_png(out)


def test_plot_memory_timeline_small_runs_in_mib() -> None:
    samples = [Sample(0.5 * i, (100 + i) * (1 << 20)) for i in range(4)]
    fig = memory_timeline_figure({"small": samples})
    assert fig.axes[0].get_ylabel() == "memory (MiB)"
    assert lines_by_label(fig) == {"small": ([0.0, 0.5, 1.0, 1.5], [100.0, 101.0, 102.0, 103.0])}


def test_plot_peak_vs_length(tmp_path: Path) -> None:
    rows = [
        {"mode": mode, "frames": frames, "peak_bytes": base + frames * step, "source": "nvml"}
        for mode, base, step in (("dense-mask", 4 << 30, 1 << 30), ("fused", 4 << 30, 1 << 26))
        for frames in (32, 2, 16, 4, 8)  # unsorted: the plot sorts by length
    ]
    rows.append({"mode": "dense-mask", "frames": 64, "peak_bytes": None})  # OOM: skipped, not plotted

    fig = peak_vs_length_figure(rows)
    (ax,) = fig.axes
    assert ax.get_ylabel() == "peak memory (GiB)" and ax.get_xscale() == "log"  # 2..32 spans ≥ 8x
    lengths = [2, 4, 8, 16, 32]
    assert lines_by_label(fig) == {
        "dense-mask": (lengths, [4 + f for f in lengths]),
        "fused": (lengths, [4 + f / 16 for f in lengths]),
    }
    assert [int(x) for x in ax.get_xticks()] == lengths

    out = plot_peak_vs_length(rows, str(tmp_path / "peak.png"))
    assert isinstance(out, Path)
    assert_png(out)


def test_peak_plot_says_when_it_shows_host_memory_and_keeps_lines_apart() -> None:
    rows = [
        {"mode": mode, "frames": frames, "peak_bytes": 2**20, "source": "host-rss"}
        for mode in ("ours", "window")
        for frames in (2, 4)
    ]
    fig = memory.peak_vs_length_figure(rows)
    assert any("not GPU memory" in text.get_text() for text in fig.texts)
    ours, window = fig.axes[0].lines  # identical data: told apart by their style
    assert (ours.get_marker(), ours.get_linestyle()) != (window.get_marker(), window.get_linestyle())
    nvml = [{**row, "source": "nvml"} for row in rows]
    assert not memory.peak_vs_length_figure(nvml).texts


def test_timeline_mark_labels_of_runs_do_not_overlap() -> None:
    samples = [memory.Sample(t, 2**20) for t in (0.0, 1.0)]
    fig = memory.memory_timeline_figure({"a": samples, "b": samples})
    assert not fig.axes[0].texts  # plain sample lists carry no marks
    sampler_a, sampler_b = (memory.MemorySampler("cpu") for _ in range(2))
    for sampler in (sampler_a, sampler_b):
        with sampler:
            sampler.mark("write")
    fig = memory.memory_timeline_figure({"a": sampler_a, "b": sampler_b}, title="each mode's longest story")
    heights = [text.get_position()[1] for text in fig.axes[0].texts]
    assert len(heights) == 2 and heights[0] != heights[1]
    assert fig.axes[0].get_title() == "each mode's longest story"
