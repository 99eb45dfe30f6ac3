"""The output folder's run lock (``RunLock``, storydiff/pages/output.py): an object its StoryOutput holds,
with its own heartbeat thread, and no record of held locks kept at module level."""

import gc
import json
import os
import socket
import threading
import time

import pytest

from storydiff.pages import output as output_module
from storydiff.pages.output import LOCK, FolderInUse, RunLock, StoryOutput, lock_holder


def heartbeats() -> set[str]:
    return {t.name for t in threading.enumerate() if t.name.startswith("storydiff-lock") and t.is_alive()}


def test_the_lock_file_names_its_owner_and_goes_on_release(tmp_path):
    lock = RunLock(tmp_path)
    assert not lock.is_held and not (tmp_path / LOCK).exists()
    lock.acquire()
    owner = json.loads((tmp_path / LOCK).read_text())
    assert set(owner) == {"host", "pid", "start", "since", "token"}
    assert owner["host"] == socket.gethostname() and owner["pid"] == os.getpid()
    assert lock.is_held and lock_holder(tmp_path) == owner
    lock.release()
    assert not lock.is_held and not (tmp_path / LOCK).exists() and lock_holder(tmp_path) is None
    lock.release()  # releasing twice does nothing


def test_the_heartbeat_thread_stops_on_release(tmp_path):
    before = heartbeats()
    with RunLock(tmp_path):
        token = json.loads((tmp_path / LOCK).read_text())["token"]
        assert heartbeats() - before == {f"storydiff-lock-{token}"}
    assert heartbeats() == before  # joined, not just told to stop
    output = StoryOutput(tmp_path / "run")
    output.start({})
    assert len(heartbeats() - before) == 1
    output.finish()
    assert heartbeats() == before


def test_the_heartbeat_touches_the_lock(tmp_path, monkeypatch):
    monkeypatch.setattr(output_module, "HEARTBEAT_S", 0.05)
    with RunLock(tmp_path):
        old = time.time() - 1000
        os.utime(tmp_path / LOCK, (old, old))
        deadline = time.time() + 10
        while (tmp_path / LOCK).stat().st_mtime == old and time.time() < deadline:
            time.sleep(0.02)
        assert (tmp_path / LOCK).stat().st_mtime > old


def test_a_second_lock_in_this_process_is_refused(tmp_path):
    before = heartbeats()
    with RunLock(tmp_path):
        second = RunLock(tmp_path)
        with pytest.raises(FolderInUse, match=f"process {os.getpid()}"):
            second.acquire()
        assert not second.is_held and len(heartbeats() - before) == 1  # the refused one left no thread
        with pytest.raises(FolderInUse):
            StoryOutput(tmp_path, overwrite=True)  # the folder check refuses it too
        assert (tmp_path / LOCK).exists()  # and the holder's lock is untouched
    assert heartbeats() == before


def test_a_released_lock_can_be_taken_again(tmp_path):
    lock = RunLock(tmp_path)
    lock.acquire()
    first = json.loads((tmp_path / LOCK).read_text())["token"]
    lock.release()
    lock.acquire()  # the same object
    assert json.loads((tmp_path / LOCK).read_text())["token"] != first
    with pytest.raises(RuntimeError, match="already held"):  # one object holds one lock at a time
        lock.acquire()
    lock.release()
    with RunLock(tmp_path):  # and another one
        assert lock_holder(tmp_path)["pid"] == os.getpid()
    assert not (tmp_path / LOCK).exists()


def test_a_lock_this_process_left_behind_is_stale(tmp_path):
    """A lock file naming this process whose token no RunLock of it holds (a run whose release never ran)
    does not block: this process is asked, not a record of its locks."""
    with RunLock(tmp_path):
        left = (tmp_path / LOCK).read_text()
    (tmp_path / LOCK).write_text(left)
    assert lock_holder(tmp_path) is None
    with RunLock(tmp_path):
        assert json.loads((tmp_path / LOCK).read_text())["token"] != json.loads(left)["token"]


def test_a_lock_dropped_unreleased_is_released(tmp_path):
    before = heartbeats()
    lock = RunLock(tmp_path).acquire()
    del lock
    gc.collect()
    assert not (tmp_path / LOCK).exists() and heartbeats() == before
