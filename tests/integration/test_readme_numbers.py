"""The README's worked numbers come from the code's formula functions, and its measured numbers from the files
under ``benchmarks/results/`` it names: each number is rendered here and must appear in README.md as written
(whitespace-insensitive), so neither can drift from its source."""

from __future__ import annotations

import json
import re
from collections import Counter
from math import isqrt
from pathlib import Path

import pytest
import torch

from storydiff.runs.distributed import (
    bank_bytes_per_character_step,
    bank_bytes_per_step,
    halo_bytes_per_frame,
    halo_bytes_per_layer,
    halo_bytes_per_step,
    shot_tokens,
    transfer_seconds,
    video_bank_bytes_per_step,
)

ROOT = Path(__file__).resolve().parents[2]
RESULTS = ROOT / "benchmarks" / "results"
MiB, GiB = 2**20, 2**30
NVLINK = 450e9  # bytes/s, one direction (H100 NVLink 4: 900 GB/s both ways)
GBIT = 1e9 / 8  # bytes/s per Gb/s

RATE = 0.5


def _layers(levels) -> list[tuple[int, int, int]]:
    """(heads, samples, head_dim) per consistent layer."""
    return [(heads, round(RATE * tokens), dim) for count, tokens, heads, dim in levels for _ in range(count)]


def _g(value: float, digits: int) -> str:
    """``value`` to ``digits`` significant digits, as the README writes it (no trailing zeros dropped)."""
    decimals = max(0, digits - 1 - int(f"{value:e}".split("e")[1]))
    return f"{value:.{decimals}f}"


