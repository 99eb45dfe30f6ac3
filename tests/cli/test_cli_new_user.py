"""What a new user found (issue 26, item 5): each unusual invocation exits 2 with one line naming the flag,
works, or warns."""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest
from PIL import Image

from storydiff.cli import main
from storydiff.pages.output import LOCK, STALE_S, FolderInUse, StoryOutput, check_output_folder, lock_holder

HOLD = """\
import sys
from storydiff.pages.output import StoryOutput
out = StoryOutput(sys.argv[1], resume=True)
out.start({"model": "tiny-sd15"})
print("holding", flush=True)
sys.stdin.read()
"""


STORY = "[Bob] a man with red hair\n---\n[Bob] walks in the park\n[Bob] reads a newspaper\n"


def generate(tmp_path, out, *extra, story=STORY, model="tiny-sd15"):
    story_file = tmp_path / "story.txt"
    story_file.write_text(story, encoding="utf-8")
    argv = ["generate", "--model", model, "--story", str(story_file), "--out", str(out), "--steps", "2"]
    return main([*argv, *extra])


def _running(folder):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "metadata.json").write_text(json.dumps({"format": 2, "status": "running"}))


def test_resume_of_a_run_still_going_is_refused_and_a_killed_ones_lock_is_stale(tmp_path, capsys):
    out = tmp_path / "run"
    _running(out)
    child = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(out)], stdin=subprocess.PIPE, stdout=subprocess.PIPE
    )
    try:
        assert child.stdout.readline().strip() == b"holding"
        owner = lock_holder(out)
        assert owner["pid"] == child.pid and owner["host"] == socket.gethostname()
        assert main(["generate", "--resume", str(out)]) == 2
        err = capsys.readouterr().err
        assert "being written by a run still going" in err and str(child.pid) in err
        assert generate(tmp_path, out, "--overwrite") == 2
        assert "being written by a run still going" in capsys.readouterr().err
        with pytest.raises(FolderInUse):
            StoryOutput(out, resume=True)
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    assert (out / LOCK).exists() and lock_holder(out) is None  # the killed run's lock is stale
    check_output_folder(out, resume=True)
    output = StoryOutput(out, resume=True)
    output.start({"model": "tiny-sd15"})  # takes the stale lock over
    assert lock_holder(out)["pid"] == os.getpid()
    with pytest.raises(FolderInUse):  # in this very process too, while the first output holds it
        StoryOutput(out, resume=True).start({})
    output.fail(RuntimeError("stop"))
    assert not (out / LOCK).exists()


def test_a_lock_from_another_host_is_live_while_its_heartbeat_goes_on(tmp_path):
    out = tmp_path / "run"
    _running(out)
    lock = out / LOCK
    lock.write_text(json.dumps({"host": "elsewhere.invalid", "pid": 1, "since": "now"}))
    with pytest.raises(FolderInUse, match=r"elsewhere\.invalid"):
        check_output_folder(out, resume=True)
    old = time.time() - STALE_S - 5
    os.utime(lock, (old, old))
    assert lock_holder(out) is None
    output = StoryOutput(out, resume=True)
    output.start({})
    assert json.loads(lock.read_text())["host"] == socket.gethostname()
    output.finish()
    assert not lock.exists()


def test_a_bank_is_loaded_as_its_own_character_only(tmp_path, capsys):
    duo = "[Bob] a man with red hair\n[Alice] a woman\n---\n[Bob] walks\n[Alice] reads\n"
    assert generate(tmp_path, tmp_path / "a", "--save-banks", story=duo) == 0
    bob = tmp_path / "a" / "banks" / "Bob.safetensors"
    capsys.readouterr()
    assert generate(tmp_path, tmp_path / "b", "--load-bank", f"Alice={bob}", story=duo) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "--load-bank Alice=" in err and "the bank of 'Bob', not 'Alice'" in err
    assert not (tmp_path / "b").exists()
    assert (
        generate(
            tmp_path, tmp_path / "c", "--load-bank", str(bob), story="[Alice] a woman\n---\n[Alice] reads\n"
        )
        == 2
    )
    assert "'Bob', who is in no frame" in capsys.readouterr().err
    # the story describes Bob otherwise: it runs with the story's words, and says so
    other = "[Bob] a tall man in a green coat\n---\n[Bob] sails a boat\n"
    assert generate(tmp_path, tmp_path / "d", "--load-bank", f"Bob={bob}", story=other) == 0
    assert (
        "the story describes 'Bob' as 'a tall man in a green coat', the bank was made for"
        in capsys.readouterr().err
    )


