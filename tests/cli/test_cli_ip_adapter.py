"""`storydiff generate --ip-adapter PATH --image-encoder DIR --ref NAME=IMAGE` end to end (tiny-sd15)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from storydiff.cli import main
from storydiff.families.tiny_models import (
    build_tiny_pipeline,
    save_tiny_image_encoder,
    tiny_clip_vision_model,
    write_tiny_ip_adapter,
)

STORY = """\
[Bob] a man in a black suit
[Alice] a woman in a yellow dress
---
[Bob] walks in the park
[Alice] waters the flowers
[Bob] and [Alice] have dinner
"""


def generate(tmp_path, out, *extra):
    story = tmp_path / "story.txt"
    story.write_text(STORY)
    argv = ["generate", "--story", str(story), "--model", "tiny-sd15", "--out", str(tmp_path / out)]
    return main([*argv, "--steps", "2", "--id-frames", "1", *extra])


def frames(folder):
    return [np.asarray(Image.open(p), dtype=np.int16) for p in sorted(folder.glob("frames/*.png"))]


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    """Random IP-Adapter weights for tiny-sd15, a tiny image encoder folder and three pictures."""
    root = tmp_path_factory.mktemp("cli-ip")
    unet = build_tiny_pipeline("tiny-sd15", progress_bar=False).unet
    weights = write_tiny_ip_adapter(root / "ip.safetensors", unet, tiny_clip_vision_model())
    encoder = save_tiny_image_encoder(root / "image_encoder")
    pictures = []
    for seed in range(3):
        pixels = np.random.RandomState(seed).randint(0, 256, (40, 40, 3), dtype=np.uint8)
        pictures.append(root / f"picture{seed}.png")
        Image.fromarray(pixels).save(pictures[-1])
    return weights, encoder, pictures


def test_reference_images_steer_their_characters_frames(tmp_path, assets):
    weights, encoder, (p0, p1, p2) = assets
    adapter = ("--ip-adapter", str(weights), "--image-encoder", str(encoder))
    assert generate(tmp_path, "a", *adapter, "--ref", f"Bob={p0}", "--ref", f"Alice={p1}") == 0
    assert generate(tmp_path, "b", *adapter, "--ref", f"Bob={p0}", "--ref", f"Alice={p2}") == 0
    (bob_a, alice_a, both_a), (bob_b, alice_b, both_b) = frames(tmp_path / "a"), frames(tmp_path / "b")
    # only Alice's image changed: Bob's solo frame is the same, Alice's frames are not
    assert np.array_equal(bob_a, bob_b)
    assert np.abs(alice_a - alice_b).mean() > 1 and np.abs(both_a - both_b).mean() > 1
    meta = json.loads((tmp_path / "a" / "metadata.json").read_text())
    assert meta["ip_adapter"]["weights"] == str(weights.resolve()) and meta["ip_adapter"]["scale"] == 1.0
    assert meta["reference_images"]["Bob"]["path"] == str(p0.resolve())


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--ref", "Bob=x.png"], "--ref need(s) an IP-Adapter: add --ip-adapter PATH"),
        (["--ip-adapter", "missing.safetensors"], "--ip-adapter missing.safetensors: no such file"),
        (["--ip-adapter", "{weights}", "--ref", "Bob"], "--ref expects NAME=IMAGE"),
        (["--ip-adapter", "{weights}", "--ref", "Carol={p0}"], "'Carol' is in no frame of the story"),
        (["--ip-adapter", "{weights}", "--ref", "Bob={weights}"], "cannot read"),
        (["--ip-adapter", "{weights}", "--ref", "Bob={p0}", "--ref", "Bob={p1}"], "two images for 'Bob'"),
        (["--ip-adapter", "{weights}", "--ip-scale", "nan"], "--ip-scale must be a finite number, got nan"),
    ],
)
def test_reference_image_errors_before_anything_runs(tmp_path, capsys, assets, extra, message):
    weights, _, (p0, p1, _) = assets
    extra = [item.format(weights=weights, p0=p0, p1=p1) for item in extra]
    assert generate(tmp_path, "out", *extra) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_an_adapter_without_reference_images_warns(tmp_path, capsys, assets):
    weights, encoder, _ = assets
    assert generate(tmp_path, "w", "--ip-adapter", str(weights), "--image-encoder", str(encoder)) == 0
    assert "warning: --ip-adapter without --ref NAME=IMAGE: no frame gets a reference image" in (
        capsys.readouterr().err
    )
