"""Benchmark result plots: the bars drawn are the stored rows' numbers, per case and per provider."""

from __future__ import annotations

from pathlib import Path

import pytest

from storydiff.benchmark.results import UNET_PANELS, plot_rows, rows_figure


def bar_heights(ax) -> dict[str, list[float]]:
    """{legend label: bar heights in case order}, one entry per ``ax.bar`` call (one per provider)."""
    return {bars.get_label(): [bar.get_height() for bar in bars] for bars in ax.containers}


def bar_centres(ax) -> dict[str, list[float]]:
    return {bars.get_label(): [bar.get_x() + bar.get_width() / 2 for bar in bars] for bars in ax.containers}


ROWS = [
    {"name": "sdxl-64", "provider": "ours", "tflops": 310.0, "ms": 1.5, "bank_gib_total": 0.25},
    {"name": "sdxl-64", "provider": "flex", "tflops": 120.0, "ms": 4.0, "bank_gib_total": 0.5},
    {"name": "sdxl-32", "provider": "ours", "tflops": 250.0, "ms": 0.5, "bank_gib_total": 0.125},
    # a provider that failed its gate has no numbers; one missing from a case has no row: both draw 0
    {"name": "sdxl-32", "provider": "flex", "tflops": None, "ms": None, "bank_gib_total": None},
    {"name": "sdxl-32", "provider": "official_a", "tflops": 80.0, "ms": 9.0, "bank_gib_total": 2.0},
]


def test_rows_figure_draws_one_bar_per_case_and_provider():
    fig = rows_figure(ROWS, title="op suite")
    (ax,) = fig.axes
    assert ax.get_title() == "op suite"
    assert [t.get_text() for t in ax.get_xticklabels()] == ["sdxl-64", "sdxl-32"]
    assert bar_heights(ax) == {"ours": [310.0, 250.0], "flex": [120.0, 0.0], "official_a": [0.0, 80.0]}
    # the providers' bars sit side by side, in row order, centred on their case's tick
    centres = bar_centres(ax)
    for case, tick in enumerate(ax.get_xticks()):
        column = [centres[p][case] for p in ("ours", "flex", "official_a")]
        assert column == sorted(column) and sum(column) / 3 == pytest.approx(tick)


def test_rows_figure_one_panel_per_key():
    fig = rows_figure(ROWS, panels=UNET_PANELS)
    ms, bank = fig.axes
    assert [ms.get_ylabel(), bank.get_ylabel()] == [label for _, label in UNET_PANELS]
    assert bar_heights(ms) == {"ours": [1.5, 0.5], "flex": [4.0, 0.0], "official_a": [0.0, 9.0]}
    assert bar_heights(bank) == {"ours": [0.25, 0.125], "flex": [0.5, 0.0], "official_a": [0.0, 2.0]}


def test_plot_rows_saves_the_figure(tmp_path: Path):
    out = plot_rows(ROWS, tmp_path / "sub" / "op.png")
    assert out == tmp_path / "sub" / "op.png"
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_op_case_names_are_explained_on_the_plot():
    rows = [{"name": "sdxl1024-1/16-f4-r0.5", "provider": "ours", "tflops": 1.0, "device": "cpu"}]
    notes = [text.get_text() for text in rows_figure(rows).texts]
    assert any("f = story frames" in note and "r = sampling rate" in note for note in notes)
    other = [{"name": "tiny-unet-case", "provider": "ours", "tflops": 1.0}]
    assert not rows_figure(other).texts  # nothing to explain
