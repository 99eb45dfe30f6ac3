"""``storydiff profile-vram`` on diffusion transformers: tiny-flux end to end on the CPU (host memory), the
official modes left out or refused, FLUX's size multiple, and ``random-flux`` (the real FLUX.1-dev transformer
and VAE for the GPU profile) checked on the meta device, never allocated."""

import json

import pytest
import torch

from storydiff.benchmark.vram import MODES, OFFICIAL_MODES, profile_story_lengths
from storydiff.cli import main

OURS = [mode for mode in MODES if mode not in OFFICIAL_MODES]


def test_profile_vram_on_tiny_flux(tmp_path, capsys):
    out_dir = tmp_path / "out"
    args = [
        "profile-vram",
        "--model",
        "tiny-flux",
        "--out",
        str(out_dir),
        "--lengths",
        "2,3",
        "--id-frames",
        "2",
    ]
    # three steps: with one warm-up step, the stored schedule keeps two steps' banks, lockstep one
    assert main([*args, "--steps", "3"]) == 0
    out = capsys.readouterr().out
    notes = [line for line in out.splitlines() if "left out" in line]
    assert notes == [
        "tiny-flux is a flux transformer: official_a and official_b left out "
        "(the official code has UNet processors only)"
    ]
    (json_path,) = out_dir.glob("vram-tiny-flux_*[0-9].json")
    rows = json.loads(json_path.read_text())
    assert [(row["mode"], row["frames"]) for row in rows] == [(mode, n) for mode in OURS for n in (2, 3)]
    assert all(
        row["status"] == "ok" and row["source"] == "host-rss" and row["peak_bytes"] > 0 for row in rows
    )
    # the family's own default size (tiny-flux: 64²), its name, the steps asked for
    assert {(row["family"], row["model"], row["resolution"], row["steps"]) for row in rows} == {
        ("flux", "tiny-flux", 64, 3)
    }
    bank = {(row["mode"], row["frames"]): row["bank_peak_bytes"] for row in rows}
    for n in (2, 3):
        assert 0 < bank[("ours_lockstep", n)] < bank[("ours", n)] == bank[("ours_offload", n)]
        assert bank[("window", n)] == bank[("window_unchunked", n)] == 0  # window mode keeps no bank
    assert "bank alive" in out and "KiB" in out
    timeline = json.loads(json_path.with_name(json_path.stem + "_timeline.json").read_text())
    assert set(timeline) == set(OURS) and timeline["ours_lockstep"]
    assert json_path.with_suffix(".csv").read_text().startswith("mode,frames,")
    for suffix in ("_timeline.png", "_peak.png"):
        assert json_path.with_name(json_path.stem + suffix).read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize("modes", ["official_a", "ours,official_b", "official_a,official_b"])
