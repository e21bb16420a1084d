"""A durably written object leaves no page of it in the page cache (issue 17).

Why it matters: an archive writes each object once and reads it seldom; keeping its
pages cached grows the cache into memory that, on a virtual machine, may not be backed
yet (measured: writing a 0.5 MB object cost 0.06 ms into recycled pages, 1.7-2.2 ms into
fresh ones), and pushes the index's pages out. These tests look at the pages with
``mincore`` (no page is read by looking): every object path that ends in an fsync must
drop them, and the bytes must read back whole afterwards.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import mmap
import os
from pathlib import Path

import pytest

from pacsvault.check import disks
from pacsvault.storage.objects import ObjectStore

_SIZE = 3 * 1024 * 1024 + 123
_PAGE = mmap.PAGESIZE


def _resident_pages(path: Path) -> int:
    """How many of the file's pages are in the page cache: ``mincore`` on a private
    mapping of it that is never touched (looking reads no page in)."""
    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p]
    size = path.stat().st_size
    flags = ctypes.create_string_buffer((size + _PAGE - 1) // _PAGE)
    with path.open("rb") as handle, mmap.mmap(handle.fileno(), size,
                                               access=mmap.ACCESS_COPY) as mapped:
        first = ctypes.c_char.from_buffer(mapped)  # its address only: nothing is read
        try:
            failed = libc.mincore(ctypes.addressof(first), size, flags)
        finally:
            del first
    if failed:
        raise OSError(ctypes.get_errno(), "mincore failed")
    return sum(byte & 1 for byte in flags.raw)


@pytest.fixture
def store(tmp_path: Path) -> ObjectStore:
    mount = disks.mount_of(str(tmp_path.resolve()),
                           disks.parse_mountinfo(disks.read("/proc/self/mountinfo")))
    if mount is not None and mount.fstype in disks.MEMORY_FS:
        pytest.skip(f"{mount.fstype}: the page cache is the file itself")
    objects = ObjectStore(tmp_path / "objects")
    objects.create()
    return objects


def _payload() -> list[bytes]:
    data = os.urandom(_SIZE)
    return [data[:100], data[100:]]


def test_a_spare_written_then_synced_leaves_no_cached_page(store: ObjectStore) -> None:
    pieces = _payload()
    object_id, sync = store.write_spare(pieces)
    path = Path(store._names(object_id)[2])
    assert _resident_pages(path) > 0  # written, not yet synced: cached (the probe works)
    sync()
    assert _resident_pages(path) == 0
    assert store.read(object_id) == b"".join(pieces)


def test_a_spare_staged_durably_leaves_no_cached_page(store: ObjectStore) -> None:
    pieces = _payload()
    object_id = store.stage_spare(pieces)
    assert _resident_pages(Path(store._names(object_id)[2])) == 0
    store.publish(object_id)
    assert store.read(object_id) == b"".join(pieces)


def test_a_staged_object_leaves_no_cached_page(store: ObjectStore) -> None:
    pieces = _payload()
    object_id = store.new_id()
    store.stage(object_id, pieces)
    assert _resident_pages(store._staged(object_id)) == 0
    store.publish(object_id)
    assert _resident_pages(store.path(object_id)) == 0
    assert store.read(object_id) == b"".join(pieces)
