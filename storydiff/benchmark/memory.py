"""Memory over time: a background sampler (NVML device memory, or host RSS without a GPU) and its plots.

On CUDA the sampler reads NVML's *device-level* used memory: inside containers NVML reports host PIDs, so
per-process accounting cannot be matched to our process (ARCHITECTURE.md §5). Device-level memory includes
other processes on the same GPU, which is why torch's own counters are recorded next to it. Where NVML is
missing (no driver, no GPU, or a CPU device) the sampler degrades to this process's resident set size and
says so in ``note``; it never raises because NVML is absent.
"""

from __future__ import annotations

import os
import sys
import threading
import time
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType, TracebackType
from typing import TYPE_CHECKING, Any, Literal

import torch

if TYPE_CHECKING:
    from matplotlib.figure import Figure

Source = Literal["nvml", "host-rss"]

_SOURCE_TITLES: dict[str, str] = {"nvml": "NVML device memory", "host-rss": "host RSS"}


@dataclass(frozen=True)
class Sample:
    """One reading. ``t`` is seconds since the sampler started; torch counters are None off CUDA."""

    t: float
    used_bytes: int
    torch_allocated: int | None = None
    torch_reserved: int | None = None


def host_rss_bytes() -> int:
    """Resident set size of this process now (lifetime max RSS where /proc is absent)."""
    try:
        with open("/proc/self/status", encoding="ascii", errors="replace") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024  # the kernel reports kB
    except OSError:
        pass
    import resource  # not on Windows; imported late so the /proc path works everywhere it exists

    max_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # Linux reports ru_maxrss in kB, macOS in bytes.
    return int(max_rss) if sys.platform == "darwin" else int(max_rss) * 1024


