"""The encrypted, ordered, crash-safe disk queue of syslog records (one file per record).

Why apart from the sender: the queue is also opened without any network code, by the key
rotation (which re-encrypts waiting records) and by CLI commands that only enqueue. The
package docstring describes the file format and the guarantees.
"""

from __future__ import annotations

import fcntl
import os
import re
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from pacsvault.crypto import objects
from pacsvault.fsutil import write_durably

QUEUE_DIR_NAME = "syslog-queue"
_QUEUE_KEY_ID = uuid.uuid5(uuid.NAMESPACE_URL, "pacsvault:audit-syslog-queue")
_IDENTITY = "pacsvault-syslog-queue/{seq}"
_NAME = re.compile(r"^(\d{20})\.msg$")


# --- the on-disk queue -----------------------------------------------------------------


class SyslogQueue:
    """Encrypted, ordered, crash-safe queue of syslog records: one file per record."""

    def __init__(self, root: Path, key: bytes) -> None:
        if len(key) != 32:
            raise ValueError("the queue key must be 32 bytes")
        self.root = root
        self._key = key
        self._other_key: bytes | None = None  # the other key while a rotation runs
        self._rejected = root / "rejected"
        self._lock = threading.Lock()
        root.mkdir(parents=True, exist_ok=True, mode=0o700)
        self._lock_fd = os.open(root / "queue.lock", os.O_RDWR | os.O_CREAT, 0o600)
        # a writer died before publishing: never queued. Under the queue's lock: another
        # process (a serve worker) may be writing its part right now, lock held.
        with self._exclusive():
            for stale in root.glob("*.part"):
                stale.unlink(missing_ok=True)

    def close(self) -> None:
        if self._lock_fd >= 0:
            os.close(self._lock_fd)
            self._lock_fd = -1

    @contextmanager
    def _exclusive(self) -> Iterator[None]:
        with self._lock:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(self._lock_fd, fcntl.LOCK_UN)

    def _next_seq(self) -> int:
        raw = os.pread(self._lock_fd, 20, 0)
        last = int(raw) if raw.strip().isdigit() else 0
        if not last:  # lock file new or damaged: never go below what is queued
            last = max((seq for seq, _ in self.entries()), default=0)
        seq = max(last + 1, time.time_ns() // 1000)
        os.pwrite(self._lock_fd, f"{seq:020d}".encode("ascii"), 0)
        return seq

    def put(self, record: bytes) -> int:
        """Queue one record durably; returns its sequence number."""
        with self._exclusive():
            seq = self._next_seq()
            blob = b"".join(objects.encrypt(
                record, self._key, _QUEUE_KEY_ID, _IDENTITY.format(seq=seq)))
            final = self.root / f"{seq:020d}.msg"
            part = self.root / f"{seq:020d}.{os.getpid()}.part"
            fd = os.open(part, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            try:
                write_durably(fd, [blob])
            finally:
                os.close(fd)
            try:
                os.link(part, final)  # unlike rename, never replaces an existing record
            finally:
                part.unlink(missing_ok=True)
            self._sync_dir()
            return seq

    def entries(self) -> list[tuple[int, Path]]:
        """Every queued record, oldest first."""
        found = []
        with os.scandir(self.root) as it:
            for entry in it:
                match = _NAME.match(entry.name)
                if match:
                    found.append((int(match.group(1)), Path(entry.path)))
        found.sort()
        return found

    def __len__(self) -> int:
        return len(self.entries())

    def read(self, seq: int, path: Path) -> bytes:
        """The record, authenticated against its place in the queue."""
        blob = path.read_bytes()
        if objects.read_header(blob).key_id != _QUEUE_KEY_ID:
            raise objects.ObjectFormatError("not a syslog queue record")
        try:
            return objects.decrypt(blob, self._key, _IDENTITY.format(seq=seq))
        except objects.ObjectFormatError:
            other = self._other_key
            if other is None:
                raise
            return objects.decrypt(blob, other, _IDENTITY.format(seq=seq))

    def rekey(self, key: bytes) -> int:
        """Master key rotation: re-encrypt every queued record under ``key`` (atomic
        rename per file); the sender reads with either key meanwhile. Returns how many."""
        if len(key) != 32:
            raise ValueError("the queue key must be 32 bytes")
        done = 0
        with self._exclusive():
            self._other_key = key
            for seq, path in self.entries():
                identity = _IDENTITY.format(seq=seq)
                try:
                    blob = path.read_bytes()
                except FileNotFoundError:
                    continue  # delivered meanwhile
                try:
                    objects.decrypt(blob, key, identity)
                    continue  # re-encrypted by an interrupted rotation
                except objects.ObjectFormatError:
                    pass
                try:
                    record = objects.decrypt(blob, self._key, identity)
                except objects.ObjectFormatError:
                    continue  # unreadable already: the sender sets it aside
                part = path.with_name(f"{path.name}.{os.getpid()}.rekey")
                fd = os.open(part, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
                try:
                    os.write(fd, b"".join(objects.encrypt(record, key, _QUEUE_KEY_ID,
                                                          identity)))
                    os.fsync(fd)
                finally:
                    os.close(fd)
                os.replace(part, path)
                done += 1
            self._other_key, self._key = self._key, key
            self._sync_dir()
        return done

    def remove(self, paths: list[Path]) -> None:
        for path in paths:
            path.unlink(missing_ok=True)
        self._sync_dir()

    def reject(self, path: Path) -> None:
        """Set aside a record that cannot be read, so it does not block the queue forever."""
        self._rejected.mkdir(exist_ok=True, mode=0o700)
        os.replace(path, self._rejected / path.name)
        self._sync_dir()

    def _sync_dir(self) -> None:
        fd = os.open(self.root, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


__all__ = ["QUEUE_DIR_NAME", "SyslogQueue"]
