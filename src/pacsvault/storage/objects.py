"""The object store: ciphertext files under ``DATA/objects``.

File names are random 128-bit ids, never UIDs or patient attributes. A write goes to a
temporary file in the same file system, is fsync'ed, renamed into place, and the directory
is fsync'ed, so after a crash an object is either complete or absent. Only ciphertext is
ever written, temporary files included.
"""

from __future__ import annotations

import errno
import os
import secrets
import shutil
from collections.abc import Iterable
from pathlib import Path

TMP_DIR = ".tmp"


class DiskFullError(Exception):
    """Not enough free space to store more objects safely."""


class ObjectStore:
    def __init__(self, root: Path, min_free_bytes: int = 0) -> None:
        self.root = root
        self.min_free_bytes = min_free_bytes
        self._tmp = root / TMP_DIR

    def create(self) -> None:
        self._tmp.mkdir(parents=True, exist_ok=True, mode=0o700)

    @staticmethod
    def new_id() -> str:
        return secrets.token_hex(16)

    def path(self, object_id: str) -> Path:
        if len(object_id) != 32 or not all(c in "0123456789abcdef" for c in object_id):
            raise ValueError("invalid object id")
        return self.root / object_id[:2] / object_id[2:4] / f"{object_id}.pvo"

    def clean_temporary(self) -> int:
        """Remove partial writes left by a crash (they were never acknowledged)."""
        removed = 0
        if self._tmp.is_dir():
            for leftover in self._tmp.iterdir():
                leftover.unlink(missing_ok=True)
                removed += 1
        return removed

    def check_space(self, incoming: int) -> None:
        free = shutil.disk_usage(self.root).free
        if free - incoming < self.min_free_bytes:
            raise DiskFullError("free disk space below the configured reserve")

    def write(self, object_id: str, pieces: Iterable[bytes]) -> int:
        """Durably write an object; returns its size on disk."""
        final = self.path(object_id)
        tmp = self._tmp / f"{object_id}.part"
        size = 0
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            for piece in pieces:
                view = memoryview(piece)
                while view:
                    written = os.write(fd, view)
                    view = view[written:]
                    size += written
            os.fsync(fd)
        except OSError as exc:
            os.close(fd)
            tmp.unlink(missing_ok=True)
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                raise DiskFullError("disk full while writing an object") from None
            raise
        os.close(fd)
        if not final.parent.is_dir():
            final.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            _fsync_dir(final.parent.parent)
            _fsync_dir(self.root)
        os.replace(tmp, final)
        _fsync_dir(final.parent)
        return size

    def read(self, object_id: str) -> bytes:
        return self.path(object_id).read_bytes()

    def delete(self, object_id: str) -> None:
        self.path(object_id).unlink(missing_ok=True)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
