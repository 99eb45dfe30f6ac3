"""Benchmark results as data: JSON + CSV files, a readable table, and plots drawn only from stored rows."""

from __future__ import annotations

import csv
import json
import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from matplotlib.figure import Figure


def slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", text).strip("-").lower()


def save_rows(rows: list[dict], out_dir: Path, suite: str, device: str) -> tuple[Path, Path]:
    """Write rows as ``<suite>_<device>_<time>.json`` and ``.csv``; returns both paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = out_dir / f"{suite}_{slug(device)}_{time.strftime('%Y%m%d-%H%M%S')}"
    json_path, csv_path = stem.with_suffix(".json"), stem.with_suffix(".csv")
    json_path.write_text(json.dumps(rows, indent=1) + "\n")
    columns = list(dict.fromkeys(key for row in rows for key in row))
    with csv_path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    return json_path, csv_path


def write_results(
    rows: list[dict],
    out_dir: Path,
    suite: str,
    device: str,
    plot: Callable[[list[dict], Path], Path] | None = None,
) -> list[Path]:
    """``save_rows``, then ``plot(rows, <the JSON path>.png)`` unless ``plot`` is None; every path written.

    The one writer of ``storydiff bench``'s suites: a single process calls it with its rows, a torchrun
    run calls it on rank 0 only, with every rank's rows (``ranks.gather_device_rows``)."""
    written = [*save_rows(rows, out_dir, suite, device)]
    if plot is not None and written:
        written.append(plot(rows, written[0].with_suffix(".png")))
    return written


def devices_label(rows: list[dict]) -> str:
    """What a merged file's name and titles say about the devices behind its rows: "NVIDIA H100 80GB HBM3
    x8 ranks" (one kind of card), "mixed devices x3 ranks", or a single process's device."""
    ranks = list(dict.fromkeys(row.get("rank") for row in rows))
    names = list(dict.fromkeys(row.get("device", "?") for row in rows))
    if len(ranks) <= 1 or None in ranks:
        return names[0] if len(names) == 1 else "mixed devices"
    return f"{names[0] if len(names) == 1 else 'mixed devices'} x{len(ranks)} ranks"


def write_json_file(path: Path, data) -> Path:
    path.write_text(json.dumps(data) + "\n")
    return path


def load_rows(path: Path) -> list[dict]:
    return json.loads(Path(path).read_text())


def format_table(rows: list[dict]) -> str:
    """Case x provider table of median ms and TFLOP/s (status text where a provider did not run)."""
    header = f"{'case':<28} {'provider':<16} {'ms':>10} {'TFLOP/s':>9} {'peak MiB':>9}  status"
    lines = [header, "-" * len(header)]
    for row in rows:
        ms = f"{row['ms']:.3f}" if row["ms"] else "-"
        tflops = f"{row['tflops']:.3g}" if row["tflops"] else "-"
        peak = f"{row['peak_extra_mib']:.0f}" if row["peak_extra_mib"] is not None else "-"
        name, provider = row["name"], row["provider"]
        lines.append(f"{name:<28} {provider:<16} {ms:>10} {tflops:>9} {peak:>9}  {row['status']}")
    return "\n".join(lines)


def rows_figure(
    rows: list[dict],
    title: str = "",
    panels: tuple[tuple[str, str], ...] = (("tflops", "effective TFLOP/s (attended keys only)"),),
) -> Figure:
    """Grouped bars per case, one bar per provider; one subplot per (row key, axis label) in ``panels``.

    Returns the matplotlib Figure (one ``BarContainer`` per provider in each axes, labelled with the
    provider; a missing or None value draws a zero-height bar), so tests can read back what is drawn.
    Rows of several ranks (a torchrun run: a ``rank`` column) draw one group per (case, rank), labelled
    "case r<rank>", the ranks of a case side by side.
    """
    # A bare Figure on an Agg canvas: no pyplot, so no global backend switch and no display needed.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    several = len({row.get("rank") for row in rows}) > 1
    groups = list(dict.fromkeys(_group(row, several) for row in rows))
    cases = [f"{name} r{rank}" if several else name for name, rank in groups]
    providers = list(dict.fromkeys(row["provider"] for row in rows))
    width = 0.8 / max(len(providers), 1)
    fig = Figure(figsize=(max(6.0, 1.2 * len(cases) + 2), 4.0 * len(panels)))
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(panels), 1, squeeze=False)
    for ax, (key, label) in zip(axes[:, 0], panels, strict=True):
        for p, provider in enumerate(providers):
            values = {
                _group(row, several): row.get(key) or 0.0 for row in rows if row["provider"] == provider
            }
            xs = [c + (p - (len(providers) - 1) / 2) * width for c in range(len(cases))]
            ax.bar(xs, [values.get(group, 0.0) for group in groups], width, label=provider)
        ax.set_xticks(range(len(cases)), cases, rotation=30, ha="right", fontsize=8)
        ax.set_ylabel(label)
        ax.grid(axis="y", alpha=0.3)
        ax.legend(fontsize=8)
    first = rows[0] if rows else {}
    axes[0, 0].set_title(
        title or f"consistent attention, {devices_label(rows) if rows else '?'} ({first.get('dtype', '?')})"
    )
    if any(CASE_NAMES.search(case) for case in cases):
        fig.text(0.01, 0.005, CASE_LEGEND, fontsize=7, color="dimgray", ha="left", va="bottom")
        fig.tight_layout(rect=(0, 0.04, 1, 1))
    else:
        fig.tight_layout()
    return fig


def _group(row: dict, several: bool) -> tuple:
    """A row's bar group: its case, and its rank when the rows come from several ranks."""
    return (row["name"], row.get("rank") if several else None)


# Op-suite case names: "<model><resolution>[-1/<level>]-f<frames>-r<rate>[-hd<head dim>]".
CASE_NAMES = re.compile(r"(-1/\d+)?-f\d+-r[\d.]+")
CASE_LEGEND = (
    "case names: model and image side (sdxl1024), level 1/16 or 1/32 of the image side (tokens per frame), "
    "f = story frames (x2 for CFG), r = sampling rate, hd = head dim (else 64); flux / sd35l: joint text + "
    "image attention of FLUX.1-dev / SD3.5-large, image rows borrow"
)


def plot_rows(
    rows: list[dict],
    path: Path,
    title: str = "",
    panels: tuple[tuple[str, str], ...] = (("tflops", "effective TFLOP/s (attended keys only)"),),
) -> Path:
    """Draw ``rows_figure(rows, title, panels)`` and save it as a PNG at ``path``."""
    fig = rows_figure(rows, title, panels)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    return path


OP_PANELS = (("tflops", "effective TFLOP/s (attended keys only)"),)
UNET_PANELS = (("ms", "ms per denoising step"), ("bank_gib_total", "identity bank for the run (GiB)"))
DIT_PANELS = (("ms", "ms per denoising step"), ("ms_vs_stock", "step time / stock step time"))


def panels_for(rows: list[dict]) -> tuple[tuple[str, str], ...]:
    """The panels of the suite that wrote ``rows``, told apart by the keys its rows carry."""
    keys = {key for row in rows for key in row}
    if "ms_vs_stock" in keys:
        return DIT_PANELS
    if "bank_gib_total" in keys:
        return UNET_PANELS
    return OP_PANELS