@pytest.mark.parametrize(
    ("model", "extra", "message"),
    [
        ("tiny-flux", [], "--negative has no effect on flux"),
        ("tiny-sd15", ["--guidance", "1"], "--negative needs classifier-free guidance, which --guidance 1"),
    ],
)
def test_negative_without_classifier_free_guidance_is_refused(tmp_path, capsys, model, extra, message):
    out = tmp_path / "out"
    assert generate(tmp_path, out, "--negative", "blurry", *extra, model=model) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0]
    assert not (out / "metadata.json").exists()


def test_old_frames_without_metadata_are_kept_without_overwrite(tmp_path, capsys):
    out = tmp_path / "out"
    (out / "frames").mkdir(parents=True)
    (out / "pages").mkdir()
    old = [out / "frames" / "frame_000.png", out / "pages" / "page_000.png"]
    for path in old:
        path.write_bytes(b"mine")
    assert generate(tmp_path, out) == 2
    err = capsys.readouterr().err.strip()
    assert (
        "holds 2 frame/page image(s) of an earlier run but no metadata.json" in err and "--overwrite" in err
    )
    assert all(path.read_bytes() == b"mine" for path in old)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("[1, 2, 3]", "is not a story record (a JSON list, not an object)"),
        ('{"format": 2, "status": "bogus"}', "'status' should be one of 'running', 'complete'"),
    ],
)
def test_metadata_of_the_wrong_shape_is_one_line(tmp_path, capsys, content, message):
    out = tmp_path / "out"
    out.mkdir()
    (out / "metadata.json").write_text(content)
    for argv in (["generate", "--resume", str(out)], ["eval", str(out)]):
        assert main(argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0], err
    assert generate(tmp_path, out) == 2
    assert message in capsys.readouterr().err
    # --overwrite replaces a damaged record (the check passes; here the story is what stops the run)
    assert generate(tmp_path, out, "--overwrite", story="") == 2
    assert "empty story" in capsys.readouterr().err


def test_video_keeps_a_story_video_without_overwrite_and_checks_frames(tmp_path, capsys):
    out = tmp_path / "video"
    out.mkdir()
    (out / "story.gif").write_bytes(b"mine")
    story = tmp_path / "story"
    story.mkdir()
    for i in range(2):
        Image.new("RGB", (16, 16)).save(story / f"frame_{i:03d}.png")
    base = ["video", "--story-dir", str(story), "--svd", "missing-svd-folder", "--out", str(out)]
    assert main(base) == 2
    assert "already holds a story video (story.gif)" in capsys.readouterr().err
    assert main([*base, "--overwrite", "--frames", "1"]) == 2
    assert "--frames must be >= 3" in capsys.readouterr().err
    assert main([*base, "--overwrite"]) == 2  # passes the folder check; the video model is missing
    assert "already holds" not in capsys.readouterr().err
    assert (out / "story.gif").read_bytes() == b"mine"


def test_a_seed_out_of_range_is_refused_up_front(tmp_path, capsys):
    out = tmp_path / "out"
    assert generate(tmp_path, out, "--seed", str(2**64)) == 2
    assert "--seed must be a whole number from 0 to 2**64 - 1" in capsys.readouterr().err
    assert generate(tmp_path, out, "--seed", str(2**64 - 1)) == 2  # the second frame would use 2**64
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: --seed {2**64 - 1} is too large for 2 frames"), err
    assert not out.exists()


def test_a_runtime_error_is_not_an_input_error(tmp_path, capsys, monkeypatch):
    import storydiff.cli.generate as command

    def broken(args, job):
        raise RuntimeError("boom")

    monkeypatch.setattr(command, "_generate", broken)
    assert generate(tmp_path, tmp_path / "a") == 1
    assert "unexpected RuntimeError: boom" in capsys.readouterr().err

    def peer_gone(args, job):
        raise RuntimeError("rank 1 of 2: starting the run failed — another rank stopped or ...")

    monkeypatch.setattr(command, "_generate", peer_gone)
    assert generate(tmp_path, tmp_path / "b") == 1
    assert capsys.readouterr().err.startswith("error: rank 1 of 2: starting the run failed")


