"""The media as a ZIP, streamed: chunks out as the instances are decrypted, nothing on disk.

Why stdlib ``zipfile`` over a write-only sink: ``ZipFile`` accepts a stream it cannot seek
(it then writes each entry's sizes in a data descriptor after the data), so the archive is
produced front to back into a small buffer that the generator drains after every file; the
server holds one instance at a time and never writes a plaintext temporary file. Entries
are stored, not deflated: most of the bytes are pixel data, often compressed already, and
the server's cores are better spent elsewhere.

Stored entries make the archive's length a function of the names and sizes alone
(``length``), which the export knows before it starts (``MediaExport.sizes``): the answer
carries an exact Content-Length (up to 2 GiB; larger archives are sent chunked). The
formula follows ``zipfile``'s writer for an unseekable stream (data descriptors, ZIP64
fields where sizes or offsets need them);
tests/test_media_export.py checks it against the bytes received. ``zipstream-ng`` (PyPI)
computes the same, but stdlib ``zipfile`` suffices and adds no dependency.
"""

from __future__ import annotations

import time
import zipfile
from collections.abc import Callable, Iterator
from typing import Protocol

_FILE_MODE = 0o600 << 16
_LIMIT = zipfile.ZIP64_LIMIT
_LOCAL, _CENTRAL, _END = 30, 46, 22  # fixed parts of the records (APPNOTE 4.3)
_ZIP64_LOCAL, _ZIP64_END = 20, 56 + 20  # local ZIP64 extra; ZIP64 end record + locator


def length(sizes: list[tuple[str, int]], folder: str = "") -> int | None:
    """The exact length of ``stream``'s output for files of these (name, size); ``None``
    when the archive needs ZIP64 structures (over 2 GiB, or 65,535 files): that branch of
    the formula is not exercised by the tests, and a wrong Content-Length would cut the
    download, so such an answer goes out without one (streamed, chunked)."""
    prefix = f"{folder}/" if folder else ""
    offset = central = 0
    for name, size in sizes:
        n = len((prefix + name).encode("utf-8"))
        zip64 = size * 1.05 > _LIMIT  # zipfile's own test in _open_to_write
        header_offset = offset
        offset += (_LOCAL + n + (_ZIP64_LOCAL if zip64 else 0) + size
                   + (24 if zip64 else 16))  # the data descriptor
        extra = (2 if size > _LIMIT else 0) + (1 if header_offset > _LIMIT else 0)
        central += _CENTRAL + n + (4 + 8 * extra if extra else 0)
    end = _END
    if len(sizes) > zipfile.ZIP_FILECOUNT_LIMIT or offset > _LIMIT or central > _LIMIT:
        end += _ZIP64_END
    total = offset + central + end
    if total > _LIMIT or len(sizes) > zipfile.ZIP_FILECOUNT_LIMIT:
        return None
    return total


class Files(Protocol):
    """What ``stream`` zips (``MediaExport``)."""

    def files(self) -> Iterator[tuple[str, bytes]]: ...


class _Drain:
    """A write-only file object the ZIP writes into; ``take`` empties it."""

    def __init__(self) -> None:
        self._parts: list[bytes] = []

    def write(self, data: bytes) -> int:
        self._parts.append(bytes(data))
        return len(data)

    def flush(self) -> None:
        return None

    def close(self) -> None:
        return None

    def take(self) -> bytes:
        out = b"".join(self._parts)
        self._parts.clear()
        return out


def stream(export: Files, folder: str = "",
           progress: Callable[[int], None] | None = None) -> Iterator[bytes]:
    """The ZIP's bytes, one chunk per file (the last one adds the central directory).
    ``folder``: an optional top folder inside the ZIP (ASCII, chosen by the caller)."""
    sink = _Drain()
    stamp = time.localtime()[:6]
    prefix = f"{folder}/" if folder else ""
    with zipfile.ZipFile(sink, "w", zipfile.ZIP_STORED, allowZip64=True) as archive:
        for name, data in export.files():
            info = zipfile.ZipInfo(prefix + name, date_time=stamp)
            info.external_attr = _FILE_MODE
            info.compress_type = zipfile.ZIP_STORED
            archive.writestr(info, data)
            if progress is not None:
                progress(len(data))
            yield sink.take()
    tail = sink.take()
    if tail:
        yield tail
