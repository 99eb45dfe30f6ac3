"""The evaluation's picture: a similarity-matrix heatmap per character, and CLIP-T per frame.

A bare ``Figure`` on an Agg canvas (no pyplot): no global backend switch, no display needed, and tests
can read back what was drawn.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = ["mask_sheet", "report_figure"]

_HEATMAPS_PER_ROW = 4
_METRIC_LABELS = {"clip_i": "CLIP-I", "dino": "DINO"}


def report_figure(report: dict) -> Figure:
    """Heatmaps of the first identity metric's matrix for each character seen in two frames or more
    (axes: story frame numbers), then a bar chart of CLIP-T per frame (story text and styled prompt); for a
    video story (frames are shots), then the cosine of consecutive video frames along each shot."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    metric = report["identity_metrics"][0]
    shown = {name: entry for name, entry in report["characters"].items() if len(entry["frames"]) >= 2}
    heat_rows = -(-len(shown) // _HEATMAPS_PER_ROW)
    columns = max(1, min(len(shown), _HEATMAPS_PER_ROW))
    frames = report["frames"]
    video = report.get("video")
    extra = 1 if video else 0  # a video story: a row for temporal stability
    fig = Figure(figsize=(max(3.2 * columns, 0.4 * len(frames) + 3), 3.2 * heat_rows + 3.4 + 3.0 * extra))
    FigureCanvasAgg(fig)
    ratios = [1.0] * heat_rows + [0.9] * (1 + extra)
    grid = fig.add_gridspec(heat_rows + 1 + extra, columns, height_ratios=ratios)
    for k, (name, entry) in enumerate(shown.items()):
        ax = fig.add_subplot(grid[k // columns, k % columns])
        image = ax.imshow(entry[metric]["matrix"], vmin=-1.0, vmax=1.0, cmap="viridis")
        ticks = range(len(entry["frames"]))
        ax.set_xticks(ticks, entry["frames"], fontsize=7)
        ax.set_yticks(ticks, entry["frames"], fontsize=7)
        ax.set_title(
            f"{name}: {_METRIC_LABELS.get(metric, metric)} mean {entry[metric]['mean']:.3f}", fontsize=9
        )
        fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
    bars = fig.add_subplot(grid[heat_rows, :])
    xs = range(len(frames))
    bars.bar([x - 0.2 for x in xs], [f["clip_t"] for f in frames], 0.4, label="story text")
    bars.bar([x + 0.2 for x in xs], [f["clip_t_styled"] for f in frames], 0.4, label="styled prompt")
    labels = [f"{f['index']}\n{'+'.join(f['characters']) or 'NC'}" for f in frames]
    bars.set_xticks(list(xs), labels, fontsize=7)
    bars.set_ylabel("CLIP-T (cosine)")
    title = (
        "prompt fidelity per shot (mean over its sampled frames)" if video else "prompt fidelity per frame"
    )
    bars.set_title(title, fontsize=9)
    bars.grid(axis="y", alpha=0.3)
    bars.legend(fontsize=8)
    if video:
        _temporal_axes(fig.add_subplot(grid[heat_rows + 1, :]), report)
    if report.get("note"):
        fig.text(0.01, 0.005, report["note"], fontsize=7, color="dimgray", ha="left", va="bottom")
    fig.tight_layout(rect=(0, 0.03, 1, 1))
    return fig


def _temporal_axes(ax, report: dict) -> None:
    """A line per shot: the first encoder's cosine of video frame j with j + 1, against j; min marked."""
    from matplotlib.ticker import MaxNLocator

    metric = report["video"]["temporal_metrics"][0]
    for shot in report["frames"]:
        stats = shot["temporal"][metric]
        if stats["mean"] is None:
            continue
        (line,) = ax.plot(
            range(len(stats["values"])), stats["values"], marker=".", label=f"shot {shot['index']}"
        )
        ax.plot([stats["min_pair"]], [stats["min"]], marker="v", color=line.get_color())
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("frame pair (j, j + 1)")
    ax.set_ylabel(f"{_METRIC_LABELS.get(metric, metric)} (cosine)")
    ax.set_title("temporal stability per shot (consecutive frames; ▼ the lowest)", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=4)


def mask_sheet(items, masks, *, size: int = 128, columns: int = 6):
    """What the identity encoders saw: each (frame path, frame index, character) of ``items`` with its mask
    (``masks[(index, character)]``: an "L" image, or None for a whole frame) as an outline in red, beside the
    frame masked (the masked-out area neutral gray), captioned "frame i: Name"; a PIL image, ``columns``
    pairs per row. The masks are the ones the encoding pass got: the mask function runs once per item."""
    from PIL import Image, ImageDraw, ImageFilter

    from .masks import NEUTRAL_GRAY

    cells = []
    for path, index, character in items:
        with Image.open(path) as opened:
            whole = opened.convert("RGB").resize((size, size))
        mask = masks.get((index, character))
        outlined, masked = whole.copy(), whole
        if mask is not None:
            coverage = mask.resize((size, size))
            outlined.paste(
                (220, 30, 30),
                mask=coverage.point(lambda v: 255 if v >= 128 else 0).filter(ImageFilter.FIND_EDGES),
            )
            masked = Image.composite(whole, Image.new("RGB", whole.size, NEUTRAL_GRAY), coverage)
        pair = Image.new("RGB", (2 * size + 4, size + 16), (255, 255, 255))
        pair.paste(outlined, (0, 16))
        pair.paste(masked, (size + 4, 16))
        ImageDraw.Draw(pair).text((2, 2), f"frame {index}: {character}", fill=(0, 0, 0))
        cells.append(pair)
    if not cells:
        raise ValueError("no masked frame to draw")
    rows = -(-len(cells) // columns)
    width, height = cells[0].size
    sheet = Image.new("RGB", (min(columns, len(cells)) * (width + 8), rows * (height + 8)), (255, 255, 255))
    for k, cell in enumerate(cells):
        sheet.paste(cell, ((k % columns) * (width + 8), (k // columns) * (height + 8)))
    return sheet