def test_bench_refuses_what_cannot_run_here_and_warns_of_ignored_flags(tmp_path, capsys, monkeypatch):
    import storydiff.benchmark.op_suite as op_suite

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    base = ["bench", "--device", "cpu", "--out", str(tmp_path)]
    assert main([*base, "--suite", "op", "--providers", "ours_triton"]) == 2
    assert "--providers ours_triton needs" in capsys.readouterr().err
    assert main([*base, "--suite", "dist", "--ranks", "0"]) == 2
    err = capsys.readouterr().err
    assert "--ranks must be world sizes >= 1, got 0" in err and "visible GPUs" not in err
    monkeypatch.setenv("CSA_KERNEL_PATH", "bogus")
    assert main([*base, "--suite", "op"]) == 2
    assert "CSA_KERNEL_PATH='bogus' must be one of pointer, tma" in capsys.readouterr().err
    monkeypatch.delenv("CSA_KERNEL_PATH")
    ran = []
    monkeypatch.setattr(op_suite, "run_op_suite", lambda *a, **k: ran.append(1) or [])
    monkeypatch.setattr("storydiff.benchmark.results.save_rows", lambda *a, **k: [])
    assert main([*base, "--suite", "op", "--model", "flux", "--ranks", "2", "--no-plot"]) == 0
    assert "warning: --model, --ranks do(es) not apply to --suite op: ignored" in capsys.readouterr().err
    assert ran == [1] and not list(tmp_path.iterdir())


def test_environment_and_dist_flags_outside_torchrun(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "abc")
    monkeypatch.setenv("RANK", "0")
    assert generate(tmp_path, tmp_path / "a") == 2
    assert "environment variable WORLD_SIZE='abc' is not a whole number" in capsys.readouterr().err
    monkeypatch.delenv("WORLD_SIZE")
    monkeypatch.delenv("RANK")
    assert generate(tmp_path, tmp_path / "a", "--dist-timeout", "-5") == 2
    assert "--dist-timeout must be a number of seconds > 0" in capsys.readouterr().err
    out = tmp_path / "b"
    args = ["--dist-backend", "gloo", "--warmup-steps", "2", "--captions", "none", "--caption-style", "band"]
    assert generate(tmp_path, out, *args) == 0
    err = capsys.readouterr().err
    assert "warning: --dist-backend apply only under torchrun: ignored" in err
    assert "--warmup-steps 2 >= --steps 2: no step uses consistency" in err
    assert "--caption-style with --captions none" in err


def test_resume_without_its_checkpoint_says_it_starts_again(tmp_path, capsys):
    out = tmp_path / "out"
    assert generate(tmp_path, out, "--mode", "window") == 0
    meta = json.loads((out / "metadata.json").read_text())
    (out / "metadata.json").write_text(json.dumps({**meta, "status": "interrupted"}))
    assert main(["generate", "--resume", str(out)]) == 0
    assert "no checkpoint.pt there; the run starts again from its first step" in capsys.readouterr().err


def test_train_motion_checks_the_model_flags_before_any_work(tmp_path, capsys):
    data = tmp_path / "videos"
    data.mkdir()
    out = tmp_path / "run"
    base = ["train-motion", "--data", str(data), "--out", str(out), "--encoder", "tiny"]
    assert main([*base, "--hidden", "30", "--heads", "4"]) == 2
    assert "--hidden 30 must be divisible by --heads 4" in capsys.readouterr().err
    assert main([*base, "--dropout", "2"]) == 2
    assert "--dropout must be in [0, 1), got 2" in capsys.readouterr().err
    assert not out.exists()
    assert main([*base, "--resume"]) == 2  # the empty data folder stops it, after the warning
    assert "warning: --resume: no checkpoint in" in capsys.readouterr().err


def test_a_very_long_caption_is_cut_to_the_panel(tmp_path):
    from storydiff.pages.panels import captioned

    start = time.perf_counter()
    page = captioned(Image.new("RGB", (64, 64)), "word " * 24_000)
    assert page.size[0] == 64 and page.size[1] <= 64 + 3 * 64
    assert time.perf_counter() - start < 5


