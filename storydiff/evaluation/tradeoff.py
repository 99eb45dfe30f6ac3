"""A suite's comparison of its configurations: ``comparison.json``, ``comparison.csv``, ``tradeoff.png``.

Consistency and prompt fidelity pull against each other (more shared tokens: a steadier character, and
scenes that follow their prompts less), so the picture puts each configuration at (mean CLIP-T, mean
identity similarity): up is more consistent, right follows the prompts better.
"""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import TYPE_CHECKING

from ..support.atomic import atomic_path, write_json, write_text

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = ["comparison_csv", "tradeoff_figure", "write_comparison"]

_LABELS = {"clip_i": "CLIP-I", "dino": "DINO"}
SCORES = ("clip_t", "clip_t_styled")


def comparison_csv(comparison: dict) -> str:
    """One row per configuration: name, options, sets, mean identity per metric, mean CLIP-T (two)."""
    metrics = comparison["identity_metrics"]
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["config", "options", "sets", *metrics, *SCORES])
    for row in comparison["configs"]:
        values = [row.get(key) for key in (*metrics, *SCORES)]
        writer.writerow(
            [row["config"], row["options"], row["sets"], *("" if v is None else v for v in values)]
        )
    return buffer.getvalue()


def tradeoff_figure(comparison: dict) -> Figure:
    """One labelled point per configuration: x = mean CLIP-T (story text), y = mean identity similarity in
    the first metric's space. A configuration without an identity number (no character in two frames) is
    listed in the title instead."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    metric = comparison["identity_metrics"][0]
    fig = Figure(figsize=(6.0, 4.6))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    rows = comparison["configs"]
    shown = [row for row in rows if row.get(metric) is not None and row["clip_t"] is not None]
    for row in shown:
        ax.scatter(row["clip_t"], row[metric], s=40)
        ax.annotate(row["config"], (row["clip_t"], row[metric]), textcoords="offset points", xytext=(5, 5))
    missing = [row["config"] for row in rows if row not in shown]
    ax.set_xlabel("mean CLIP-T (story text)")
    ax.set_ylabel(f"mean {_LABELS.get(metric, metric)} identity similarity")
    title = "consistency vs prompt fidelity, one point per configuration"
    ax.set_title(title + (f"\nno number: {', '.join(missing)}" if missing else ""), fontsize=9)
    ax.grid(alpha=0.3)
    ax.margins(0.2)
    if comparison.get("note"):
        fig.text(0.01, 0.005, comparison["note"], fontsize=7, color="dimgray", ha="left", va="bottom")
    fig.tight_layout(rect=(0, 0.03, 1, 1))
    return fig


def write_comparison(comparison: dict, out_dir: Path) -> dict[str, Path]:
    """comparison.json, comparison.csv and tradeoff.png into ``out_dir``, each written atomically."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {
        "json": write_json(out_dir / "comparison.json", comparison),
        "csv": write_text(out_dir / "comparison.csv", comparison_csv(comparison)),
    }
    png = out_dir / "tradeoff.png"
    with atomic_path(png) as tmp:
        tradeoff_figure(comparison).savefig(tmp, format="png", dpi=110)
    paths["png"] = png
    return paths
