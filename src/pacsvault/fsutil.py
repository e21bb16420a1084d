"""File-system steps that durability and secrecy depend on, written once.

A rename or a new file is durable only once its directory is fsync'ed; a one-time secret
(recovery code, first password) goes to a file created exclusively with mode 0600 from
its first byte, never following a symlink planted in its place; a secret read from a
file (a passphrase, an SMTP password) is refused when other users could read it too.
"""

from __future__ import annotations

import os
import secrets
import stat
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


def write_durably(fd: int, pieces: Iterable[bytes]) -> int:
    """``write_all``, then fsync: the data is on disk when this returns. Returns the
    number of bytes written."""
    size = write_all(fd, pieces)
    os.fsync(fd)
    return size


def write_all(fd: int, pieces: Iterable[bytes]) -> int:
    """Write every piece whole (``os.write`` may take less than it is given), one at a time
    (never two copies of a big object); not synced. Returns the number of bytes written."""
    size = 0
    for piece in pieces:
        view = memoryview(piece)
        while view:
            written = os.write(fd, view)
            view = view[written:]
            size += written
    return size


def write_atomic(path: Path, data: bytes, mode: int = 0o600) -> None:
    """Replace ``path`` by ``data`` so that a reader or a crash sees the old file or the new
    one, never half of one: a sibling created exclusively with ``mode`` from its first
    byte, written, fsync'ed, renamed over, the directory fsync'ed."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}"
                         f".{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        write_durably(fd, [data])
    finally:
        os.close(fd)
    os.replace(tmp, path)
    fsync_dir(path.parent)


PRIVATE_SUBDIR = "pacsvault-first-run"


def private_dir(key_dir: Path) -> Path:
    """A directory only this user can enter, for a one-time secrets file: the key's own
    directory when it is one (``keys.write_key_file`` makes it 0700), else a 0700
    subdirectory. Raises ``NotADirectoryError`` when that subdirectory is someone else's."""
    info = key_dir.lstat()
    if stat.S_ISDIR(info.st_mode) and not info.st_mode & 0o077 and info.st_uid == os.getuid():
        return key_dir
    private = key_dir / PRIVATE_SUBDIR
    private.mkdir(mode=0o700, exist_ok=True)
    info = private.lstat()
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.getuid():
        raise NotADirectoryError(f"{private} is not a directory of this user")
    if info.st_mode & 0o077:
        private.chmod(0o700)
    return private


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


class PrivateFileError(Exception):
    """Why a secret file was refused; ``problem`` is one of the constants below, so each
    caller words the refusal for its own setting (passphrase, alert credentials)."""

    MISSING = "missing"
    UNREADABLE = "unreadable"
    NOT_REGULAR = "not a regular file"
    EXPOSED = "readable by other users"
    EMPTY = "empty"

    def __init__(self, path: Path, problem: str) -> None:
        super().__init__(f"{path}: {problem}")
        self.path = path
        self.problem = problem

    def explain(self, what: str) -> str:
        """One line for the person who set the file up: ``<what> <path> <why>``, ``what``
        naming the setting ("SMTP password file"), with the fix when there is one."""
        why = {
            self.NOT_REGULAR: "is not a regular file",
            self.EXPOSED: f"is readable by other users: run 'chmod 600 {self.path}'",
            self.EMPTY: "is empty",
        }.get(self.problem, "cannot be read")
        return f"{what} {self.path} {why}"


def read_private_text(path: Path, *, first_line: bool = False) -> str:
    """The secret held in ``path``: its first line (``first_line``) or its whole text
    stripped. Refused (``PrivateFileError``) unless it is a regular file that neither the
    group nor others can access: a secret others can read has already leaked."""
    try:
        info = path.stat()
    except FileNotFoundError:
        raise PrivateFileError(path, PrivateFileError.MISSING) from None
    except OSError:
        raise PrivateFileError(path, PrivateFileError.UNREADABLE) from None
    if not stat.S_ISREG(info.st_mode):
        raise PrivateFileError(path, PrivateFileError.NOT_REGULAR)
    if info.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise PrivateFileError(path, PrivateFileError.EXPOSED)
    try:
        text = path.read_text("utf-8")
    except (OSError, UnicodeDecodeError):
        raise PrivateFileError(path, PrivateFileError.UNREADABLE) from None
    if first_line:
        lines = text.splitlines()
        value = lines[0] if lines else ""
    else:
        value = text.strip()
    if not value:
        raise PrivateFileError(path, PrivateFileError.EMPTY)
    return value
