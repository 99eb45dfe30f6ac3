"""Single-file checkpoints and LoRA files through ``load_pipeline`` (tiny models, CPU, a few seconds).

The single files are the tiny pipelines written in the original Stability / LDM layout by
``tests/ldm_format.py``; their ``config`` folders hold configs and tokenizers only, so every weight of a
loaded pipeline must have come from the file.
"""

from __future__ import annotations

import argparse
import copy
import json
import shutil
from pathlib import Path

import huggingface_hub
import pytest
import torch
from diffusers import DiffusionPipeline
from ldm_format import pipeline_to_ldm, write_random_lora, write_single_file
from safetensors.torch import load_file, save_file

from storydiff.families.tiny_models import build_tiny_pipeline
from storydiff.models.loading import ModelLoadError, load_pipeline
from storydiff.models.model_files import parse_lora

TINY = ("tiny-sdxl", "tiny-sd15")


def _config_folder(pipe: DiffusionPipeline, folder: Path) -> Path:
    """``pipe``'s diffusers folder without its weights: configs, scheduler and tokenizers."""
    pipe.save_pretrained(folder)
    for weights in folder.rglob("*.safetensors"):
        weights.unlink()
    return folder


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[DiffusionPipeline, Path, Path]]:
    """Per tiny model: the pipeline (seed 1, so unlike the seed-0 reserved model), its config-only folder
    and its original-format single file."""
    root = tmp_path_factory.mktemp("model_files")
    out = {}
    for name in TINY:
        pipe = build_tiny_pipeline(name, seed=1, progress_bar=False)
        folder = _config_folder(pipe, root / f"{name}-config")
        out[name] = (pipe, folder, write_single_file(pipe, root / f"{name}.safetensors"))
    return out


@pytest.fixture(scope="module")
def stock() -> DiffusionPipeline:
    return build_tiny_pipeline("tiny-sdxl", progress_bar=False)


def _unet_out(unet: torch.nn.Module) -> torch.Tensor:
    """The UNet on fixed random inputs (latents, two timesteps, text, and SDXL's added conditioning)."""
    g = torch.Generator().manual_seed(0)
    config = unet.config
    sample = torch.randn(2, 4, 8, 8, generator=g)
    text = torch.randn(2, 7, config.cross_attention_dim, generator=g)
    kwargs = {}
    if config.addition_embed_type == "text_time":
        pooled = config.projection_class_embeddings_input_dim - 6 * config.addition_time_embed_dim
        added = {
            "text_embeds": torch.randn(2, pooled, generator=g),
            "time_ids": torch.randn(2, 6, generator=g),
        }
        kwargs["added_cond_kwargs"] = added
    with torch.no_grad():
        return unet(sample.to(unet.dtype), torch.tensor([10, 500]), text.to(unet.dtype), **kwargs).sample


# -- single files ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", TINY)
def test_single_file_loads_every_weight(files: dict, name: str) -> None:
    pipe, folder, path = files[name]
    loaded = load_pipeline(str(path), config=str(folder), progress_bar=False)
    assert type(loaded) is type(pipe)
    components = ("unet", "vae", "text_encoder", "text_encoder_2")
    for component in (c for c in components if getattr(pipe, c, None) is not None):
        expected, got = getattr(pipe, component).state_dict(), getattr(loaded, component).state_dict()
        assert got.keys() == expected.keys(), component
        assert all(torch.equal(got[k], expected[k]) for k in expected), component
    # Equal weights, but read from a memory-mapped file: their alignment can pick other CPU kernels, whose
    # summation order differs in the last bits.
    torch.testing.assert_close(_unet_out(loaded.unet), _unet_out(pipe.unet), atol=1e-6, rtol=1e-5)


def test_single_file_dtype(files: dict) -> None:
    pipe, folder, path = files["tiny-sd15"]
    loaded = load_pipeline(path, config=folder, dtype=torch.bfloat16, progress_bar=False)
    assert loaded.unet.dtype == loaded.vae.dtype == loaded.text_encoder.dtype == torch.bfloat16
    assert torch.equal(loaded.unet.conv_in.weight, pipe.unet.conv_in.weight.to(torch.bfloat16))


