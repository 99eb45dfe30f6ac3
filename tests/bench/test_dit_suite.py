"""The DiT suite on tiny-flux / tiny-sd3 (one step per provider, the suite's own code): rows are well formed,
ours at rate 0 is the stock step exactly, ours at rate 0.5 is not; the embedded configs are the real ones."""

import pytest
import torch

from storydiff.benchmark import dit_suite
from storydiff.benchmark.dit_suite import PROVIDERS, DiTCase, run_dit_suite


def test_tiny_dit_steps(monkeypatch):
    outputs = {}

    def once(fn, device):  # one step instead of timed repetitions; keep what it computed
        outputs[len(outputs)] = fn()
        return float(len(outputs))

    monkeypatch.setattr(dit_suite, "median_ms", once)
    cases = [
        DiTCase("flux-r0", "flux", 64, frames=3, rate=0.0, text_tokens=5),
        DiTCase("flux-r0.5", "flux", 64, frames=3, rate=0.5, text_tokens=5),
        DiTCase("sd3-r0", "sd3", 64, frames=2, rate=0.0, text_tokens=5),
        DiTCase("sd3-r0.5", "sd3", 64, frames=2, rate=0.5, text_tokens=5),
    ]
    providers = {"flux": ("stock", "ours", "ours_all"), "sd3": ("stock", "ours")}
    rows = run_dit_suite(
        cases, size="tiny", device=torch.device("cpu"), dtype=torch.float32, env={}, providers=providers
    )
    assert [(row["name"], row["provider"]) for row in rows] == [
        (case.name, provider) for case in cases for provider in providers[case.model]
    ]
    assert all(row["status"] == "ok" and row["ms"] > 0 and row["finite"] for row in rows), rows
    assert {row["model"] for row in rows} == {"tiny-flux", "tiny-sd3"}
    by = {(row["name"], row["provider"]): (row, outputs[i]) for i, row in enumerate(rows)}
    for name, batch in (("flux", 3), ("sd3", 4)):  # SD3 batches [uncond; cond]: twice the frames
        stock, stock_out = by[(f"{name}-r0", "stock")]
        assert stock["consistent_layers"] == 0 and stock["ms_vs_stock"] == 1.0
        assert stock_out.shape[0] == batch
        for provider in providers[name]:
            row, out = by[(f"{name}-r0", provider)]
            assert torch.equal(out, stock_out), provider  # rate 0 borrows nothing: the stock step
            assert row["ms_vs_stock"] == pytest.approx(row["ms"] / stock["ms"])
        ours, ours_out = by[(f"{name}-r0.5", "ours")]
        assert ours["consistent_layers"] > 0 and ours["text_tokens"] == 5
        assert not torch.allclose(ours_out, by[(f"{name}-r0.5", "stock")][1])
    flux_layers = {row["provider"]: row["consistent_layers"] for row in rows if row["name"] == "flux-r0"}
    assert flux_layers == {"stock": 0, "ours": 2, "ours_all": 3}  # tiny-flux: 1 double + 2 single blocks
    assert "ms/step" in dit_suite.format_dit_table(rows)


def test_embedded_configs_are_the_real_architectures():
    """The GPU path on the meta device: the real configs built in bf16, the 1024² inputs run a stock step
    (shapes only), and the layer presets pick FLUX-dev's 38 single / 19 double blocks."""
    from storydiff.consistency.config import ConsistencyConfig
    from storydiff.families.attach import apply_consistent_attention, remove_consistent_attention

    meta = torch.device("meta")
    flux, sd35 = (
        dit_suite.build_transformer(model, "full", meta, torch.bfloat16) for model in ("flux", "sd3")
    )
    assert sum(p.numel() for p in flux.parameters()) == 11_901_408_320  # FLUX.1-dev's published count
    assert sum(p.numel() for p in sd35.parameters()) == 8_056_627_520  # published as "8.1 B"
    assert {p.dtype for model in (flux, sd35) for p in model.parameters()} == {torch.bfloat16}
    assert (len(flux.transformer_blocks), len(flux.single_transformer_blocks)) == (19, 38)
    assert (len(sd35.transformer_blocks), sd35.inner_dim) == (38, 38 * 64)
    for transformer, case, shape in [
        (flux, dit_suite.gpu_cases(("flux",))[0], (4, 4096, 64)),  # 4 frames, 64² packed tokens
        (sd35, dit_suite.gpu_cases(("sd3",))[0], (8, 16, 128, 128)),  # [uncond; cond], 128² latents
    ]:
        inputs = dit_suite.transformer_inputs(transformer, case, meta, torch.bfloat16)
        with torch.no_grad():
            assert transformer(**inputs)[0].shape == shape
    layers = {}
    for provider, preset in dit_suite.LAYERS.items():
        if preset is not None:
            layers[provider] = len(apply_consistent_attention(flux, ConsistencyConfig(layers=preset)).layers)
            remove_consistent_attention(flux)
    assert layers == {"ours": 38, "ours_double": 19, "ours_all": 57}
    assert set(PROVIDERS) == set(dit_suite.TEXT_TOKENS) == {"flux", "sd3", "wan", "wan14b"}


def test_bench_cli_dit_suite_writes_rows_and_plot(tmp_path, monkeypatch, capsys):
    import json

    import storydiff.benchmark.results as results
    from storydiff.cli import main

    monkeypatch.setattr(dit_suite, "median_ms", lambda fn, device: 2.0)  # no timed repetitions
    monkeypatch.setattr(
        dit_suite, "cpu_cases", lambda models: [DiTCase("tiny", "flux", 64, 2, text_tokens=3)]
    )
    figures, rows_figure = [], results.rows_figure
    monkeypatch.setattr(
        results, "rows_figure", lambda *a, **k: figures.append(rows_figure(*a, **k)) or figures[-1]
    )
    assert main(["bench", "--suite", "dit", "--model", "flux", "--out", str(tmp_path)]) == 0
    (json_path,) = tmp_path.glob("dit-tiny-flux_*.json")
    rows = json.loads(json_path.read_text())
    assert [row["provider"] for row in rows] == list(PROVIDERS["flux"])
    assert all(row["status"] == "ok" and row["ms_vs_stock"] == 1.0 and row["torch"] for row in rows)
    assert json_path.with_suffix(".png").read_bytes()[:4] == b"\x89PNG"
    ms, ratio = figures[0].axes  # ms per step, and the ratio to stock, one bar per provider
    assert ms.get_ylabel() == results.DIT_PANELS[0][1]
    assert ratio.get_ylabel() == results.DIT_PANELS[1][1]
    assert results.panels_for(rows) == results.DIT_PANELS  # plot_results.py redraws with these
    assert results.panels_for([{"tflops": 1.0}]) == results.OP_PANELS
    assert results.panels_for([{"ms": 1.0, "bank_gib_total": 1.0}]) == results.UNET_PANELS
    assert "x stock" in capsys.readouterr().out
