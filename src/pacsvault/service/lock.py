"""One ``serve`` per vault: an exclusive ``flock`` on ``DATA/serve.lock``.

``serve`` takes it before touching anything (storage recovery, the trail, the ports): a
second ``serve`` on the same vault used to run the crash recovery under a live server and
delete its staged files (issue 12). The kernel drops the lock when the process ends, even
on ``kill -9``, so there is never a stale lock to clean up. The file's content is never
written: the holder is found in ``/proc/locks`` (pid) and its start time in ``/proc``.
"""

from __future__ import annotations

import datetime as dt
import fcntl
import os
from dataclasses import dataclass
from pathlib import Path

LOCK_NAME = "serve.lock"


class AlreadyRunning(Exception):
    """Another process holds the vault's lock (message is user-facing)."""

    def __init__(self, data_dir: Path, pid: int | None, since: dt.datetime | None) -> None:
        self.pid = pid
        self.since = since
        who = f"pid {pid}" if pid else "pid unknown"
        when = f", since {since:%Y-%m-%d %H:%M:%S %Z}" if since else ""
        stop = (f"'systemctl stop pacsvault' if it runs as the service, else 'kill {pid}'"
                if pid else "'systemctl stop pacsvault' or by stopping that process")
        super().__init__(
            f"pacsvault is already running ({who}{when}) on {data_dir}; stop it with "
            f"{stop} before starting another one. Nothing was changed."
        )


@dataclass
class InstanceLock:
    """The held lock; released by ``release`` or when the process ends."""

    path: Path
    fd: int

    def release(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)  # closing the only descriptor drops the flock
            self.fd = -1


def create_lock_file(data_dir: Path) -> Path:
    """Part of a vault's layout (made by ``init``), so starting a server adds no file."""
    path = data_dir / LOCK_NAME
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    os.close(fd)
    return path


def acquire(data_dir: Path) -> InstanceLock:
    """Take the vault's lock or raise ``AlreadyRunning`` naming the holder."""
    path = data_dir / LOCK_NAME
    fd = os.open(path, os.O_RDONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        inode = os.fstat(fd).st_ino
        os.close(fd)
        pid = holder_pid(inode)
        raise AlreadyRunning(data_dir.absolute(), pid, _started(pid)) from None
    except BaseException:
        os.close(fd)
        raise
    return InstanceLock(path, fd)


def holder_pid(inode: int, locks: Path = Path("/proc/locks")) -> int | None:
    """The pid holding a ``flock`` on the file with this inode (``/proc/locks`` lines look
    like ``1: FLOCK  ADVISORY  WRITE 1234 fd:01:5678 0 EOF``)."""
    try:
        text = locks.read_text("ascii", errors="replace")
    except OSError:
        return None
    for line in text.splitlines():
        parts = line.split()[1:]
        # "->" lines are processes waiting for the lock, not holding it.
        if len(parts) < 5 or parts[0] != "FLOCK":
            continue
        try:
            if int(parts[4].rsplit(":", 1)[1]) == inode and int(parts[3]) > 0:
                return int(parts[3])
        except (ValueError, IndexError):
            continue
    return None


def _started(pid: int | None) -> dt.datetime | None:
    if not pid:
        return None
    import psutil

    try:
        return dt.datetime.fromtimestamp(psutil.Process(pid).create_time()).astimezone()
    except (psutil.Error, OSError, ValueError):  # gone, or not ours: the pid is enough
        return None
