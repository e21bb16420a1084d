"""File-system steps that durability and secrecy depend on, written once.

A rename or a new file is durable only once its directory is fsync'ed; a one-time secret
(recovery code, first password) goes to a file created exclusively with mode 0600 from
its first byte, never following a symlink planted in its place.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path


def fsync_dir(directory: Path) -> None:
    """Make the directory's entries (a rename, a new or removed file) durable."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


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