def test_profile_vram_refuses_official_modes_on_a_transformer(tmp_path, capsys, modes):
    out_dir = tmp_path / "out"
    assert main(["profile-vram", "--model", "tiny-flux", "--modes", modes, "--out", str(out_dir)]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""  # refused before anything ran (no memory probe, no model)
    (line,) = captured.err.splitlines()
    asked = [m for m in modes.split(",") if m.startswith("official")]
    assert line.startswith(
        f"error: {', '.join(asked)} need a UNet model and tiny-flux is a diffusion transformer"
    )
    assert not out_dir.exists()


def test_profile_vram_refuses_official_modes_on_a_transformer_folder(tmp_path, capsys, monkeypatch):
    """A local folder's model_index.json tells the family before loading; a hub id is refused once loaded."""
    import storydiff.models.loading as loading
    from storydiff.families.tiny_models import build_tiny_pipeline

    folder = tmp_path / "flux-model"
    folder.mkdir()
    index = {"_class_name": "FluxPipeline", "transformer": ["diffusers", "FluxTransformer2DModel"]}
    (folder / "model_index.json").write_text(json.dumps(index))
    out_dir = tmp_path / "out"
    assert main(["profile-vram", "--model", str(folder), "--modes", "official_b", "--out", str(out_dir)]) == 2
    assert "official_b need a UNet model" in capsys.readouterr().err

    loaded = build_tiny_pipeline("tiny-flux", progress_bar=False)
    monkeypatch.setattr(loading, "load_pipeline", lambda *a, **k: loaded)  # a hub id, as if downloaded
    assert main(["profile-vram", "--model", "org/flux", "--modes", "official_a", "--out", str(out_dir)]) == 2
    captured = capsys.readouterr()
    (line,) = captured.err.splitlines()
    assert line.startswith(
        "error: official_a need a UNet model and org/flux (flux) is a diffusion transformer"
    )
    assert not out_dir.exists()


def test_profile_vram_checks_the_family_size_multiple(tmp_path, capsys):
    out_dir = tmp_path / "out"
    args = ["profile-vram", "--model", "tiny-flux", "--size", "72", "--modes", "ours", "--out", str(out_dir)]
    assert main(args) == 2  # 72 is a multiple of 8 but not of FLUX's 16 (VAE factor x 2x2 packing)
    assert capsys.readouterr().err.strip() == "error: --size must be a multiple of 16 for flux, got 72"
    assert not out_dir.exists()


def test_profile_story_lengths_refuses_official_modes_without_a_unet():
    from storydiff.families.tiny_models import build_tiny_pipeline

    pipe = build_tiny_pipeline("tiny-flux", progress_bar=False)
    with pytest.raises(ValueError, match="official_a: the official code has UNet processors only"):
        profile_story_lengths(
            pipe,
            lengths=[2],
            modes=["ours", "official_a"],
            steps=1,
            height=64,
            width=64,
            id_frames=1,
            read_batch=1,
            device=torch.device("cpu"),
        )


def test_random_flux_is_flux_dev_on_the_meta_device():
    """random-flux's structure without allocating it: the loading path builds it in bf16 (its default) on
    meta; the real transformer and VAE, small text encoders whose widths fit the transformer, 1024² by
    default; one 1024² step of two frames with our processors installed runs (shapes only)."""
    from storydiff.consistency.config import ConsistencyConfig
    from storydiff.families.attach import apply_consistent_attention, remove_consistent_attention
    from storydiff.families.registry import family_of
    from storydiff.families.reserved import RESERVED_MODELS
    from storydiff.families.tiny_models import FLUX_DEV_CONFIG
    from storydiff.models.loading import load_pipeline

    assert "random-flux" in RESERVED_MODELS
    pipe = load_pipeline("random-flux", device="meta", progress_bar=False)
    assert torch.get_default_dtype() == torch.float32  # the build's bf16 default dtype does not leak
    modules = {name: c for name, c in pipe.components.items() if isinstance(c, torch.nn.Module)}
    assert {p.device.type for c in modules.values() for p in c.parameters()} == {"meta"}
    assert {p.dtype for c in modules.values() for p in c.parameters()} == {torch.bfloat16}
    count = {name: sum(p.numel() for p in c.parameters()) for name, c in modules.items()}
    assert count["transformer"] == 11_901_408_320  # FLUX.1-dev's published 11.9 B
    assert count["vae"] == 83_819_683  # FLUX.1-dev's VAE
    assert count["text_encoder"] + count["text_encoder_2"] < 10_000_000  # small: not CLIP-L / T5-XXL

    transformer, vae = pipe.transformer, pipe.vae
    assert {k: transformer.config[k] for k in FLUX_DEV_CONFIG} == FLUX_DEV_CONFIG
    assert (len(transformer.transformer_blocks), len(transformer.single_transformer_blocks)) == (19, 38)
    assert pipe.text_encoder.config.hidden_size == transformer.config.pooled_projection_dim == 768
    assert pipe.text_encoder.config.num_hidden_layers == 1
    assert pipe.text_encoder_2.config.d_model == transformer.config.joint_attention_dim == 4096
    assert pipe.text_encoder_2.config.num_layers == 1
    assert vae.config.latent_channels * 4 == transformer.config.in_channels  # 2x2 packing of 16 channels
    assert (vae.config.scaling_factor, vae.config.shift_factor) == (0.3611, 0.1159)
    assert not vae.config.use_quant_conv and not vae.config.use_post_quant_conv
    assert pipe.tokenizer_2.model_max_length == 512  # FLUX-dev's T5 prompt length: the real joint sequence

    family = family_of(pipe)
    assert (family.name, family.default_size, family.multiple) == ("flux", 1024, 16)
    conditioning = family.encode(["a hero", "the hero"], ["", ""], False, 1024, 1024)
    embeds, pooled, _, image_ids = conditioning
    assert (embeds.shape, pooled.shape, image_ids.shape) == ((2, 512, 4096), (2, 768), (4096, 3))
    timesteps = family.set_timesteps(pipe.scheduler, 2, 1024, 1024)
    noise = torch.empty((2, *family.noise_shape(1024, 1024)), device="meta", dtype=torch.bfloat16)
    latents = family.initial_latents(noise, 1024, 1024)
    state = apply_consistent_attention(pipe, ConsistencyConfig())
    try:
        assert len(state.layers) == 38  # FLUX's default layers: the single-stream blocks
        state.begin_joint(2)
        with torch.no_grad():
            out = family.predict(pipe.scheduler, latents, timesteps[0], conditioning, 3.5, False)
            assert out.shape == (2, 4096, 64)
            image = vae.decode(family._to_vae(out[0][None], 1024, 1024), return_dict=False)[0]
        assert image.shape == (1, 3, 1024, 1024)
    finally:
        remove_consistent_attention(pipe)
