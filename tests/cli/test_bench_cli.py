"""`storydiff bench` on a CPU: every provider passes the correctness gate, results and a plot are written."""

import json

import pytest
import torch

import storydiff.benchmark.op_suite as op_suite
from storydiff.benchmark.op_suite import OpCase
from storydiff.benchmark.vram import MODES
from storydiff.cli import main


def record_figures(monkeypatch) -> list:
    """The figures the CLI's plots are drawn from, in order (results.rows_figure, recorded)."""
    import storydiff.benchmark.results as results

    figures, rows_figure = [], results.rows_figure

    def recording(*args, **kwargs):
        figures.append(rows_figure(*args, **kwargs))
        return figures[-1]

    monkeypatch.setattr(results, "rows_figure", recording)
    return figures


def bar_heights(ax) -> dict[str, list[float]]:
    return {bars.get_label(): [bar.get_height() for bar in bars] for bars in ax.containers}


def test_bench_writes_results_and_plot(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(op_suite, "cpu_cases", lambda: [OpCase("tiny", 2, 2, 64, 16, 0.5)])
    figures = record_figures(monkeypatch)
    assert main(["bench", "--suite", "op", "--size", "cpu", "--out", str(tmp_path)]) == 0
    (json_path,) = tmp_path.glob("op-cpu_*.json")
    rows = json.loads(json_path.read_text())
    assert {row["provider"] for row in rows} == {
        "reference",
        "official_a",
        "official_b",
        "flex",
        "sdpa_dense",
        "ours_torch",
    }
    assert all(row["status"] == "ok" and row["ms"] > 0 and row["tflops"] > 0 for row in rows)
    assert all(row["device_type"] == "cpu" and row["torch"] and row["commit"] for row in rows)
    assert json_path.with_suffix(".csv").stat().st_size > 0
    assert json_path.with_suffix(".png").read_bytes()[:4] == b"\x89PNG"
    (ax,) = figures[0].axes  # the plot shows the stored rows: one TFLOP/s bar per provider
    assert bar_heights(ax) == {row["provider"]: [row["tflops"]] for row in rows}
    assert "ours_torch" in capsys.readouterr().out


def test_bench_gate_reports_wrong_provider(tmp_path, monkeypatch):
    """A provider that computes the wrong thing is marked failed and not timed."""
    import storydiff.benchmark.providers as providers

    monkeypatch.setattr(op_suite, "cpu_cases", lambda: [OpCase("tiny", 2, 1, 32, 8, 0.5)])
    monkeypatch.setattr(providers, "official_b", lambda q, k, v, ref_idx, **kw: v)
    assert (
        main(
            [
                "bench",
                "--suite",
                "op",
                "--out",
                str(tmp_path),
                "--providers",
                "official_b,ours_torch",
                "--no-plot",
            ]
        )
        == 0
    )
    rows = {row["provider"]: row for row in json.loads(next(tmp_path.glob("*.json")).read_text())}
    assert rows["official_b"]["status"].startswith("failed") and rows["official_b"]["ms"] is None
    assert rows["ours_torch"]["status"] == "ok"


def test_bench_rejects_unknown_provider(tmp_path, capsys):
    assert main(["bench", "--out", str(tmp_path), "--providers", "flash9"]) == 2
    assert "unknown provider" in capsys.readouterr().err


def test_bench_unet_suite_on_tiny_sdxl(tmp_path, monkeypatch, capsys):
    """Official A, official B and ours each run one tiny SDXL UNet step and report their bank."""
    import storydiff.benchmark.unet_suite as unet_suite

    monkeypatch.setattr(unet_suite, "cpu_cases", lambda: [unet_suite.UNetCase("tiny-128", 128, frames=2)])
    figures = record_figures(monkeypatch)
    assert main(["bench", "--suite", "unet", "--out", str(tmp_path)]) == 0
    (json_path,) = tmp_path.glob("unet-tiny_*.json")
    rows = {row["provider"]: row for row in json.loads(json_path.read_text())}
    assert set(rows) == {"official_a", "official_b", "ours"}
    assert all(row["status"] == "ok" and row["ms"] > 0 for row in rows.values())
    # A banks full hidden states (C per token), B sampled ones (rate·C), ours sampled K and V (2·rate·C)
    a, b, ours = (rows[p]["bank_mib_per_step"] for p in ("official_a", "official_b", "ours"))
    assert ours == pytest.approx(a, rel=1e-6) and b == pytest.approx(a / 2, rel=0.2)
    assert rows["ours"]["bank_gib_total"] == pytest.approx(ours * 50 / 1024)
    assert json_path.with_suffix(".png").read_bytes()[:4] == b"\x89PNG"
    ms, bank = figures[0].axes  # panels: ms per step, bank GiB per run, one bar per provider
    assert bar_heights(ms) == {p: [row["ms"]] for p, row in rows.items()}
    assert bar_heights(bank) == {p: [row["bank_gib_total"]] for p, row in rows.items()}
    assert "bank GiB/run" in capsys.readouterr().out


def test_embedded_sdxl_config_is_the_real_architecture():
    from collections import Counter

    from diffusers import UNet2DConditionModel

    from storydiff.benchmark.unet_suite import SDXL_UNET_CONFIG

    with torch.device("meta"):
        unet = UNet2DConditionModel(**SDXL_UNET_CONFIG)
    assert sum(p.numel() for p in unet.parameters()) == 2_567_463_684
    up = Counter(
        n.split(".attentions")[0] for n in unet.attn_processors if n.startswith("up_") and ".attn1." in n
    )
    assert up == {"up_blocks.0": 30, "up_blocks.1": 6}  # ARCHITECTURE.md §3: 30 layers at 1/32, 6 at 1/16


def test_profile_vram_without_gpu_profiles_host_memory(tmp_path, capsys):
    args = ["profile-vram", "--out", str(tmp_path), "--lengths", "2,3", "--id-frames", "2", "--steps", "1"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "NVML unavailable" in out and "host memory" in out
    (json_path,) = tmp_path.glob("vram-tiny-sdxl_*[0-9].json")
    rows = json.loads(json_path.read_text())
    assert {(row["mode"], row["frames"]) for row in rows} == {(mode, n) for mode in MODES for n in (2, 3)}
    assert all(row["source"] == "host-rss" and row["peak_bytes"] > 0 for row in rows)
    timeline = json.loads(json_path.with_name(json_path.stem + "_timeline.json").read_text())
    assert set(timeline) == set(MODES) and timeline["ours"]
    for suffix in ("_timeline.png", "_peak.png"):
        assert json_path.with_name(json_path.stem + suffix).read_bytes()[:4] == b"\x89PNG"


def test_profile_vram_rejects_stories_shorter_than_identity(tmp_path, capsys):
    assert main(["profile-vram", "--out", str(tmp_path), "--lengths", "2", "--id-frames", "4"]) == 2
    assert "shorter than id_frames=4" in capsys.readouterr().err