class MemorySampler:
    """Samples memory every ``interval_s`` seconds on a daemon thread; use as a context manager.

    ``device`` picks what is measured: a CUDA device → NVML device-level used memory plus torch's
    allocated/reserved counters; a CPU device, or a CUDA device without NVML → host RSS (``source`` says
    which, ``note`` says why). ``device=None`` means the current CUDA device if torch sees one, else CPU.

    A sampler runs once: ``start()`` takes a first sample before returning, ``stop()`` takes a last one,
    is idempotent, and re-raises (chained in a RuntimeError) any exception from the sampling thread.
    """

    def __init__(self, device: torch.device | str | None = None, interval_s: float = 0.01) -> None:
        if not interval_s > 0:
            raise ValueError(f"interval_s must be > 0, got {interval_s!r}")
        if device is None:
            device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.device = torch.device(device)
        self.interval_s = float(interval_s)
        self.source: Source | None = None  # decided at start(), when NVML is tried
        self.note = ""
        self.error: BaseException | None = None
        self.torch_peak_bytes: int | None = None
        self._samples: list[Sample] = []
        self._marks: list[tuple[float, str]] = []
        self._lock = threading.Lock()
        self._stop_event = threading.Event()
        self._first_sample = threading.Event()
        self._first_failed = False  # the very first sample could not be read (start() raises)
        self._thread: threading.Thread | None = None
        self._t0 = 0.0
        self._stopped = False
        self._nvml: ModuleType | None = None  # set only while nvmlInit has succeeded and not been shut down
        self._nvml_handle: Any = None
        self._cuda_index: int | None = None

    # -- lifecycle -----------------------------------------------------------------------------------

    def start(self) -> MemorySampler:
        if self._thread is not None:
            raise RuntimeError("MemorySampler was already started; create a new one per measurement")
        self._choose_source()
        thread = threading.Thread(target=self._run, name="memory-sampler", daemon=True)
        try:
            if self.source == "nvml":
                torch.cuda.reset_peak_memory_stats(self._cuda_index)
            self._t0 = time.perf_counter()
            thread.start()
        except BaseException:
            self._nvml_shutdown()  # keep nvmlInit/nvmlShutdown paired when start() itself fails
            raise
        self._thread = thread
        # Waiting for the first sample means samples is never empty once start() returns, and a source
        # that cannot be read at all fails here rather than at the end of a long benchmark.
        self._first_sample.wait()
        # Only a failed first sample fails here: a later sample may already have failed too by the time
        # this thread wakes (a loaded machine), and that error belongs to the end of the measurement.
        if self._first_failed:
            self.stop()  # joins, shuts NVML down and raises the captured error
        return self

    def stop(self) -> None:
        """Stop sampling (last sample included); re-raise a sampling-thread error the first time only."""
        error = self._shutdown()
        if error is not None:
            raise RuntimeError(f"memory sampling thread failed: {error!r}") from error

    def _shutdown(self) -> BaseException | None:
        """Stop and clean up; return the sampling error if it has not been reported yet."""
        if self._stopped or self._thread is None:
            return None
        self._stopped = True
        self._stop_event.set()
        # No timeout: NVML must not be shut down while the thread may still be inside an NVML call.
        self._thread.join()
        try:
            if self.source == "nvml":
                self.torch_peak_bytes = int(torch.cuda.max_memory_allocated(self._cuda_index))
        finally:
            self._nvml_shutdown()
        return self.error

    def __enter__(self) -> MemorySampler:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc_type is None:
            self.stop()
            return
        # The body's exception is the one to propagate; raising ours would hide it, so report ours instead.
        error = self._shutdown()
        if error is not None:
            warnings.warn(f"memory sampling thread also failed: {error!r}", RuntimeWarning, stacklevel=2)

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    # -- results -------------------------------------------------------------------------------------

    def mark(self, label: str) -> None:
        """Record a labelled event at the current time (same clock as the samples)."""
        if self._thread is None or self._stopped:
            raise RuntimeError("mark() needs a running MemorySampler")
        t = time.perf_counter() - self._t0
        with self._lock:
            self._marks.append((t, label))

    @property
    def samples(self) -> list[Sample]:
        with self._lock:  # a copy, so callers can read while the thread appends
            return list(self._samples)

    @property
    def marks(self) -> list[tuple[float, str]]:
        with self._lock:
            return list(self._marks)

    @property
    def peak_bytes(self) -> int | None:
        """Largest sampled ``used_bytes`` (None before any sample)."""
        samples = self.samples
        return max(s.used_bytes for s in samples) if samples else None

    # -- internals -----------------------------------------------------------------------------------

    def _choose_source(self) -> None:
        if self.device.type != "cuda":
            self._use_host(f"device is {self.device.type}: sampling host memory (RSS)")
            return
        try:
            import pynvml
        except ImportError:
            self._use_host(
                "NVML unavailable (nvidia-ml-py missing: pip install nvidia-ml-py, or the [profile] extra): "
                "sampling host memory (RSS) instead"
            )
            return
        try:
            pynvml.nvmlInit()
        except pynvml.NVMLError as exc:
            # Checked before any torch.cuda call, so a machine without a driver never initialises CUDA.
            self._use_host(f"NVML unavailable ({type(exc).__name__}): sampling host memory (RSS) instead")
            return
        self._nvml = pynvml
        try:
            if not torch.cuda.is_available():
                self._nvml_shutdown()
                self._use_host("torch has no CUDA device: sampling host memory (RSS) instead")
                return
            index = self.device.index if self.device.index is not None else torch.cuda.current_device()
            try:
                self._nvml_handle = _nvml_handle(pynvml, index)
                pynvml.nvmlDeviceGetMemoryInfo(self._nvml_handle)  # fail now, not in the thread
            except pynvml.NVMLError as exc:
                self._nvml_shutdown()
                self._use_host(
                    f"NVML cannot read GPU {index} ({type(exc).__name__}): sampling host memory (RSS) instead"
                )
                return
        except BaseException:
            self._nvml_shutdown()  # a torch.cuda failure must not leave NVML initialised
            raise
        self._cuda_index = index
        self.source = "nvml"
        self.note = f"NVML device-level used memory of cuda:{index} (includes other processes on the GPU)"

    def _use_host(self, note: str) -> None:
        self.source = "host-rss"
        self.note = note

    def _nvml_shutdown(self) -> None:
        if self._nvml is not None:
            nvml, self._nvml = self._nvml, None
            nvml.nvmlShutdown()

    def _read(self) -> Sample:
        t = time.perf_counter() - self._t0
        if self.source == "nvml":
            assert self._nvml is not None
            used = int(self._nvml.nvmlDeviceGetMemoryInfo(self._nvml_handle).used)
            return Sample(
                t,
                used,
                int(torch.cuda.memory_allocated(self._cuda_index)),
                int(torch.cuda.memory_reserved(self._cuda_index)),
            )
        return Sample(t, host_rss_bytes())

    def _append(self) -> None:
        sample = self._read()
        with self._lock:
            self._samples.append(sample)

    def _run(self) -> None:
        try:
            try:
                self._append()
            except BaseException:
                self._first_failed = True
                raise
            self._first_sample.set()
            # Event.wait returns as soon as stop() sets it, so stopping never waits out a whole interval.
            while not self._stop_event.wait(self.interval_s):
                self._append()
            self._append()  # the last sample, at stop time
        except BaseException as exc:  # handed to stop(); a thread's exception is otherwise only printed
            self.error = exc
        finally:
            self._first_sample.set()  # never leave start() waiting


