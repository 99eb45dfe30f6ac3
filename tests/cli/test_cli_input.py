"""Every input a user can type: exit code 2 and one clear line, checked before any model loads or any
folder is created; nothing silently ignored; Ctrl-C ends cleanly. Through the CLI entry point."""

import json

import numpy as np
import pytest
from PIL import Image

import storydiff.models.loading
from storydiff.cli import main

STORY = """\
[Bob] a man with red hair, wearing a black suit
[Alice] a woman in a yellow dress
---
[Bob] walks in the park #Bob takes a walk
[Alice] waters the flowers #Alice at home
[Bob] reads a newspaper
[Alice] rides a bicycle
[NC] a quiet street at night #Night falls
"""


@pytest.fixture
def story(tmp_path):
    path = tmp_path / "story.txt"
    path.write_text(STORY)
    return path


@pytest.fixture
def no_model(monkeypatch):
    """Loading a model fails the test: input errors must be found before."""

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the input was checked")

    monkeypatch.setattr(storydiff.models.loading, "load_pipeline", refuse)


def generate(story, out, *extra):
    return main(["generate", "--model", "tiny-sd15", "--story", str(story), "--out", str(out), *extra])


def error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--steps", "0"], "--steps must be a whole number >= 1"),
        (["--height", "100"], "--height must be a positive multiple of 8"),
        (["--height", "-64"], "--height must be a positive multiple of 8"),
        (["--guidance", "nan"], "--guidance must be a finite number"),
        (["--tile", "4"], "--tile applies to window mode only"),
        (["--mode", "window", "--save-banks"], "--save-banks does not apply in window mode"),
        (["--mode", "window", "--id-frames", "1"], "--id-frames does not apply in window mode"),
        (["--bank-schedule", "stored", "--checkpoint-every", "2"], "--checkpoint-every applies to window"),
        (["--mode", "window", "--bank-schedule", "stored"], "--bank-schedule does not apply in window mode"),
        (["--bank-schedule", "lockstep", "--save-banks"], "--save-banks needs the stored bank schedule"),
        (["--chunk-size", "2"], "--chunk-size does not apply in bank mode"),
        (["--level-rate", "16:0.5"], "--level-rate expects LEVEL=RATE"),
        (["--level-rate", "12=0.5"], "--level-rate keys must be level factors"),
        (["--rate", "1.5"], "--rate must be a number in [0, 1]"),
        (["--style", "baroque"], "--style"),
        (["--seed", "-3"], "--seed must be a whole number from 0 to 2**64 - 1"),
        (["--font", "/no/such/font.ttf"], "--font must name a font file"),
        (["--device", "cuda"], "no CUDA device"),
    ],
)
def test_bad_settings_exit_2_before_loading_or_writing(tmp_path, story, capsys, no_model, extra, message):
    if extra[:2] == ["--device", "cuda"]:
        import torch

        if torch.cuda.is_available():
            pytest.skip("this machine has CUDA")
    assert generate(story, tmp_path / "out", *extra) == 2
    assert message in error_line(capsys)
    assert not (tmp_path / "out").exists()


def test_output_folder_that_is_a_file(tmp_path, story, capsys, no_model):
    (tmp_path / "file").write_text("x")
    assert generate(story, tmp_path / "file") == 2
    assert "is a file" in error_line(capsys)
    assert generate(story, tmp_path / "file" / "out") == 2
    assert "which is a file" in error_line(capsys)


def test_story_files_that_cannot_be_read(tmp_path, capsys, no_model):
    binary = tmp_path / "story.bin"
    binary.write_bytes(b"\xfe\xff\x00[Bob]")
    assert generate(binary, tmp_path / "out") == 2
    line = error_line(capsys)
    assert str(binary) in line and "not a UTF-8 text file" in line
    assert generate(tmp_path, tmp_path / "out") == 2  # a folder
    assert str(tmp_path) in error_line(capsys)


def test_load_bank_errors(tmp_path, story, capsys, no_model):
    fake = tmp_path / "bank.safetensors"
    fake.write_bytes(b"\x00" * 64)
    assert generate(story, tmp_path / "out", "--load-bank", str(fake)) == 2
    assert "not a storydiff bank file" in error_line(capsys)
    assert generate(story, tmp_path / "out", "--load-bank", str(tmp_path / "missing.safetensors")) == 2
    assert "bank file not found" in error_line(capsys)
    assert not (tmp_path / "out").exists()


def test_resume_refuses_flags_that_would_change_the_run(tmp_path, capsys, no_model):
    out = tmp_path / "run"
    out.mkdir()
    (out / "metadata.json").write_text(json.dumps({"status": "running"}))
    assert main(["generate", "--resume", str(out), "--steps", "2", "--seed", "5"]) == 2
    line = error_line(capsys)
    assert "--steps" in line and "--seed" in line and "drop" in line


