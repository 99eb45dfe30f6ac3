"""The Wan 2.x benchmarks on a CPU (the GPU runs them at real size: benchmarks/bench_wan.py).

- op suite: the Wan cases' builder at a scaled-down token grid runs every provider through the correctness
  gate (official A's dense mask over the joined shots, B's per-shot loop, ours); the real-size cases are
  reported as skipped with their memory estimate, without allocating anything;
- DiT suite: one tiny-wan step (two CFG passes) per provider; rate 0 is the stock step exactly; the embedded
  Wan 2.1 configs are the real architectures (meta device: parameter counts, 30 / 40 consistent layers);
- profile-vram: a 2-shot tiny-wan story's bank is ``video_bank_bytes_per_step``, the README's formula;
  ``build_random_wan`` builds the real transformer and VAE (meta device).
"""

import json

import pytest
import torch

from storydiff.benchmark import dit_suite, op_suite
from storydiff.benchmark.dit_suite import DiTCase, run_dit_suite
from storydiff.runs.distributed import shot_tokens, video_bank_bytes_per_step

CPU = torch.device("cpu")
GATED = ["reference", "official_a", "official_b", "ours_torch"]


def test_wan_op_cases_run_at_cpu_size():
    cases = op_suite.cpu_wan_cases()
    assert [(c.frames, c.tokens, c.head_dim, c.cfg, c.rate) for c in cases] == [
        (3, 72, 128, False, rate) for rate in op_suite.WAN_RATES
    ]
    providers = [*GATED, "sdpa_dense"]
    rows = op_suite.run_op_suite(cases, providers, device=CPU, dtype=torch.float32, env={})
    assert [(row["name"], row["provider"]) for row in rows] == [(c.name, p) for c in cases for p in providers]
    assert all(row["status"] == "ok" and row["ms"] > 0 for row in rows), [r["status"] for r in rows]
    assert all(row["max_err"] is not None for row in rows if row["provider"] in GATED)
    assert all("speedup_vs_official_a" in row for row in rows if row["provider"] == "ours_torch")


def test_real_wan_cases_are_skipped_with_their_estimate_on_a_cpu(monkeypatch):
    cases = op_suite.wan_cases()
    assert [(c.name, c.heads, c.tokens, c.frames) for c in cases[::3]] == [
        ("wan1.3b-480p-81f-s3-r0.05", 12, 21 * 30 * 52, 3),
        ("wan14b-480p-81f-s3-r0.05", 40, 21 * 30 * 52, 3),
    ]
    assert cases[0].tokens == shot_tokens(81, 480, 832)
    assert set(cases) <= set(op_suite.gpu_cases())

    def no_inputs(*args, **kwargs):
        raise AssertionError("a skipped case must not allocate its inputs")

    monkeypatch.setattr(op_suite, "make_case_inputs", no_inputs)
    rows = op_suite.run_op_suite(cases[-1:], GATED, device=CPU, dtype=torch.float32, env={})
    assert all(row["status"].startswith("skipped: needs about") for row in rows), rows
    assert all(row["ms"] is None for row in rows)
    # official A's (3·32,760)² mask: 9 GiB of booleans, plus SDPA's additive copies in the run's dtype
    joined = 3 * 32760
    assert op_suite.estimated_bytes(cases[0], "official_a", 2) > joined**2 * 5
    # on a GPU the limit is the free memory
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: (2**30, 80 * 2**30))
    reason = op_suite.skip_reason(cases[0], "official_a", torch.device("cuda"), torch.bfloat16)
    assert reason.startswith("skipped: needs about 48.") and reason.endswith("1.0 GiB free on the GPU")


def test_tiny_wan_step_two_cfg_passes(monkeypatch):
    outputs = []

    def once(fn, device):  # one step instead of timed repetitions; keep what it computed
        outputs.append(fn())
        return float(len(outputs))

    monkeypatch.setattr(dit_suite, "median_ms", once)
    shape = {"text_tokens": 5, "width": 48, "shot_frames": 9}
    cases = [DiTCase("wan-r0", "wan", 32, 3, 0.0, **shape), DiTCase("wan-r0.1", "wan", 32, 3, 0.25, **shape)]
    rows = run_dit_suite(cases, size="tiny", device=CPU, dtype=torch.float32, env={})
    assert [(row["name"], row["provider"], row["model"]) for row in rows] == [
        (case.name, provider, "tiny-wan") for case in cases for provider in ("stock", "ours")
    ]
    assert all(row["status"] == "ok" and row["finite"] for row in rows), rows
    assert [row["consistent_layers"] for row in rows] == [0, 2, 0, 2]  # tiny-wan: 2 blocks' attn1
    stock, ours_r0, stock2, ours = outputs
    assert stock.shape == (2 * 3, 4, 3, 4, 6)  # [uncond; cond] x 3 shots, (C, T, H/8, W/8)
    assert torch.equal(ours_r0, stock)  # rate 0 borrows nothing: the stock step
    assert torch.equal(stock2, stock) and not torch.allclose(ours, stock)


