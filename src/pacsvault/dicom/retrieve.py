"""C-GET/C-MOVE sub-operations that send the stored bytes as they are (issue 17, part 4).

Why: before this module every retrieved object was parsed by pydicom (``dcmread``) and
written again by pynetdicom (``encode``, pydicom's ``write_dataset``) even when the peer
accepted the stored transfer syntax, which is most of the time: that round trip cost more
CPU than decryption and sending together. Now:

- ``split`` finds the end of the File Meta Information and the stored transfer syntax in
  the decrypted Part 10 stream, without pydicom;
- ``Raw`` is a dataset that carries only what pynetdicom's ``send_c_store`` reads (SOP
  Class and Instance UIDs, the transfer syntax) plus the dataset bytes after the meta;
  the ``encode`` that ``send_c_store`` calls is wrapped (``patches.wrap_store_encode``) so
  a ``Raw`` leaves byte for byte as stored. The bytes stay in memory (no file, no
  temporary copy on disk: the plaintext never touches a disk);
- ``ReadAhead`` decrypts the next objects in a worker thread (at most ``DEPTH``) while
  the current one is being sent: decryption and file reads release the GIL, the network
  send waits on the peer.

A ``Raw`` is only made when the peer accepted the stored (SOP class, syntax) pair, so
``send_c_store`` picks that exact context; if the encoding pynetdicom asks for ever
differed from the stored one, the hook refuses (the sub-operation fails, counted and
listed) rather than send something else. A ``Raw`` is then sent as one pre-encoded
message, its PDUs written in batches (``dicom/sendpath``). Everything else (conversion
to uncompressed little endian, Big Endian) still goes through pydicom (``transcode``).
"""

from __future__ import annotations

import functools
import itertools
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Generic, TypeVar

from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.tag import BaseTag, Tag
from pydicom.uid import UID

from pacsvault.dicom import patches, sendpath
from pacsvault.dicomfile import filemeta

_SOP_CLASS, _SOP_INSTANCE, _SYNTAX = Tag(0x00080016), Tag(0x00080018), Tag(0x00020010)
DEPTH = 2  # objects decrypted ahead of the one being sent (memory: DEPTH + 1 objects)


def split(data: bytes) -> tuple[str, int] | None:
    """(stored transfer syntax, offset of the dataset) of a Part 10 stream, or None when
    it is not the plain preamble + ``DICM`` + explicit little endian group 0002 the
    archive writes, or holds no dataset (the caller then takes pydicom's path)."""
    found = filemeta.walk(data)
    return found if found is not None and found[1] < len(data) else None


class Raw(Dataset):
    """A stored object to send as it is: the three attributes ``send_c_store`` reads,
    and the encoded dataset (``pv_body``, bytes or a view of the decrypted stream) that
    ``encode`` returns for it."""

    def __init__(self, sop_class: str, sop_uid: str, syntax: str,
                 body: bytes | memoryview) -> None:
        # Built without pydicom's ``__init__``/``setattr`` (a keyword look-up and a value
        # conversion per attribute): in the state ``Dataset()`` leaves (``blank_state``),
        # the three elements raw (decoded by pydicom only if something reads them: the
        # direct path reads ``pv_uids``). Per object, pydicom's way was a large share of
        # the association thread's time (issue 17).
        self.__dict__.update(sendpath.blank_state(Dataset))
        self._dict[_SOP_CLASS] = _shared_ui(_SOP_CLASS, sop_class)
        self._dict[_SOP_INSTANCE] = _raw_ui(_SOP_INSTANCE, sop_uid)
        meta = sendpath.blank(FileMetaDataset)
        meta._dict[_SYNTAX] = _shared_ui(_SYNTAX, syntax)
        self.__dict__["file_meta"] = meta  # as ``_set_file_meta`` stores a FileMetaDataset
        self.__dict__["pv_uids"] = (sop_class, sop_uid, syntax)
        self.__dict__["pv_body"] = body

    def __repr__(self) -> str:  # no UIDs in logs or tracebacks
        return f"Raw({len(self.__dict__['pv_body'])} bytes)"


