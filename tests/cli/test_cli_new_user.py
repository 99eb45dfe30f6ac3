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
