"""`storydiff bench` on a CPU: every provider passes the correctness gate, results and a plot are written."""

import json

import torch
from utils import Case, assert_matches_reference, make_inputs

import storydiff.benchmark.op_suite as op_suite
from storydiff.benchmark.op_suite import OpCase
from storydiff.benchmark.providers import official_a, official_b
from storydiff.cli import main


def test_official_variants_match_reference():
    inputs = make_inputs(Case(8, 2, 50, 16, 20, groups=2), torch.float32)
    assert_matches_reference(official_a(**inputs), inputs)
    assert_matches_reference(official_b(**inputs), inputs)


def test_bench_writes_results_and_plot(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(op_suite, "cpu_cases", lambda: [OpCase("tiny", 2, 2, 64, 16, 0.5)])
    assert main(["bench", "--size", "cpu", "--out", str(tmp_path)]) == 0
    (json_path,) = tmp_path.glob("op-cpu_*.json")
    rows = json.loads(json_path.read_text())
    assert {row["provider"] for row in rows} == {
        "reference",
        "official_a",
        "official_b",
        "sdpa_dense",
        "ours_torch",
    }
    assert all(row["status"] == "ok" and row["ms"] > 0 and row["tflops"] > 0 for row in rows)
    assert all(row["device_type"] == "cpu" and row["torch"] and row["commit"] for row in rows)
    assert json_path.with_suffix(".csv").stat().st_size > 0
    assert json_path.with_suffix(".png").read_bytes()[:4] == b"\x89PNG"
    assert "ours_torch" in capsys.readouterr().out


def test_bench_gate_reports_wrong_provider(tmp_path, monkeypatch):
    """A provider that computes the wrong thing is marked failed and not timed."""
    import storydiff.benchmark.providers as providers

    monkeypatch.setattr(op_suite, "cpu_cases", lambda: [OpCase("tiny", 2, 1, 32, 8, 0.5)])
    monkeypatch.setattr(providers, "official_b", lambda q, k, v, ref_idx, **kw: v)
    assert main(["bench", "--out", str(tmp_path), "--providers", "official_b,ours_torch", "--no-plot"]) == 0
    rows = {row["provider"]: row for row in json.loads(next(tmp_path.glob("*.json")).read_text())}
    assert rows["official_b"]["status"].startswith("failed") and rows["official_b"]["ms"] is None
    assert rows["ours_torch"]["status"] == "ok"


def test_bench_rejects_unknown_provider(tmp_path, capsys):
    assert main(["bench", "--out", str(tmp_path), "--providers", "flash9"]) == 2
    assert "unknown provider" in capsys.readouterr().err
