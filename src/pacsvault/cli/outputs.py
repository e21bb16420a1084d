"""Files pacsvault writes *outside* the vault (exports, node certificates): owner-only.

What leaves the vault is plaintext (decrypted DICOM) or a device's private key, on a PC that
other people may share: every file is created 0600 and every folder we create 0700, whatever
the umask (``os.open``/``mkdir`` with the mode, then ``chmod``: a umask can only remove
bits, and a file already there keeps its old mode unless it is changed explicitly). A
folder the user named and that already exists is theirs: it is left as it is.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

from pacsvault.fsutil import write_durably

FILE_MODE = 0o600
DIR_MODE = 0o700


def private_dir(path: Path) -> list[Path]:
    """Create ``path`` and its missing parents as 0700; returns the folders created."""
    missing: list[Path] = []
    current = path
    while not current.exists() and not current.is_symlink():
        missing.append(current)
        if current.parent == current:
            break
        current = current.parent
    created: list[Path] = []
    for folder in reversed(missing):
        try:
            folder.mkdir(mode=DIR_MODE)
        except FileExistsError:
            continue  # made by someone else meanwhile: not ours to change
        os.chmod(folder, DIR_MODE)
        created.append(folder)
    if not path.is_dir():
        raise NotADirectoryError(f"{path} is not a folder")
    return created


def restrict_dir(path: Path) -> None:
    """Make a folder pacsvault itself created (now or by an older version) 0700."""
    if path.is_symlink() or not path.is_dir():
        raise NotADirectoryError(f"{path} is not a folder")
    if stat.S_IMODE(path.stat().st_mode) != DIR_MODE:
        os.chmod(path, DIR_MODE)


def write_private(path: Path, data: bytes) -> None:
    """Write ``path`` as 0600, durably and atomically (temporary file, fsync, rename)."""
    tmp = path.with_name(path.name + ".part")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, FILE_MODE)
    try:
        os.fchmod(fd, FILE_MODE)  # a leftover .part may have had another mode
        write_durably(fd, [data])
    except BaseException:
        os.close(fd)
        tmp.unlink(missing_ok=True)
        raise
    os.close(fd)
    os.replace(tmp, path)


def restrict_files(paths: Iterable[Path]) -> None:
    """0600 for files written by code that does not take a mode (belt and braces)."""
    for path in paths:
        if path.is_file() and not path.is_symlink():
            os.chmod(path, FILE_MODE)


@contextmanager
def private_umask() -> Iterator[None]:
    """Files and folders created meanwhile by this (single-threaded) command get no group
    or other bits, whatever code creates them."""
    previous = os.umask(0o077)
    try:
        yield
    finally:
        os.umask(previous)
