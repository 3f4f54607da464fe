"""One writer per checkpoint directory (pretrain.run_lock): a held lock refuses with the holder named, a lock left by
a process that ended is taken over, and the holding process may take it again."""

from __future__ import annotations

import fcntl
import json
import os
import socket

import pytest

from pretrain import run_lock


def _hold(directory, pid: int) -> int:
    """Another holder: its own open file description with the flock, as a second process has."""
    directory.mkdir(parents=True, exist_ok=True)
    fd = os.open(directory / run_lock.LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        raise
    os.pwrite(fd, json.dumps({"pid": pid, "host": "node7", "since": "2026-01-02 03:04:05"}).encode(), 0)
    return fd


def test_a_held_directory_is_refused_naming_the_holder(tmp_path):
    fd = _hold(tmp_path / "ck", 4242)
    try:
        with pytest.raises(run_lock.DirectoryLocked) as e:
            run_lock.acquire(tmp_path / "ck")
        assert str(e.value) == (f"checkpoint.dir={tmp_path / 'ck'} is in use by pid 4242 on node7 (since 2026-01-02 "
                                f"03:04:05): wait for that job to end or stop it, or set another checkpoint.dir")
    finally:
        os.close(fd)  # the holder ends (as a killed process does): its lock file stays, its flock goes


def test_a_lock_left_by_an_ended_process_is_taken_over_and_released(tmp_path, caplog):
    os.close(_hold(tmp_path / "ck", 4242))
    with caplog.at_level("INFO", logger="pretrain.train"):
        run_lock.acquire(tmp_path / "ck")
    try:
        assert "taking over the lock of pid 4242 on node7" in caplog.text
        info = json.loads((tmp_path / "ck" / run_lock.LOCK_NAME).read_text())
        assert (info["pid"], info["host"]) == (os.getpid(), socket.gethostname())
        run_lock.acquire(tmp_path / "ck")  # again in the holding process: no-op
        with pytest.raises(BlockingIOError):  # and nobody else gets it
            os.close(_hold(tmp_path / "ck", 1))
    finally:
        run_lock.release(tmp_path / "ck")
    assert (tmp_path / "ck" / run_lock.LOCK_NAME).read_text() == ""
    os.close(_hold(tmp_path / "ck", 1))  # free again
