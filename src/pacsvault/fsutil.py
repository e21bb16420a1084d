"""File-system steps that durability and secrecy depend on, written once.

A rename or a new file is durable only once its directory is fsync'ed; a one-time secret
(recovery code, first password) goes to a file created exclusively with mode 0600 from
its first byte, never following a symlink planted in its place.
"""

from __future__ import annotations

import os
import secrets
import threading
from collections.abc import Iterable
from pathlib import Path


def fsync_dir(directory: Path) -> None:
    """Make the directory's entries (a rename, a new or removed file) durable."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: Path, data: bytes, mode: int = 0o600) -> None:
    """Replace ``path`` by ``data`` so that a reader or a crash sees the old file or the new
    one, never half of one: a sibling created exclusively with ``mode`` from its first
    byte, written, fsync'ed, renamed over, the directory fsync'ed."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}"
                         f".{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    fsync_dir(path.parent)


def write_private_new(folder: Path, names: Iterable[str], body: str) -> Path | None:
    """Write ``body`` to the first of ``names`` that does not exist yet in ``folder``:
    created exclusively, 0600, no symlink followed, fsync'ed. None if every name is taken."""
    for name in names:
        path = folder / name
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        except FileExistsError:
            continue
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(body)
            fh.flush()
            os.fsync(fh.fileno())
        return path
    return None
