"""The object store's spares are made ahead, in the background (issue 17).

A store used to make the next batch of spare files itself when it found none left: 64 file
creations and a directory fsync while it held its association (~60 ms under ingest). Now the
batch is made by a background thread once fewer than ``_SPARE_LOW`` are left: a store makes
one itself only at first use (or when the background one failed), and one that finds none
left while a batch is being made waits for it rather than making a second. A batch begun
before ``recover`` is not handed out afterwards; nothing is lost or handed out twice.
"""

from __future__ import annotations

import errno
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from pacsvault.storage import objects as objects_module
from pacsvault.storage.objects import ObjectStore

BATCH = objects_module._SPARE_BATCH
LOW = objects_module._SPARE_LOW


def _store(tmp_path: Path) -> ObjectStore:
    store = ObjectStore(tmp_path / "objects")
    store.create()
    return store


def _settled(store: ObjectStore, within: float = 10.0) -> None:
    """Wait for the background batch in the making, if any."""
    deadline = time.monotonic() + within
    while store._refilling:
        assert time.monotonic() < deadline, "the background batch never finished"
        time.sleep(0.01)
    for thread in threading.enumerate():  # (a dropped batch's files go after the flag)
        if thread.name == "spare-refill":
            thread.join(max(0.0, deadline - time.monotonic()))


def _spare_files(tmp_path: Path) -> dict[str, int]:
    return {p.name.removesuffix(".part"): p.stat().st_size
            for p in (tmp_path / "objects" / ".spare").iterdir()}


def _counting(monkeypatch: pytest.MonkeyPatch,
              before: Callable[[], object] | None = None) -> list[str]:
    """Record which thread makes each batch (``_new_spares``); ``before`` runs first in a
    background thread (to hold or fail it)."""
    makers: list[str] = []
    original = ObjectStore._new_spares

    def counted(self: ObjectStore) -> list[str]:
        name = threading.current_thread().name
        makers.append(name)
        if before is not None and name == "spare-refill":
            before()
        return original(self)

    monkeypatch.setattr(ObjectStore, "_new_spares", counted)
    return makers


def test_batches_after_the_first_are_made_in_the_background(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    makers = _counting(monkeypatch)
    store = _store(tmp_path)
    taken = [store.stage_spare([f"object-{k}".encode()]) for k in range(BATCH - LOW + 1)]
    _settled(store)
    assert makers == ["MainThread", "spare-refill"]
    assert len(store._spares) == LOW - 1 + BATCH  # the next batch is there before need
    files = _spare_files(tmp_path)
    assert len(files) == len(taken) + len(store._spares)
    # many more, each a file of its own with its own bytes, no id handed out twice
    for k in range(len(taken), 4 * BATCH):
        taken.append(store.stage_spare([f"object-{k}".encode()]))
        if k % 16 == 0:
            _settled(store)  # (slower than the refills: no store waits or makes one)
    _settled(store)
    assert len(set(taken)) == len(taken)
    assert makers[0] == "MainThread" and set(makers[1:]) == {"spare-refill"}
    for k, object_id in enumerate(taken):
        assert store.read(object_id) == f"object-{k}".encode()


def test_a_store_that_finds_none_left_waits_for_the_batch_in_the_making(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    release = threading.Event()
    makers = _counting(monkeypatch, lambda: release.wait(30))
    store = _store(tmp_path)
    for k in range(BATCH):  # the first batch, all of it; the second is held
        store.stage_spare([f"object-{k}".encode()])
    assert store._spares == [] and store._refilling
    got: list[str] = []
    waiting = threading.Thread(target=lambda: got.append(store.stage_spare([b"late"])))
    waiting.start()
    waiting.join(0.3)
    assert waiting.is_alive() and not got  # waits; makes no batch of its own
    release.set()
    waiting.join(10)
    assert got and store.read(got[0]) == b"late"
    assert makers == ["MainThread", "spare-refill"]  # one batch more, not two


def test_a_failed_background_batch_is_made_by_the_next_store_that_needs_it(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def disk_full() -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    makers = _counting(monkeypatch, disk_full)
    store = _store(tmp_path)
    taken = []
    for k in range(BATCH + 3):  # past the end of the first batch
        taken.append(store.stage_spare([f"object-{k}".encode()]))
        _settled(store)
    # one background attempt, then the store that found none left made it (no attempt
    # per store meanwhile); then background batches again
    assert makers[:3] == ["MainThread", "spare-refill", "MainThread"]
    assert all(store.read(i) == f"object-{k}".encode() for k, i in enumerate(taken))
    # when the store's own attempt fails too, the store gets the error (nothing written)
    monkeypatch.setattr(ObjectStore, "_new_spares", lambda self: disk_full())
    store._spares.clear()
    with pytest.raises(OSError):
        store.stage_spare([b"refused"])


def test_a_batch_begun_before_recover_is_not_handed_out(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    release = threading.Event()
    _counting(monkeypatch, lambda: release.wait(30))
    store = _store(tmp_path)
    kept = store.stage_spare([b"kept"])
    for k in range(BATCH - LOW):  # the background batch starts, and is held
        store.stage_spare([f"dropped-{k}".encode()])
    assert store._refilling
    result = store.recover(lambda object_id: object_id == kept)
    assert result.published == 1
    release.set()
    _settled(store)
    assert store._spares == []  # its batch was made after recover: not handed out
    assert _spare_files(tmp_path) == {}  # ...and removed
    fresh = store.stage_spare([b"fresh"])
    assert store.read(fresh) == b"fresh" and store.read(kept) == b"kept"
