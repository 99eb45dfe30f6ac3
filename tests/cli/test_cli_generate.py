"""`storydiff generate` end to end on the tiny offline models."""

import json

import numpy as np
import pytest
from PIL import Image

from storydiff.cli import main

STORY = """\
[Bob] a man with red hair, wearing a black suit
[Alice] a woman in a yellow dress
---
[Bob] walks in the park #Bob takes a walk
[Alice] waters the flowers #Alice at home
[Bob] reads a newspaper
[Alice] rides a bicycle
[Bob] and [Alice] have dinner #Dinner
[NC] a quiet street at night #Night falls
"""


def generate(tmp_path, out, *extra, story=STORY):
    story_file = tmp_path / "story.txt"
    story_file.write_text(story)
    return main(
        ["generate", "--story", str(story_file), "--out", str(tmp_path / out), "--steps", "2", *extra]
    )


def frames(folder):
    return [np.asarray(Image.open(p)) for p in sorted((folder / "frames").glob("frame_*.png"))]


@pytest.mark.parametrize("model", ["tiny-sdxl", "tiny-sd15"])
@pytest.mark.parametrize("guidance", ["5.0", "1.0"], ids=["cfg-on", "cfg-off"])
def test_generate_writes_frames_pages_metadata(tmp_path, model, guidance, capsys):
    assert generate(tmp_path, "a", "--model", model, "--guidance", guidance, "--layout", "classic") == 0
    assert generate(tmp_path, "b", "--model", model, "--guidance", guidance, "--layout", "classic") == 0
    out = tmp_path / "a"
    meta = json.loads((out / "metadata.json").read_text())
    assert meta["status"] == "complete" and meta["model"] == model
    # lines without '#' are captioned with their own text (tags as names)
    assert meta["captions"][2:4] == ["Bob reads a newspaper", "Alice rides a bicycle"]
    assert meta["settings"]["guidance_scale"] == float(guidance) and meta["consistency"]["rate"] == 0.5
    assert meta["bank_bytes"]["Bob"] > 0 and meta["versions"]["diffusers"]
    assert len(frames(out)) == 6 and list((out / "pages").glob("page_*.png"))
    for first, second in zip(frames(out), frames(tmp_path / "b"), strict=True):
        assert np.array_equal(first, second)  # same seed, same images
    assert "identity bank of 'Bob'" in capsys.readouterr().out


def test_generate_saves_and_loads_banks(tmp_path):
    assert generate(tmp_path, "a", "--model", "tiny-sd15", "--save-banks") == 0
    bob = tmp_path / "a" / "banks" / "Bob.safetensors"
    assert bob.is_file()
    solo = "[Bob] a man with red hair, wearing a black suit\n---\n[Bob] sails a boat #Bob at sea\n"
    assert generate(tmp_path, "b", "--model", "tiny-sd15", "--load-bank", str(bob), story=solo) == 0
    assert len(frames(tmp_path / "b")) == 1


@pytest.mark.parametrize(
    ("story", "extra", "message"),
    [
        ("[Bob] a man\n---\n[Carol] sings\n", [], "Carol"),
        ("[Bob] a man\n[Al] a boy\n---\n[Bob] and [Al] sing\n", [], "'Bob' never appears alone"),
        ("", [], "empty story"),
        (STORY, ["--rate", "1.5"], "rate must be a number in"),
        (STORY, ["--style", "baroque"], "unknown style"),
    ],
)
def test_generate_bad_input_is_a_clear_error(tmp_path, capsys, story, extra, message):
    assert generate(tmp_path, "out", "--model", "tiny-sd15", *extra, story=story) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_fewer_solo_frames_than_id_frames_warns_once_and_runs(tmp_path, capsys):
    assert generate(tmp_path, "out", "--model", "tiny-sd15", "--id-frames", "3") == 0
    warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning:")]
    assert warnings == [
        f"warning: character {name!r} appears alone in only 2 frame(s): its identity comes from those 2 "
        f"instead of 3 identity frames (--id-frames / id_frames); add solo frames of {name!r} for a "
        "steadier identity"
        for name in ("Bob", "Alice")
    ]
    metadata = json.loads((tmp_path / "out" / "metadata.json").read_text())
    assert metadata["identity_frames"] == {"Bob": [0, 2], "Alice": [1, 3]}


