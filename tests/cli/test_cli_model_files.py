"""`storydiff generate --model FILE.safetensors --config DIR --lora PATH[:SCALE]` end to end (tiny-sd15)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from ldm_format import write_random_lora, write_single_file
from PIL import Image

from storydiff.cli import main
from storydiff.families.tiny_models import build_tiny_pipeline

STORY = "[Bob] a man in a black suit\n---\n[Bob] walks in the park\n[Bob] reads a newspaper\n[NC] a tree\n"


def generate(tmp_path, out, *extra):
    story = tmp_path / "story.txt"
    story.write_text(STORY)
    argv = ["generate", "--story", str(story), "--out", str(tmp_path / out), "--steps", "2", *extra]
    return main(argv)


def frames(folder):
    return np.stack([np.asarray(Image.open(p), dtype=np.int16) for p in sorted(folder.glob("frames/*.png"))])


@pytest.fixture(scope="module")
def model_file(tmp_path_factory):
    """tiny-sd15's own weights (seed 0, as `--model tiny-sd15` builds them) as an original-format single
    file, a config-only diffusers folder, and a random LoRA for its UNet."""
    root = tmp_path_factory.mktemp("cli-model-files")
    pipe = build_tiny_pipeline("tiny-sd15", seed=0, progress_bar=False)
    folder = root / "config"
    pipe.save_pretrained(folder)
    for weights in folder.rglob("*.safetensors"):
        weights.unlink()  # every weight must come from the file
    lora = root / "lora.safetensors"
    write_random_lora(pipe.unet, lora, seed=1, rank=2)
    return write_single_file(pipe, root / "tiny.safetensors"), folder, lora


def test_single_file_with_config_and_lora(tmp_path, model_file):
    path, folder, lora = model_file
    assert generate(tmp_path, "stock", "--model", "tiny-sd15") == 0
    file_args = ("--model", str(path), "--config", str(folder))
    assert generate(tmp_path, "file", *file_args, "--lora", f"{lora}:0") == 0
    assert generate(tmp_path, "lora", *file_args, "--lora", str(lora)) == 0
    stock, from_file, with_lora = (frames(tmp_path / name) for name in ("stock", "file", "lora"))
    # the same weights read from the file (a LoRA at scale 0 adds nothing); fp32 rounding at most
    assert np.abs(stock - from_file).max() <= 2
    assert np.abs(stock - with_lora).mean() > 2  # the LoRA at scale 1 changes the pictures
    meta = json.loads((tmp_path / "lora" / "metadata.json").read_text())
    assert meta["model"] == str(path) and meta["model_config"] == str(folder)
    assert meta["loras"] == [[str(lora), 1.0]]


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--model", "tiny-sd15", "--config", "."], "--config applies to single-file checkpoints"),
        (["--model", "tiny-sd15", "--lora", "gone.safetensors:0.5"], "--lora gone.safetensors: no such"),
        (["--model", "tiny-sd15", "--lora", "x.safetensors:inf"], "--lora"),
        (["--model", "no-such.safetensors"], "no-such.safetensors"),
    ],
)
def test_model_file_errors_before_anything_runs(tmp_path, capsys, extra, message):
    assert generate(tmp_path, "out", *extra) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