def _default_levels(family: str, config: dict, side: int) -> list[tuple[int, int, int, int]]:
    """(layers, tokens, heads, head_dim) per level of ``family``'s default consistent layers on the real
    architecture ``config`` (built on the meta device: no weights), at ``side``² pixels, finest level last."""
    from storydiff.consistency.config import ConsistencyConfig
    from storydiff.consistency.install import install
    from storydiff.families.registry import family_named

    family_class = family_named(family)
    with torch.device("meta"):
        denoiser = family_class.denoiser_class(**config)
    state = install(family_class.host(denoiser), ConsistencyConfig())
    counts = Counter((layer.level, *state.host["layers"][layer.name]) for layer in state.layers)
    return [
        (count, (side // level) ** 2, heads, dim)
        for (level, heads, dim), count in sorted(counts.items())[::-1]
    ]


@pytest.fixture(scope="module")
def sdxl() -> list[tuple[int, int, int, int]]:
    """SDXL 1024²: the default layers are the up blocks' (30 at 1/32, 1280 channels; 6 at 1/16, 640)."""
    from storydiff.families.tiny_models import SDXL_UNET_CONFIG

    return _default_levels("unet", SDXL_UNET_CONFIG, 1024)


@pytest.fixture(scope="module")
def flux() -> list[tuple[int, int, int, int]]:
    """FLUX.1-dev 1024²: the default layers are the 38 single-stream blocks (4096 tokens, 24 heads × 128)."""
    from storydiff.families.tiny_models import FLUX_DEV_CONFIG

    return _default_levels("flux", FLUX_DEV_CONFIG, 1024)


def test_model_geometry(readme, sdxl, flux):
    assert sdxl == [(30, 1024, 20, 64), (6, 4096, 10, 64)] and flux == [(38, 4096, 24, 128)]
    (n32, t32, h32, d32), (n16, t16, h16, d16) = sdxl
    expect(
        readme,
        f"the up blocks' {n32} layers at {t32} tokens × {h32 * d32} and {n16} at {t16} × {h16 * d16} give",
    )
    ((n, t, h, d),) = flux
    expect(
        readme, f"FLUX 1024² ({n} single-stream layers, {h} heads × {d} = {h * d} channels, {t} image tokens"
    )


@pytest.fixture(scope="module")
def readme() -> str:
    return " ".join((ROOT / "README.md").read_text().split())


def expect(readme: str, phrase: str) -> None:
    phrase = " ".join(phrase.split())
    assert phrase in readme, f"README.md does not say: {phrase!r}"


def test_window_mode_traffic(readme, sdxl, flux):
    """ "Traffic in window mode": per frame, per step for an interior and an end rank of a 3-rank story
    (window 2: two frames cross each boundary each way), all ranks together, and the NVLink time."""
    active, world, window = [True] * 9, 3, 2  # three ranks of three frames: rank 1 is interior
    per_frame = {
        tokens: halo_bytes_per_frame(groups=2, heads=h, samples=round(RATE * tokens), head_dim=d, itemsize=2)
        for _, tokens, h, d in sdxl
    }
    (_, t32, h32, d32), (_, t16, h16, d16) = sdxl
    expect(
        readme,
        f"a 1/{1024 // isqrt(t32)} layer ({t32} tokens, {h32 * d32} channels, S = {round(RATE * t32)}) sends "
        f"{per_frame[t32] // MiB} MiB per frame",
    )
    expect(
        readme,
        f"a 1/{1024 // isqrt(t16)} layer ({t16} tokens, {h16 * d16} channels, S = {round(RATE * t16)}) "
        f"{per_frame[t16] // MiB} MiB",
    )
    assert all(nbytes % MiB == 0 for nbytes in per_frame.values())  # whole MiB, as written
    interior = halo_bytes_per_step(active, world, window, _layers(sdxl), groups=2, itemsize=2, rank=1)
    end = halo_bytes_per_step(active, world, window, _layers(sdxl), groups=2, itemsize=2, rank=0)
    sum_text = " + ".join(f"{n} × {per_frame[t] // MiB}" for n, t, _, _ in sdxl)
    expect(readme, f"2 × 2 × ({sum_text}) MiB = {interior // MiB} MiB per step")
    expect(readme, f"an end rank {end // MiB} MiB")

    ((_, tokens, heads, dim),) = flux
    flux_frame = halo_bytes_per_frame(
        groups=1, heads=heads, samples=round(RATE * tokens), head_dim=dim, itemsize=2
    )
    flux_layers = _layers(flux)
    interior = halo_bytes_per_step(active, world, window, flux_layers, groups=1, itemsize=2, rank=1)
    total = halo_bytes_per_step(active, world, window, flux_layers, groups=1, itemsize=2)
    assert interior == 2 * 2 * len(flux_layers) * flux_frame and total == 2 * interior
    assert total == sum(
        halo_bytes_per_step(active, world, window, flux_layers, groups=1, itemsize=2, rank=r)
        for r in range(world)
    )
    expect(readme, f"{flux_frame // MiB} MiB per frame and layer")
    expect(
        readme,
        f"{_g(interior / GiB, 3)} GiB per step for an interior rank "
        f"(2 × 2 × {len(flux_layers)} × {flux_frame // MiB} MiB",
    )
    expect(readme, f"all three ranks of a 3-rank story send {_g(total / GiB, 3)} GiB together")
    expect(readme, f"{_g(transfer_seconds(interior, NVLINK) * 1e3, 2)} ms at NVLink's 450 GB/s")


def test_halo_step_is_the_sum_of_its_layers():
    active = [True, False, True, True, True, False, True]
    layers = [(2, 3, 4), (1, 5, 8)]
    for rank in (None, 0, 1, 2):
        assert halo_bytes_per_step(active, 3, 1, layers, groups=2, itemsize=4, rank=rank) == sum(
            halo_bytes_per_layer(
                active, 3, 1, groups=2, heads=h, samples=s, head_dim=d, itemsize=4, rank=rank
            )
            for h, s, d in layers
        )


def test_bank_mode_traffic(readme, sdxl):
    """ "Traffic and compute in bank mode": one character's bank per step (2 identity frames), over NVLink and
    over a 400 Gb/s link."""
    per_character = bank_bytes_per_character_step(_layers(sdxl), groups=2, identity_frames=2, itemsize=2)
    per_layer = [
        2 * halo_bytes_per_frame(groups=2, heads=h, samples=round(RATE * t), head_dim=d, itemsize=2) // MiB
        for _, t, h, d in sdxl
    ]
    expect(
        readme,
        f"{per_character // MiB} MiB per character and step ({sdxl[0][0]} × {per_layer[0]} MiB at 1/32 + "
        f"{sdxl[1][0]} × {per_layer[1]} MiB at 1/16",
    )
    nvlink = transfer_seconds(per_character, NVLINK) * 1e3
    link = transfer_seconds(per_character, 400 * GBIT) * 1e3
    expect(readme, f"{_g(nvlink, 2)} ms at NVLink's 450 GB/s or {_g(link, 2)} ms over a 400 Gb/s link")


def test_identity_bank_memory(readme, sdxl):
    """ "Identity-bank memory": Σ N·C, the table (per step; whole run of 50 steps, 49 after 1 warm-up step for
    the stored schedule, one step for lockstep) and the broadcast times."""
    levels = [(n, tokens, heads * dim) for n, tokens, heads, dim in sdxl]
    expect(readme, f"Σ N·C = {sum(n * t * c for n, t, c in levels):,}")
    layers = [(t, c) for n, t, c in levels for _ in range(n)]

    def step(keeps: str) -> int:
        return bank_bytes_per_step(layers, keeps=keeps, frames=4, groups=2, rate=RATE, itemsize=2)

    def gib(nbytes: int, decimals: int) -> str:
        return f"{nbytes / GiB:.{decimals}f} GiB"

    expect(readme, f"| official A | {gib(step('official_a'), 2)} | {gib(50 * step('official_a'), 1)} |")
    expect(readme, f"| official B | {gib(step('official_b'), 2)} | {gib(50 * step('official_b'), 1)} |")
    expect(
        readme, f"| ours, stored (1 warm-up step) | {gib(step('ours'), 2)} | {gib(49 * step('ours'), 1)} ("
    )
    expect(readme, f"| ours, lockstep | {gib(step('ours'), 2)} | **{gib(step('ours'), 2)}** —")
    ours = step("ours")
    expect(
        readme,
        f"({gib(ours, 2)} per step in the example: {_g(transfer_seconds(ours, NVLINK) * 1e3, 2)} ms at "
        f"NVLink's 450 GB/s, {_g(transfer_seconds(ours, 200 * GBIT) * 1e3, 2)} ms over 200 Gb/s InfiniBand, "
        f"{_g(transfer_seconds(ours, 1 * GBIT), 2)} s over 1 GbE",
    )


def test_wan_bank_memory(readme):
    """ "Identity-bank memory", Wan: tokens per shot, and the table for the real Wan 2.1 configs (built on the
    meta device: their consistent layers, heads and head dims) at 480p, 81 frames, rate 0.1, 4 identity
    shots, 50 steps (49 banked after the warm-up step under the stored schedule); and the op suite's official
    A estimate the Benchmarks section quotes."""
    from storydiff.benchmark.dit_suite import WAN_1_3B_CONFIG, WAN_14B_CONFIG
    from storydiff.benchmark.op_suite import estimated_bytes, wan_cases
    from storydiff.consistency.config import ConsistencyConfig
    from storydiff.consistency.install import install
    from storydiff.families.wan import WanFamily, latent_frames

    tokens = shot_tokens(81, 480, 832)
    expect(readme, f"81 frames at 832 × 480 are {latent_frames(81)} × {480 // 16} × {832 // 16} = {tokens:,}")
    expect(readme, f"at 1280 × 720, {shot_tokens(81, 720, 1280):,})")
    expect(readme, f"rate 0.1 ({round(0.1 * tokens):,} sampled tokens per shot)")
    warmup = ConsistencyConfig().warmup_steps
    for name, config in (("Wan-1.3B", WAN_1_3B_CONFIG), ("Wan-14B", WAN_14B_CONFIG)):
        with torch.device("meta"):
            transformer = WanFamily.denoiser_class(**config)
        state = install(WanFamily.host(transformer), ConsistencyConfig())
        ((heads, dim),) = {tuple(state.host["layers"][layer.name]) for layer in state.layers}
        layers = len(state.layers)

        shape = {"layers": layers, "heads": heads, "head_dim": dim, "shot_frames": 81, "height": 480}
        per_shot, four = (
            video_bank_bytes_per_step(**shape, width=832, shots=shots, rate=0.1) for shots in (1, 4)
        )
        assert four == 4 * per_shot == layers * 2 * 2 * 4 * round(0.1 * tokens) * heads * dim * 2
        expect(
            readme,
            f"| {name} ({layers} layers, {heads} heads × {dim}) | {per_shot / GiB:.2f} GiB | "
            f"{four / GiB:.2f} GiB | {(50 - warmup) * four / GiB:.1f} GiB |",
        )
    official_a = estimated_bytes(wan_cases()[0], "official_a", 2)
    expect(readme, f"(official A at Wan-1.3B needs about {official_a / GiB:.0f} GiB in bf16)")


def test_bank_formula_matches_the_traffic_formula():
    """Our bank (sampled K and V) per step is what bank mode sends per character and step, over its frames."""
    layers = [(64, 32), (256, 16)]  # (tokens, channels); 4 heads of 8 and 2 heads of 8
    ours = bank_bytes_per_step(layers, keeps="ours", frames=3, groups=2, rate=0.25, itemsize=2)
    assert ours == bank_bytes_per_character_step(
        [(4, 16, 8), (2, 64, 8)], groups=2, identity_frames=3, itemsize=2
    )
    assert (
        bank_bytes_per_step(layers, keeps="official_b", frames=3, groups=2, rate=0.25, itemsize=2) * 2 == ours
    )


def test_distributed_measurements(readme):
    """The "Measured" table of "Several GPUs" is the stored dist run, row by row."""
    name = "dist-tiny-sd15_cpu_20261202-013852"
    expect(readme, f"`benchmarks/results/{name}.*`")
    rows = json.loads((RESULTS / f"{name}.json").read_text())
    labels = {"window": "window", "bank-recompute": "bank", "bank-broadcast": "bank, broadcast (default)"}
    fpm = {}
    for row in rows:
        label = labels[row["mode"]]
        if row["mode"] == "bank-recompute" and row["ranks"] > 1:
            label = "bank, recompute"
        traffic = row["halo_bytes_sent"] or row["bank_bytes_received"]
        kind = " (halo)" if row["halo_bytes_sent"] else " (banks)"
        traffic_text = f"{traffic / MiB:.2f} MiB{kind}" if traffic else "0"
        expect(
            readme,
            f"| {label} | {row['ranks']} | {row['frames_per_minute']:.0f} | "
            f"{row['peak_bytes_per_rank'] / MiB:.0f} MiB | {traffic_text} |",
        )
        fpm[label] = row["frames_per_minute"]
    faster = fpm["bank, broadcast (default)"] / fpm["bank, recompute"] - 1
    expect(readme, f"Broadcast is {faster:.0%} faster than recompute here")


def _instr(value: float) -> str:
    return f"{value:.0f}"


def test_kernel_inspection_numbers(readme):
    """The static numbers of "How it is built": the Triton 3.9 table, the sm_90 pointer kernel at 128x64x8x2,
    Triton 3.6's descriptor path, and the pruned space's size — each from the stored inspect file the README
    names."""
    defaults = json.loads((RESULTS / "inspect_defaults_triton3.9.0.json").read_text())
    assert "`benchmarks/results/inspect_*`" in readme
    for row in defaults:
        if row["dtype"] != "float16":
            continue
        path = {"tma": "descriptors", "pointer": "pointers"}[row["path"]]
        load = row["load"]
        expect(
            readme,
            f"| {path}, sm_{row['arch']} | {row['head_dim']} | {row['config']} | {row['registers']} | "
            f"{row['spill_bytes']} | {row['shared_bytes'] // 1024} KiB | {load} | {row['mma']} | "
            f"{_instr(row['instr_per_1k_scores'])} |",
        )
    pairs = {(r["dtype"], r["arch"], r["head_dim"]): r for r in defaults}
    for (dtype, arch, hd), row in pairs.items():  # fp16 = bf16, as the table says
        if dtype == "bfloat16":
            twin = pairs[("float16", arch, hd)]
            assert {k: v for k, v in row.items() if k != "dtype"} == {
                k: v for k, v in twin.items() if k != "dtype"
            }

    before = "inspect_sm90-pointer-128x64x8x2_triton3.9.0.json"
    expect(readme, f"`benchmarks/results/{before}`")
    rows = {r["head_dim"]: r for r in json.loads((RESULTS / before).read_text())}
    assert {(r["arch"], r["path"], r["config"]) for r in rows.values()} == {(90, "pointer", "128x64x8x2")}
    expect(
        readme,
        f"{rows[64]['instr_per_1k_scores']} (hd64) and {rows[128]['instr_per_1k_scores']} (hd128) "
        "instructions per 1,000 scores",
    )

    expect(readme, "`benchmarks/results/inspect_defaults_triton3.6.0.json`")
    tma36 = {
        r["head_dim"]: r
        for r in json.loads((RESULTS / "inspect_defaults_triton3.6.0.json").read_text())
        if r["arch"] == 90 and r["path"] == "tma"
    }
    assert all(r["spill_bytes"] == 0 and (r["load"], r["mma"]) == ("TMA", "wgmma") for r in tma36.values())
    expect(
        readme,
        f"the descriptor path compiles to {_instr(tma36[64]['instr_per_1k_scores'])} / "
        f"{_instr(tma36[128]['instr_per_1k_scores'])}, no spills, TMA + wgmma",
    )

    pruned_name = "inspect_pruned_sm90-tma_sm89-pointer_fp16-bf16_triton3.9.0.json"
    expect(readme, "`benchmarks/results/inspect_pruned_*.json`")
    assert [p.name for p in RESULTS.glob("inspect_pruned_*.json")] == [pruned_name]
    pruned = json.loads((RESULTS / pruned_name).read_text())
    assert all(r["spill_bytes"] == 0 for r in pruned)
    expect(readme, f"all {len(pruned)} configs it keeps")


def test_every_results_file_the_readme_names_exists(readme):
    names = re.findall(r"benchmarks/results/([\w.*+-]+)", readme)
    assert names
    for name in names:
        assert list(RESULTS.glob(name)), f"README.md names benchmarks/results/{name}, which is not stored"


def test_warp_specialization_claim(readme):
    """Triton applies warp specialization on sm_100 and not on sm_90 (same registers and loops), as stored."""
    name = "inspect_warp_specialize_sm90-sm100_triton3.9.0.json"
    expect(readme, f"`benchmarks/results/{name}`")
    expect(readme, "Triton 3.9 applies it on sm_100 and ignores it on sm_90")
    rows = {
        (r["arch"], r["head_dim"], r["warp_specialize"]): r for r in json.loads((RESULTS / name).read_text())
    }
    assert {arch for arch, _, _ in rows} == {90, 100}
    for arch, head_dim, asked in rows:
        assert rows[(arch, head_dim, asked)]["warp_specialized"] == (asked and arch >= 100)
        if arch == 90 and asked:
            plain = rows[(90, head_dim, False)]
            assert (rows[(90, head_dim, True)]["registers"], rows[(90, head_dim, True)]["loops"]) == (
                plain["registers"],
                plain["loops"],
            )


def test_settings_numbers(readme):
    """The settings the README quotes are the code's defaults: the official preset, the app's layer skipping,
    window mode's default window."""
    from storydiff.consistency.config import WINDOW_MODE_WINDOW, ConsistencyConfig
    from storydiff.runs.settings import PRESETS

    preset = PRESETS["official"]
    s1, s2, b1, b2 = preset["freeu"]
    expect(
        readme,
        f"FreeU (s1 {s1}, s2 {s2}, b1 {b1}, b2 {b2}), {preset['height']} × {preset['width']}, guidance "
        f"{preset['guidance_scale']:g}, {preset['num_inference_steps']} steps, "
        f"{'one' if preset['id_frames'] == 1 else preset['id_frames']} identity frame",
    )
    config = ConsistencyConfig()
    expect(
        readme,
        f"{config.skip_prob_early * 100:.0f} % of layer calls before step {config.skip_switch_step}, "
        f"{config.skip_prob_late * 100:.0f} % after",
    )
    expect(readme, f"`--window` frames (default {WINDOW_MODE_WINDOW},")