def test_embedded_wan_configs_are_the_real_architectures():
    from storydiff.consistency.config import ConsistencyConfig
    from storydiff.consistency.install import install
    from storydiff.families.wan import WanFamily

    meta = torch.device("meta")
    counts = {}
    for model, params, layers, heads in (("wan", 1_418_996_800, 30, 12), ("wan14b", 14_288_491_584, 40, 40)):
        transformer = dit_suite.build_transformer(model, "full", meta, torch.bfloat16)
        assert sum(p.numel() for p in transformer.parameters()) == params  # published: 1.3 B, 14 B
        state = install(WanFamily.host(transformer), ConsistencyConfig())
        counts[model] = {tuple(state.host["layers"][layer.name]) for layer in state.layers}, len(state.layers)
        assert counts[model] == ({(heads, 128)}, layers)
    case = dit_suite.wan_case("wan")
    assert (case.frames, case.size, case.shot_frames, case.rate) == (3, (480, 832), 81, 0.1)
    transformer = dit_suite.build_transformer("wan", "full", meta, torch.bfloat16)
    inputs = dit_suite.transformer_inputs(transformer, case, meta, torch.bfloat16)
    with torch.no_grad():
        out = dit_suite._step(transformer, inputs, None)()
    assert out.shape == (2 * 3, 16, 21, 60, 104)  # two CFG passes of 3 shots, 21 latent frames of 60 x 104


def test_profile_vram_wan_bank_is_the_formula():
    from storydiff.benchmark.vram import build_random_wan, profile_story_lengths
    from storydiff.families.tiny_models import build_tiny_pipeline

    pipe = build_tiny_pipeline("tiny-wan", progress_bar=False)
    rows, timelines = profile_story_lengths(
        pipe,
        lengths=[2],
        modes=["ours_lockstep"],
        steps=2,
        height=32,
        width=48,
        id_frames=2,
        read_batch=2,
        device=CPU,
        shot_frames=5,
        rate=0.25,
    )
    (row,) = rows
    assert row["status"] == "ok" and row["shot_frames"] == 5 and set(timelines) == {"ours_lockstep"}
    config = pipe.transformer.config  # 2 layers of 2 heads x 24; one step's bank alive (lockstep)
    assert row["bank_peak_bytes"] == video_bank_bytes_per_step(
        layers=config.num_layers,
        heads=config.num_attention_heads,
        head_dim=config.attention_head_dim,
        shot_frames=5,
        height=32,
        width=48,
        shots=2,
        rate=0.25,
        itemsize=4,
    )

    real = build_random_wan("random-wan", torch.device("meta"), torch.bfloat16)
    assert sum(p.numel() for p in real.transformer.parameters()) == 1_418_996_800
    assert (real.vae.config.z_dim, real.text_encoder.config.d_model) == (16, 4096)


@pytest.mark.parametrize("model", ["wan", "wan14b"])
def test_wan_models_have_providers_and_text(model):
    assert dit_suite.PROVIDERS[model] == ("stock", "ours") and dit_suite.TEXT_TOKENS[model] == 512


def test_bench_cli_takes_wan(tmp_path, monkeypatch):
    """`storydiff bench --suite dit --model wan` runs the Wan case (tiny on a CPU) through the CLI."""
    from storydiff.cli import main

    monkeypatch.setattr(dit_suite, "median_ms", lambda fn, device: 2.0)  # no timed repetitions
    assert main(["bench", "--suite", "dit", "--model", "wan", "--out", str(tmp_path)]) == 0
    (json_path,) = tmp_path.glob("dit-tiny-wan_*.json")
    rows = json.loads(json_path.read_text())
    assert [row["provider"] for row in rows] == ["stock", "ours"] and all(
        row["status"] == "ok" for row in rows
    )
