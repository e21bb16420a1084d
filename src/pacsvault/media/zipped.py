"""The media as a ZIP, streamed: chunks out as the instances are decrypted, nothing on disk.

Why stdlib ``zipfile`` over a write-only sink: ``ZipFile`` accepts a stream it cannot seek
(it then writes each entry's sizes in a data descriptor after the data), so the archive is
produced front to back into a small buffer that the generator drains after every file; the
server holds one instance at a time and never writes a plaintext temporary file. Entries
are stored, not deflated: most of the bytes are pixel data, often compressed already, and
the server's cores are better spent elsewhere. (``zipstream-ng`` would add a computed
Content-Length, but only for inputs whose sizes are known up front; the DICOMDIR's is not.)
"""

from __future__ import annotations

import time
import zipfile
from collections.abc import Callable, Iterator

from pacsvault.media.export import MediaExport

_FILE_MODE = 0o600 << 16


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


def stream(export: MediaExport, folder: str = "",
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