def _nvml_handle(pynvml: ModuleType, index: int) -> Any:
    """NVML handle of torch's CUDA device ``index``.

    torch's index is relative to CUDA_VISIBLE_DEVICES and NVML's is not, so match by UUID first; fall back
    to the index where torch exposes no UUID (older builds) or NVML does not know it (e.g. MIG instances).
    """
    try:
        uuid = str(torch.cuda.get_device_properties(index).uuid)
        uuid = uuid if uuid.startswith(("GPU-", "MIG-")) else f"GPU-{uuid}"
        return pynvml.nvmlDeviceGetHandleByUUID(uuid)
    except (AttributeError, RuntimeError, pynvml.NVMLError):
        return pynvml.nvmlDeviceGetHandleByIndex(index)


# -- plots --------------------------------------------------------------------------------------------


def _unit(max_bytes: float) -> tuple[str, float]:
    """GiB for GPU-sized numbers, MiB below 1 GiB so small CPU runs do not plot as 0.0x."""
    return ("GiB", 2.0**30) if max_bytes >= 2**30 else ("MiB", 2.0**20)


def _describe_sources(sources: Sequence[str | None]) -> str:
    known = list(dict.fromkeys(_SOURCE_TITLES.get(s, s) for s in sources if s))
    return " + ".join(known) if known else "memory"


def _save(fig: Figure, path: str | os.PathLike[str]) -> Path:
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(out, dpi=120, format="png")
    return out


def _new_figure(figsize: tuple[float, float]) -> tuple[Any, Any]:
    # A bare Figure on an Agg canvas: no pyplot, so no global backend switch and no display needed.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize)
    FigureCanvasAgg(fig)
    return fig, fig.add_subplot()


def plot_memory_timeline(
    runs: Mapping[str, MemorySampler | Sequence[Sample]],
    path: str | os.PathLike[str],
    title: str | None = None,
) -> Path:
    """Draw ``memory_timeline_figure(runs, title)`` and save it as a PNG at ``path``."""
    return _save(memory_timeline_figure(runs, title), path)


