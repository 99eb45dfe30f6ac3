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
    base = ["video", "--story-dir", str(tmp_path / "nothing"), "--svd", "tiny-svd", "--out", str(out)]
    assert main(base) == 2
    assert "already holds a story video (story.gif)" in capsys.readouterr().err
    assert main([*base, "--overwrite"]) == 2  # passes the folder check; the story folder is missing
    assert "already holds" not in capsys.readouterr().err
    assert main([*base, "--overwrite", "--frames", "1"]) == 2
    assert "--frames must be >= 3" in capsys.readouterr().err
    assert (out / "story.gif").read_bytes() == b"mine"
