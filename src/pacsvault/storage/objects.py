"""The object store: ciphertext files under ``DATA/objects``.

File names are random 128-bit ids, never UIDs or patient attributes. Writing is two-phase
so a crash can neither lose an acknowledged object nor leave one that nothing refers to:

1. ``stage``: write ``.tmp/<id>.part``, fsync (also fsync ``.tmp`` itself);
2. the caller commits the index row that names ``<id>``;
3. ``publish``: rename into ``ab/cd/<id>.pvo`` and fsync the directory.

At start, ``recover`` publishes every staged file whose id the index knows (the crash came
between 2 and 3) and deletes the others (the crash came before 2: never acknowledged).
Only ciphertext is ever written, staged files included.
"""

from __future__ import annotations

import errno
import os
import secrets
import shutil
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

TMP_DIR = ".tmp"
_PART = ".part"


class DiskFullError(Exception):
    """Not enough free space to store more objects safely."""


@dataclass(frozen=True)
class Recovery:
    published: int
    discarded: int


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

    def _staged(self, object_id: str) -> Path:
        self.path(object_id)  # validates the id
        return self._tmp / f"{object_id}{_PART}"

    def check_space(self, incoming: int) -> None:
        free = shutil.disk_usage(self.root).free
        if free - incoming < self.min_free_bytes:
            raise DiskFullError("free disk space below the configured reserve")

    def stage(self, object_id: str, pieces: Iterable[bytes]) -> int:
        """Durably write an object under ``.tmp``; returns its size on disk."""
        tmp = self._staged(object_id)
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
        _fsync_dir(self._tmp)
        return size

    def publish(self, object_id: str) -> None:
        """Move a staged object to its final place, durably."""
        final = self.path(object_id)
        if not final.parent.is_dir():
            final.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            _fsync_dir(final.parent.parent)
            _fsync_dir(self.root)
        os.replace(self._staged(object_id), final)
        _fsync_dir(final.parent)
        _fsync_dir(self._tmp)

    def discard(self, object_id: str) -> None:
        self._staged(object_id).unlink(missing_ok=True)

    def recover(self, is_indexed: Callable[[str], bool]) -> Recovery:
        """Finish or undo the writes a crash interrupted (see module docstring)."""
        published = discarded = 0
        if not self._tmp.is_dir():
            return Recovery(0, 0)
        for leftover in sorted(self._tmp.iterdir()):
            object_id = leftover.name.removesuffix(_PART)
            valid = leftover.name.endswith(_PART) and len(object_id) == 32
            if valid and is_indexed(object_id):
                self.publish(object_id)
                published += 1
            else:
                leftover.unlink(missing_ok=True)
                discarded += 1
        return Recovery(published, discarded)

    def read(self, object_id: str) -> bytes:
        try:
            return self.path(object_id).read_bytes()
        except FileNotFoundError:
            # Indexed a moment ago and not yet published (or published by recovery later).
            return self._staged(object_id).read_bytes()

    def delete(self, object_id: str) -> None:
        self.path(object_id).unlink(missing_ok=True)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
