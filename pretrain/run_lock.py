"""One writer per checkpoint directory: ``DIR/.lock``, an exclusive ``flock`` held by the writing process.

The trainer takes it (on rank 0) before it reads or writes anything in ``checkpoint.dir``; a second job on the same
directory is refused with one line naming the holder (pid, host, start time). The kernel drops the lock when its
holder ends in any way (also SIGKILL or the OOM killer), so a lock file left behind by a dead process is taken over
without asking; its content (the holder's pid and host) is only there for the message. The file is never deleted
(deleting a locked file lets a third process lock a new file of the same name while the old one is held).

Within one process taking the lock again is a no-op (several trainers in one process share it); :func:`release`
drops it. On a file system without ``flock`` (some Lustre mounts) the directory is used unlocked, with a warning.
NFSv4 maps ``flock`` to byte-range locks and releases a crashed client's lock when its lease expires (about 90 s).
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import socket
import time
from pathlib import Path

from pretrain.config import ConfigError

LOCK_NAME = ".lock"
log = logging.getLogger("pretrain.train")
_held: dict[str, int] = {}  # resolved directory -> file descriptor holding its lock


class DirectoryLocked(ConfigError):
    """Another process writes this checkpoint directory."""


def _holder(text: str) -> str:
    try:
        info = json.loads(text)
        return f"pid {info['pid']} on {info['host']} (since {info['since']})"
    except (ValueError, KeyError, TypeError):
        return "another process"


def acquire(directory: str | Path) -> None:
    """Lock ``directory`` (created if missing) for this process, or raise :class:`DirectoryLocked` (held by
    another process) or :class:`ConfigError` (cannot be created or opened)."""
    directory = Path(directory)
    key = str(directory.resolve())
    if key in _held:
        return
    try:
        directory.mkdir(parents=True, exist_ok=True)
        fd = os.open(directory / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        raise ConfigError(f"checkpoint.dir={directory}: cannot write {directory / LOCK_NAME} ({e.strerror}): "
                          f"set checkpoint.dir to a directory this user can write") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        text = os.pread(fd, 4096, 0).decode(errors="replace")
        os.close(fd)
        if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            raise DirectoryLocked(f"checkpoint.dir={directory} is in use by {_holder(text)}: wait for that job to "
                                  f"end or stop it, or set another checkpoint.dir") from None
        log.warning("cannot lock %s (%s): nothing stops a second job from writing it", directory, e.strerror)
        return
    previous = os.pread(fd, 4096, 0).decode(errors="replace")
    if previous.strip():
        log.info("taking over the lock of %s, which ended without releasing it", _holder(previous))
    info = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.strftime("%Y-%m-%d %H:%M:%S")}
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps(info).encode(), 0)
    _held[key] = fd


def release(directory: str | Path) -> None:
    """Drop this process's lock of ``directory`` (no-op if not held); the emptied file says nobody holds it."""
    fd = _held.pop(str(Path(directory).resolve()), None)
    if fd is not None:
        os.ftruncate(fd, 0)
        os.close(fd)  # closing the last descriptor releases the flock