def memory_timeline_figure(
    runs: Mapping[str, MemorySampler | Sequence[Sample]], title: str | None = None
) -> Figure:
    """Memory vs time, one line per run (dashed: torch allocated, where sampled); marks as dotted lines.

    Returns the matplotlib Figure: per run, a line labelled with the run's name, then (where every sample
    has it) one labelled ``"<name> (torch allocated)"``, then one vertical line per mark; y in the unit
    named on the y axis (MiB below 1 GiB of peak, else GiB).
    """
    series: dict[str, tuple[list[Sample], list[tuple[float, str]], str | None]] = {}
    for label, run in runs.items():
        if isinstance(run, MemorySampler):
            series[label] = (run.samples, run.marks, run.source)
        else:
            series[label] = (list(run), [], None)
    peak = max((s.used_bytes for samples, _, _ in series.values() for s in samples), default=0)
    unit, scale = _unit(peak)
    fig, ax = _new_figure((8.0, 4.5))
    for row, (label, (samples, marks, _)) in enumerate(series.items()):
        ts = [s.t for s in samples]
        (line,) = ax.plot(ts, [s.used_bytes / scale for s in samples], label=label, linewidth=1.5)
        color = line.get_color()
        if samples and all(s.torch_allocated is not None for s in samples):
            alloc = [(s.torch_allocated or 0) / scale for s in samples]
            ax.plot(ts, alloc, color=color, linestyle="--", linewidth=1, label=f"{label} (torch allocated)")
        for t, text in marks:
            ax.axvline(t, color=color, linestyle=":", linewidth=0.8, alpha=0.8)
            # x in data coordinates, y in axes coordinates: labels sit near the top whatever the scale,
            # each run on its own height so runs that start together do not print over each other
            ax.text(
                t,
                0.98 - 0.16 * (row % 5),
                text,
                transform=ax.get_xaxis_transform(),
                rotation=90,
                fontsize=6,
                color=color,
                ha="right",
                va="top",
            )
    ax.set_xlabel("time (s)")
    ax.set_ylabel(f"memory ({unit})")
    ax.set_ylim(bottom=0)  # a zero baseline keeps differences between runs in proportion
    ax.set_title(title or f"{_describe_sources([src for _, _, src in series.values()])} over time")
    ax.grid(alpha=0.3)
    if series:
        ax.legend(fontsize=7)
    return fig


def plot_peak_vs_length(
    rows: Sequence[Mapping[str, Any]],
    path: str | os.PathLike[str],
    title: str | None = None,
) -> Path:
    """Draw ``peak_vs_length_figure(rows, title)`` and save it as a PNG at ``path``."""
    return _save(peak_vs_length_figure(rows, title), path)


MODE_STYLES = tuple(
    {"marker": marker, "linestyle": dash, "markersize": 4 + 2 * (i % 3)}
    for i, (marker, dash) in enumerate(zip("osD^vP*X", ["-", "--", "-.", ":"] * 2, strict=True))
)


def peak_vs_length_figure(rows: Sequence[Mapping[str, Any]], title: str | None = None) -> Figure:
    """Peak memory vs story length, one line per ``mode``; rows whose ``peak_bytes`` is None are skipped.

    Returns the matplotlib Figure: one line per mode (labelled with it), x = frames ascending, y = peak in
    the unit named on the y axis (MiB below 1 GiB, else GiB).
    """
    valid = [row for row in rows if row.get("peak_bytes") is not None]
    modes = list(dict.fromkeys(row["mode"] for row in valid))
    frames = sorted({int(row["frames"]) for row in valid})
    unit, scale = _unit(max((row["peak_bytes"] for row in valid), default=0))
    fig, ax = _new_figure((7.0, 4.5))
    for mode in modes:
        points = sorted((int(r["frames"]), r["peak_bytes"] / scale) for r in valid if r["mode"] == mode)
        # markers and dashes differ per mode: lines that overlap (tiny CPU runs) stay distinguishable
        style = MODE_STYLES[modes.index(mode) % len(MODE_STYLES)]
        ax.plot([f for f, _ in points], [p for _, p in points], label=str(mode), **style)
    if frames and frames[0] > 0 and frames[-1] / frames[0] >= 8:
        ax.set_xscale("log", base=2)  # doubling story lengths read as even steps
    if frames:
        ax.set_xticks(frames, [str(f) for f in frames])
        ax.minorticks_off()
    ax.set_xlabel("story length (frames)")
    ax.set_ylabel(f"peak memory ({unit})")
    ax.set_ylim(bottom=0)
    sources = [row.get("source") for row in valid]
    ax.set_title(title or f"peak {_describe_sources(sources)} vs story length")
    ax.grid(alpha=0.3)
    if modes:
        ax.legend(fontsize=8)
    if "host-rss" in sources:
        fig.text(0.01, 0.01, HOST_NOTE, fontsize=7, color="dimgray", ha="left", va="bottom", wrap=True)
        fig.subplots_adjust(bottom=0.22)
    return fig


HOST_NOTE = (
    "Host memory (RSS) of the whole process, not GPU memory: it includes the models and Python, so at "
    "these tiny CPU sizes the modes differ little and their lines overlap. Run on a GPU for device memory."
)