def test_messages_name_the_flag_and_the_file(tmp_path, capsys):
    lora = tmp_path / "style.safetensors"
    lora.write_bytes(b"x")
    assert generate(tmp_path, tmp_path / "a", "--lora", f"{lora}:abc") == 2
    assert "the scale 'abc' is not a number (expected PATH[:SCALE])" in capsys.readouterr().err
    characters = tmp_path / "characters.txt"
    characters.write_text("[Bob] a man\nnot a character line\n")
    frames_only = "[Bob] walks\n[Bob] reads\n"
    assert generate(tmp_path, tmp_path / "b", "--characters", str(characters), story=frames_only) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: --characters {characters}: line 2"), err
    assert generate(tmp_path, tmp_path / "c", "--mode", "window", "--window", "0") == 2
    err = capsys.readouterr().err
    assert "--window must be a whole number >= 1" in err and "None" not in err


def test_a_story_with_a_byte_order_mark_and_banks_readable_by_all(tmp_path, capsys):
    out = tmp_path / "out"
    assert generate(tmp_path, out, "--save-banks", story="\ufeff" + STORY) == 0
    bank = out / "banks" / "Bob.safetensors"
    assert bank.stat().st_mode & 0o777 == (out / "metadata.json").stat().st_mode & 0o777


@pytest.mark.parametrize("mode", ["bank", "window"])
def test_more_steps_than_the_scheduler_takes_are_refused_before_the_folder(tmp_path, capsys, mode):
    out = tmp_path / "out"
    assert generate(tmp_path, out, "--mode", mode, "--steps", "20000") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: --steps 20000 ") and "at most 1000" in err[0], err
    assert not out.exists()


def test_more_steps_than_the_scheduler_takes_from_python(tmp_path):
    """The library refuses too: the check is the pipeline's, before its output folder exists."""
    from storydiff import StoryDiffusionPipeline
    from storydiff.consistency.config import InvalidSetting
    from storydiff.families.tiny_models import build_tiny_pipeline

    sp = StoryDiffusionPipeline(build_tiny_pipeline("tiny-sd15", progress_bar=False))
    with pytest.raises(InvalidSetting, match="num_inference_steps 20000 is more than"):
        sp(STORY, num_inference_steps=20000, mode="window", out_dir=tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_as_many_steps_as_training_timesteps_stay_in_the_trained_range():
    """DDIM's "leading" spacing plus steps_offset 1 made the first of 1000 steps timestep 1000, which
    DDIM indexes its 1000 alphas with (IndexError in both modes)."""
    import torch

    from storydiff.families.registry import family_of
    from storydiff.families.tiny_models import build_tiny_pipeline

    pipe = build_tiny_pipeline("tiny-sdxl", progress_bar=False)
    family = family_of(pipe)
    assert pipe.scheduler.config.steps_offset == 1 and pipe.scheduler.config.timestep_spacing == "leading"
    timesteps = family.set_timesteps(pipe.scheduler, 1000, 64, 64)
    assert timesteps.tolist() == list(range(999, -1, -1)) and pipe.scheduler.timesteps is timesteps
    latents = torch.randn(1, *family.noise_shape(64, 64))
    for t in (timesteps[0], timesteps[-1]):
        assert pipe.scheduler.step(torch.randn_like(latents), t, latents).prev_sample.isfinite().all()
    # a schedule that fits is the scheduler's own
    assert family.set_timesteps(pipe.scheduler, 999, 64, 64).tolist() == list(range(999, 0, -1))


def test_importing_the_library_prints_nothing():
    """transformers 5 warns once that CLIPImageProcessor falls back to its PIL class without torchvision;
    the CLI hid it, ``import storydiff.models.loading`` printed it."""
    # one process: the import says nothing, and the warning alone is dropped (the filter is gone after the
    # import; another line of the same logger still shows)
    code = (
        "import storydiff.models.loading\n"
        "from transformers.utils import import_utils\n"
        "assert not import_utils.logger.filters\n"
        "import_utils.logger.warning('another line')\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stderr == "[transformers] another line\n"


def test_a_usage_error_under_torchrun_is_printed_by_each_nodes_first_rank_only(monkeypatch, capsys):
    """Every torchrun rank parses the same arguments: argparse's usage error (several lines) comes from
    LOCAL_RANK 0 alone; the other ranks exit 2 silently."""
    for local_rank, printed in (("1", False), ("0", True)):
        monkeypatch.setenv("WORLD_SIZE", "2")
        monkeypatch.setenv("LOCAL_RANK", local_rank)
        assert main(["generate", "--no-such-flag"]) == 2
        err = capsys.readouterr().err
        assert ("--no-such-flag" in err) is printed, (local_rank, err)