def test_pickled_checkpoints(files: dict, tmp_path: Path) -> None:
    """.ckpt files load through torch.load(weights_only=True): plain tensors (nested under "state_dict", as
    training checkpoints have them) do, a pickle holding other objects is refused."""
    pipe, folder, _ = files["tiny-sd15"]
    torch.save({"state_dict": pipeline_to_ldm(pipe), "global_step": 7}, tmp_path / "model.ckpt")
    loaded = load_pipeline(tmp_path / "model.ckpt", config=folder, progress_bar=False)
    expected = pipe.unet.state_dict()
    assert all(torch.equal(loaded.unet.state_dict()[k], v) for k, v in expected.items())
    unsafe = {"state_dict": pipeline_to_ldm(pipe), "args": argparse.Namespace(lr=1)}
    torch.save(unsafe, tmp_path / "unsafe.ckpt")
    with pytest.raises(ModelLoadError, match=r"unsafe\.ckpt.*holds more than tensors.*to \.safetensors"):
        load_pipeline(tmp_path / "unsafe.ckpt", config=folder)


def test_transformer_file_with_config(tmp_path: Path) -> None:
    """FLUX: the transformer from the file (diffusers key layout here), everything else from ``config``."""
    base, other = build_tiny_pipeline("tiny-flux"), build_tiny_pipeline("tiny-flux", seed=1)
    base.save_pretrained(tmp_path / "flux")
    save_file(other.transformer.state_dict(), tmp_path / "flux.safetensors")
    loaded = load_pipeline(tmp_path / "flux.safetensors", config=tmp_path / "flux", progress_bar=False)
    for component, source in (("transformer", other), ("text_encoder", base), ("vae", base)):
        expected, got = getattr(source, component).state_dict(), getattr(loaded, component).state_dict()
        assert all(torch.equal(got[k], expected[k]) for k in expected), component


def _edit(path: Path, target: Path, change) -> Path:
    """A copy of the single file at ``path`` with its state dict passed through ``change``."""
    save_file(change(load_file(path)), target)
    return target


def test_single_file_errors(files: dict, tmp_path: Path) -> None:
    _, xl_folder, xl_path = files["tiny-sdxl"]
    _, _, sd_path = files["tiny-sd15"]
    cases = {
        "no such file": (tmp_path / "missing.safetensors", xl_folder),
        "it is a StableDiffusionPipeline checkpoint but config .* is a StableDiffusionXLPipeline": (
            sd_path,
            xl_folder,
        ),
        r"no UNet weights under model\.diffusion_model\.\*": (
            _edit(xl_path, tmp_path / "other.safetensors", lambda sd: {"w": torch.ones(3)}),
            xl_folder,
        ),
        "lacks weights the StableDiffusionXLPipeline architecture": (
            _edit(
                xl_path,
                tmp_path / "partial.safetensors",
                lambda sd: {k: v for k, v in sd.items() if "out.2" not in k},
            ),
            xl_folder,
        ),
        r"not a readable checkpoint \(": (tmp_path / "text.safetensors", xl_folder),
        "is not a diffusers folder": (xl_path, tmp_path),
        "is not a folder": (xl_path, tmp_path / "nothing-here"),
        "architecture is unknown; pass --config DIR": (
            _edit(
                xl_path,
                tmp_path / "unet-only.safetensors",
                lambda sd: {k: v for k, v in sd.items() if k.startswith("model.")},
            ),
            None,
        ),
    }
    (tmp_path / "text.safetensors").write_text("not a checkpoint")
    for message, (path, folder) in cases.items():
        with pytest.raises(ModelLoadError, match=message) as info:
            load_pipeline(path, config=folder, progress_bar=False)
        text = str(info.value)
        assert "\n" not in text and Path(path).name in text, text


def test_config_of_another_family(files: dict, tmp_path: Path) -> None:
    _, folder, path = files["tiny-sdxl"]
    pixart = shutil.copytree(folder, tmp_path / "pixart")
    index = json.loads((pixart / "model_index.json").read_text())
    (pixart / "model_index.json").write_text(json.dumps({**index, "_class_name": "PixArtSigmaPipeline"}))
    with pytest.raises(
        ModelLoadError, match=r"single files load for SD1\.x/2\.x and SDXL .*PixArtSigmaPipeline"
    ):
        load_pipeline(path, config=pixart)