def test_other_commands_check_their_input_first(tmp_path, capsys, monkeypatch):
    import storydiff.benchmark.op_suite as op_suite

    monkeypatch.setattr(op_suite, "run_op_suite", lambda *a, **k: pytest.fail("benchmark ran"))
    (tmp_path / "file").write_text("x")
    assert main(["bench", "--suite", "op", "--out", str(tmp_path / "file")]) == 2
    assert "is a file" in error_line(capsys)
    assert main(["profile-vram", "--lengths", "a,b"]) == 2
    assert "comma" in capsys.readouterr().err
    assert main(["profile-vram", "--out", str(tmp_path / "file")]) == 2
    assert "is a file" in error_line(capsys)
    frames = tmp_path / "frames"
    frames.mkdir()
    for i in range(2):
        Image.new("RGB", (8, 8)).save(frames / f"{i}.png")
    video = ["video", "--story-dir", str(frames), "--svd", "tiny-svd", "--out", str(tmp_path / "file")]
    assert main(video) == 2
    assert "is a file" in error_line(capsys)
    assert main(["train-motion", "--data", str(frames), "--out", str(tmp_path / "file" / "run")]) == 2
    assert "which is a file" in error_line(capsys)


def test_sample_reference_indices_rejects_a_non_generator():
    import torch

    from csa_kernels import sample_reference_indices

    with pytest.raises(TypeError, match="generator"):
        sample_reference_indices(2, 10, 0.5, generator=0)
    assert sample_reference_indices(2, 10, 0.5, generator=torch.Generator().manual_seed(0)).shape == (2, 5)


def test_help_shows_defaults(capsys):
    assert main(["generate", "--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    for default in ("(default: 30)", "(default: 5.0)", "(default: 0)", "(default: grid)", "(default: bank)"):
        assert default in text, default


# ------------------------------------------------------------------------------------------- runs


def frames(folder):
    return [np.asarray(Image.open(p)) for p in sorted((folder / "frames").glob("frame_*.png"))]


def test_quiet_run_plain_progress_and_real_size_in_metadata(tmp_path, story, capsys):
    assert generate(story, tmp_path / "out", "--steps", "2") == 0
    captured = capsys.readouterr()
    for noise in ("[transformers]", "Warning", "<|endoftext|>", "\r", "\x1b["):
        assert noise not in captured.err, noise
    assert "denoising (all frames): step 2/2 done" in captured.err  # not a terminal: a line per step
    meta = json.loads((tmp_path / "out" / "metadata.json").read_text())
    assert (meta["settings"]["height"], meta["settings"]["width"]) == (128, 128)


def test_ctrl_c_keeps_finished_frames_and_says_so(tmp_path, story, capsys, monkeypatch):
    from storydiff.runs.lockstep import LockstepDenoiser

    step = LockstepDenoiser.step
    calls = []

    def interrupted(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 5:  # both characters' identity frames are done (2 steps each)
            raise KeyboardInterrupt
        return step(self, *args, **kwargs)

    monkeypatch.setattr(LockstepDenoiser, "step", interrupted)
    extra = ["--steps", "2", "--id-frames", "1", "--bank-schedule", "stored"]
    assert generate(story, tmp_path / "out", *extra) == 130
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("interrupted") and "Traceback" not in "".join(err)
    meta = json.loads((tmp_path / "out" / "metadata.json").read_text())
    assert meta["status"] == "interrupted"
    assert len(frames(tmp_path / "out")) == 2


def test_banks_carry_model_identity_and_description(tmp_path, story, capsys):
    assert generate(story, tmp_path / "a", "--steps", "2", "--save-banks") == 0
    bob = tmp_path / "a" / "banks" / "Bob.safetensors"
    solo = tmp_path / "solo.txt"
    solo.write_text("[Bob] sails a boat #Bob at sea\n")  # Bob is not defined here: the bank describes him
    args = ["--story", str(solo), "--steps", "2", "--load-bank", str(bob)]
    assert main(["generate", "--model", "tiny-sd15", "--out", str(tmp_path / "b"), *args]) == 0
    meta = json.loads((tmp_path / "b" / "metadata.json").read_text())
    assert meta["characters"]["Bob"] == "a man with red hair, wearing a black suit"
    assert (
        meta["loaded_banks"]["Bob"]["path"] == str(bob.resolve())
        and len(meta["loaded_banks"]["Bob"]["sha256"]) == 64
    )
    capsys.readouterr()
    # another architecture: refused before anything is written
    assert main(["generate", "--model", "tiny-sdxl", "--out", str(tmp_path / "c"), *args]) == 2
    assert "model architecture" in error_line(capsys) and not (tmp_path / "c").exists()
    # other steps: refused, naming the flag
    assert (
        main(["generate", "--model", "tiny-sd15", "--out", str(tmp_path / "d"), *args, "--steps", "3"]) == 2
    )
    assert "--steps" in error_line(capsys) and not (tmp_path / "d").exists()
    # a character not in the story, and window mode
    carol = ["--load-bank", f"Carol={bob}"]
    assert generate(story, tmp_path / "e", "--steps", "2", *carol) == 2
    assert "the file is the bank of 'Bob', not 'Carol'" in error_line(capsys)
    assert generate(story, tmp_path / "f", "--mode", "window", "--load-bank", str(bob)) == 2
    assert "--load-bank applies to bank mode only" in error_line(capsys)