def test_official_preset_with_overrides(tmp_path):
    preset = ("--model", "tiny-sd15", "--preset", "official", "--height", "64", "--width", "64")
    assert generate(tmp_path, "p", *preset) == 0
    meta = json.loads((tmp_path / "p" / "metadata.json").read_text())
    settings = meta["settings"]
    assert (settings["scheduler"], settings["freeu"]) == ("ddim", [0.6, 0.4, 1.1, 1.2])
    assert (settings["style"], settings["guidance_scale"]) == ("japanese anime", 5.0)
    assert (settings["layout"], settings["id_frames"]) == ("official", 1)
    # the flags given win over the preset: --steps 2 (generate() passes it), the size, --freeu off
    assert (settings["num_inference_steps"], settings["height"], settings["width"]) == (2, 64, 64)
    assert meta["identity_frames"] == {"Bob": [0], "Alice": [1]}
    # the official app's captions: a line without '#' is captioned with its text, tags as names
    assert meta["captions"][2:4] == ["Bob reads a newspaper", "Alice rides a bicycle"]
    assert len(list((tmp_path / "p" / "pages").glob("*.png"))) == 1  # one tall page
    assert generate(tmp_path, "q", *preset, "--freeu", "off") == 0
    assert json.loads((tmp_path / "q" / "metadata.json").read_text())["settings"]["freeu"] is None
    # FreeU changes the pictures
    with_freeu, without = frames(tmp_path / "p"), frames(tmp_path / "q")
    assert any(not np.array_equal(a, b) for a, b in zip(with_freeu, without, strict=True))


def test_the_official_preset_on_a_transformer_says_what_to_change(tmp_path, capsys):
    preset = ("--model", "tiny-flux", "--preset", "official", "--height", "64", "--width", "64")
    assert generate(tmp_path, "f", *preset) == 2
    assert (
        "error: --scheduler 'ddim' applies to UNet models; this is a flux model (set by --preset official; "
        "give --scheduler to override it)"
    ) in capsys.readouterr().err
    assert generate(tmp_path, "g", *preset, "--scheduler", "model", "--freeu", "off") == 0


def test_captions_hash_keeps_the_old_behaviour(tmp_path):
    assert generate(tmp_path, "h", "--model", "tiny-sd15", "--captions", "hash") == 0
    meta = json.loads((tmp_path / "h" / "metadata.json").read_text())
    assert meta["captions"] == ["Bob takes a walk", "Alice at home", None, None, "Dinner", "Night falls"]


def test_generate_rejects_a_model_that_is_not_a_unet_pipeline(tmp_path, capsys):
    assert generate(tmp_path, "out", "--model", str(tmp_path / "no-such-model")) == 2
    assert "cannot load model" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_generate_refuses_to_overwrite_a_finished_run(tmp_path, capsys):
    assert generate(tmp_path, "a", "--model", "tiny-sd15") == 0
    assert generate(tmp_path, "a", "--model", "tiny-sd15") == 2
    assert "already holds a story run" in capsys.readouterr().err
    assert generate(tmp_path, "a", "--model", "tiny-sd15", "--overwrite") == 0


def test_generate_rejects_a_pipeline_of_another_kind(tmp_path, capsys, monkeypatch):
    from diffusers import DiffusionPipeline

    class VideoOnly:  # e.g. a video pipeline: no family stories can run on
        transformer = object()

    monkeypatch.setattr(DiffusionPipeline, "from_pretrained", lambda *a, **k: VideoOnly())
    assert generate(tmp_path, "out", "--model", "some-org/some-video-model") == 2
    err = capsys.readouterr().err
    assert "'some-org/some-video-model' cannot tell stories: stories run on StableDiffusionPipeline" in err
    assert "got VideoOnly" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()