def test_config_needs_a_single_file(files: dict) -> None:
    _, folder, _ = files["tiny-sdxl"]
    with pytest.raises(ModelLoadError, match=r"applies to single-file checkpoints .* 'tiny-sdxl' is not one"):
        load_pipeline("tiny-sdxl", config=folder)


def test_offline_without_config(files: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # diffusers infers the base model from the keys and asks the hub for its configs: offline, with an empty
    # cache, that must end in the --config hint (set both, so a machine with a network behaves the same).
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    _, _, path = files["tiny-sdxl"]
    with pytest.raises(
        ModelLoadError, match=r"cannot be reached from here; pass --config DIR, a local diffusers"
    ):
        load_pipeline(path)


# -- LoRA --------------------------------------------------------------------------------------------------


def _merged(unet: torch.nn.Module, loras: list[tuple[dict, float]]) -> torch.nn.Module:
    """An independent reference: each LoRA's scale · B @ A added to a copy's weights."""
    unet = copy.deepcopy(unet)
    modules = dict(unet.named_modules())
    with torch.no_grad():
        for factors, scale in loras:
            for name, (a, b) in factors.items():
                modules[name].weight += scale * (b @ a)
    return unet


@pytest.fixture(scope="module")
def loras(stock: DiffusionPipeline, tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, dict]]:
    root = tmp_path_factory.mktemp("loras")
    sd15 = build_tiny_pipeline("tiny-sd15", progress_bar=False).unet
    made = {"a": (stock.unet, 1, 2), "b": (stock.unet, 2, 4), "sd15": (sd15, 3, 2)}
    return {
        name: (
            root / f"{name}.safetensors",
            write_random_lora(unet, root / f"{name}.safetensors", seed, rank),
        )
        for name, (unet, seed, rank) in made.items()
    }


def test_lora_scales(stock: DiffusionPipeline, loras: dict) -> None:
    path, factors = loras["a"]
    base = _unet_out(stock.unet)
    off = load_pipeline("tiny-sdxl", loras=[(str(path), 0.0)], progress_bar=False)
    assert off.get_list_adapters() == {"unet": ["lora_0"]}
    # peft's wrapper still runs the base layer its own way (peft 0.21: 5e-7 off on this UNet), so equal
    # within float noise, far below what scale 1 moves
    torch.testing.assert_close(_unet_out(off.unet), base, atol=1e-5, rtol=1e-5)
    on = load_pipeline("tiny-sdxl", loras=[(str(path), 1.0)], progress_bar=False)
    out = _unet_out(on.unet)
    assert not torch.allclose(out, base, atol=1e-3)
    torch.testing.assert_close(out, _unet_out(_merged(stock.unet, [(factors, 1.0)])), atol=1e-5, rtol=1e-5)


def test_two_loras(stock: DiffusionPipeline, loras: dict) -> None:
    (path_a, factors_a), (path_b, factors_b) = loras["a"], loras["b"]
    pipe = load_pipeline("tiny-sdxl", loras=[(str(path_a), 0.5), (str(path_b), -1.5)], progress_bar=False)
    assert pipe.get_list_adapters() == {"unet": ["lora_0", "lora_1"]}
    expected = _merged(stock.unet, [(factors_a, 0.5), (factors_b, -1.5)])
    torch.testing.assert_close(_unet_out(pipe.unet), _unet_out(expected), atol=1e-5, rtol=1e-5)


def test_lora_on_single_file(files: dict, loras: dict) -> None:
    pipe, folder, path = files["tiny-sdxl"]
    lora, factors = loras["a"]
    loaded = load_pipeline(path, config=folder, loras=[(lora, 0.75)], progress_bar=False)
    expected = _merged(pipe.unet, [(factors, 0.75)])
    torch.testing.assert_close(_unet_out(loaded.unet), _unet_out(expected), atol=1e-5, rtol=1e-5)