def _raw_ui(tag: BaseTag, value: str) -> RawDataElement:
    """A UI element as explicit VR little endian stores it (even length, NUL padded)."""
    encoded = value.encode("ascii")
    if len(encoded) % 2:
        encoded += b"\x00"
    return RawDataElement(tag, "UI", len(encoded), encoded, 0, False, True)


@functools.lru_cache(maxsize=256)
def _shared_ui(tag: BaseTag, value: str) -> RawDataElement:
    """``_raw_ui`` for the values every object of a retrieval repeats (SOP class, transfer
    syntax): a ``RawDataElement`` is an immutable tuple (pydicom converts it into a new
    ``DataElement`` when read, and replaces it, never changes it), so one is shared."""
    return _raw_ui(tag, value)


def _encode_hook(ds: Any, is_implicit_vr: bool, is_little_endian: bool,
                 deflated: bool) -> bytes | Any | None:
    """The stored bytes of a ``Raw`` whose syntax is the negotiated one; None (the
    sub-operation fails) if pynetdicom asked for another encoding; anything else goes to
    pynetdicom's own ``encode``."""
    if not isinstance(ds, Raw):
        return ds
    syntax = UID(str(ds.file_meta.TransferSyntaxUID))
    wanted = (syntax.is_implicit_VR, syntax.is_little_endian, syntax.is_deflated)
    if wanted != (is_implicit_vr, is_little_endian, deflated):
        return None
    body: bytes | memoryview = ds.__dict__["pv_body"]
    # pynetdicom's path wants bytes (the direct path sends the view without a copy)
    return body if isinstance(body, bytes) else bytes(body)


def _send_hook(assoc: Any, ds: Any, msg_id: int, priority: int, originator_aet: str | None,
               originator_id: int | None) -> Any:
    """A ``Raw`` goes out as one pre-encoded message (``dicom/sendpath``) when that path
    takes it; anything else (and a ``Raw`` it leaves) is pynetdicom's ``send_c_store``."""
    if not isinstance(ds, Raw):
        return NotImplemented
    return sendpath.send_c_store(assoc, ds, msg_id, priority, originator_aet, originator_id)


def install() -> None:
    """Route ``send_c_store``'s ``encode`` through ``_encode_hook``, ``send_c_store``
    itself through ``_send_hook``, and the C-GET/C-MOVE responses through
    ``sendpath.send_msg`` (idempotent)."""
    patches.wrap_store_encode(_encode_hook)
    patches.wrap_send_c_store(_send_hook)
    patches.wrap_send_msg(sendpath.send_msg)


T = TypeVar("T")
R = TypeVar("R")


class ReadAhead(Generic[T, R]):
    """``read(item)`` for each item in order, up to ``depth`` items ahead, in one worker
    thread. Iterate it for ``(item, result-or-exception)``; ``close`` drops what was read
    ahead and not yet taken (a cancelled or interrupted retrieval)."""

    def __init__(self, items: list[T], read: Callable[[T], R], depth: int = DEPTH) -> None:
        self._items = items
        self._read = read
        self._depth = max(1, depth)
        self._pool: ThreadPoolExecutor | None = None
        self._pending: deque[Future[R]] = deque()

    def __iter__(self) -> Iterator[tuple[T, R | BaseException]]:
        if not self._items:
            return
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="pv-readahead")
        upcoming = iter(self._items)
        try:
            for item in itertools.islice(upcoming, self._depth):
                self._pending.append(self._pool.submit(self._read, item))
            for item in self._items:
                future = self._pending.popleft()
                for nxt in itertools.islice(upcoming, 1):
                    self._pending.append(self._pool.submit(self._read, nxt))
                try:
                    result: R | BaseException = future.result()
                except Exception as exc:  # handed to the caller, which counts it
                    result = exc
                yield item, result
        finally:
            self.close()

    def close(self) -> None:
        for future in self._pending:
            future.cancel()
        self._pending.clear()
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None


__all__ = ["DEPTH", "Raw", "ReadAhead", "install", "split"]