def test_lora_errors(loras: dict, tmp_path: Path) -> None:
    save_file(
        {"foo.bar.lora_A.weight": torch.ones(2, 4), "foo.bar.lora_B.weight": torch.ones(4, 2)},
        tmp_path / "nothing.safetensors",
    )
    save_file(
        {"unet.foo.bar.lora_A.weight": torch.ones(2, 4), "unet.foo.bar.lora_B.weight": torch.ones(4, 2)},
        tmp_path / "no-module.safetensors",
    )
    save_file({"foo.weight": torch.ones(2)}, tmp_path / "not-lora.safetensors")
    cases = {
        tmp_path / "missing.safetensors": "no such file",
        tmp_path / "nothing.safetensors": "none of its keys match a layer of this StableDiffusionXLPipeline",
        tmp_path / "no-module.safetensors": r"foo\.bar.*not found in the base model.*architecture",
        tmp_path / "not-lora.safetensors": "Invalid LoRA checkpoint",
        loras["sd15"][0]: r"size mismatch .*LoRA for this model's architecture",
    }
    for path, message in cases.items():
        with pytest.raises(ModelLoadError, match=message) as info:
            load_pipeline("tiny-sdxl", loras=[(loras["a"][0], 1.0), (str(path), 1.0)], progress_bar=False)
        text = str(info.value)
        assert "\n" not in text and f"LoRA {str(path)!r}" in text, text


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("style.safetensors", ("style.safetensors", 1.0)),
        ("style.safetensors:0.6", ("style.safetensors", 0.6)),
        ("style.safetensors:-1e-1", ("style.safetensors", -0.1)),
        (r"C:\loras\style.safetensors", (r"C:\loras\style.safetensors", 1.0)),
        (r"C:\loras\style.safetensors:2", (r"C:\loras\style.safetensors", 2.0)),
        ("a:b.safetensors", ("a:b.safetensors", 1.0)),
        ("dir/x.safetensors:", ("dir/x.safetensors:", 1.0)),
    ],
)
def test_parse_lora(text: str, expected: tuple[str, float]) -> None:
    assert parse_lora(text) == expected


@pytest.mark.parametrize("text", ["x.safetensors:nan", "x.safetensors:inf", "x.safetensors:-inf", "", ":0.5"])
def test_parse_lora_rejects(text: str) -> None:
    with pytest.raises(ValueError, match="--lora"):
        parse_lora(text)


def test_kohya_lora_layout(stock: DiffusionPipeline, loras: dict, tmp_path: Path) -> None:
    """The layout most LoRA files on the web have (kohya's sd-scripts: ``lora_unet_<module path with '_'>``,
    ``lora_down``/``lora_up``, ``alpha``) loads through diffusers' conversion: the same factors as the
    diffusers-layout file ``a`` (alpha = rank: weight 1) give the same model."""
    _, factors = loras["a"]
    tensors = {}
    for name, (a, b) in factors.items():
        key = "lora_unet_" + name.replace(".", "_")
        tensors |= {f"{key}.lora_down.weight": a, f"{key}.lora_up.weight": b}
        tensors[f"{key}.alpha"] = torch.tensor(float(a.shape[0]))
    path = tmp_path / "kohya.safetensors"
    save_file(tensors, path)
    pipe = load_pipeline("tiny-sdxl", loras=[(str(path), 1.0)], progress_bar=False)
    expected = _merged(stock.unet, [(factors, 1.0)])
    torch.testing.assert_close(_unet_out(pipe.unet), _unet_out(expected), atol=1e-5, rtol=1e-5)


def test_lora_on_wan(tmp_path: Path) -> None:
    """diffusers loads LoRA into Wan's transformer (WanLoraLoaderMixin): --lora works on video models."""
    stock = build_tiny_pipeline("tiny-wan", progress_bar=False)
    path = tmp_path / "wan.safetensors"
    factors = write_random_lora(stock.transformer, path, seed=5, rank=2, prefix="transformer")
    assert factors

    def out(transformer) -> torch.Tensor:
        gen = torch.Generator().manual_seed(0)
        latents = torch.randn(1, 4, 3, 4, 4, generator=gen)
        text = torch.randn(1, 8, 32, generator=gen)
        with torch.no_grad():
            return transformer(latents, torch.tensor([500]), text, return_dict=False)[0]

    loaded = load_pipeline("tiny-wan", loras=[(str(path), 1.0)], progress_bar=False)
    assert loaded.get_list_adapters() == {"transformer": ["lora_0"]}
    expected = out(_merged(stock.transformer, [(factors, 1.0)]))
    assert not torch.allclose(expected, out(stock.transformer), atol=1e-3)
    torch.testing.assert_close(out(loaded.transformer), expected, atol=1e-5, rtol=1e-5)
