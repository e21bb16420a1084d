"""The object store's string paths (issue 17: built without pathlib on the store path) name
exactly the files the ``Path`` methods name, refuse the same ids, and every place an
object may be in (spare, ``.tmp``, published) is still found by ``read``."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from pacsvault.storage.objects import ObjectStore, check_id


def test_names_are_the_path_methods(tmp_path: Path) -> None:
    store = ObjectStore(tmp_path / "objects")
    for _ in range(50):
        object_id = store.new_id()
        home, final, spare = store._names(object_id)
        assert Path(final) == store.path(object_id)
        assert Path(home) == store.path(object_id).parent
        assert Path(spare) == store._spare_path(object_id)


@pytest.mark.parametrize("bad", ["", "0" * 31, "0" * 33, "A" * 32, "g" * 32,
                                 "../" + "0" * 29, "0" * 31 + "\n", "０" * 32])
def test_bad_ids_refused(tmp_path: Path, bad: str) -> None:
    store = ObjectStore(tmp_path / "objects")
    with pytest.raises(ValueError):
        check_id(bad)
    with pytest.raises(ValueError):
        store._names(bad)
    with pytest.raises(ValueError):
        store.read(bad)


def test_read_finds_every_place(tmp_path: Path) -> None:
    store = ObjectStore(tmp_path / "objects")
    store.create()
    spare_id, sync = store.write_spare([b"spare ", b"bytes"])
    sync()
    assert store.read(spare_id) == b"spare bytes"  # staged in a spare
    store.publish(spare_id, durable=False)
    assert store.read(spare_id) == b"spare bytes"  # published
    assert store.path(spare_id).is_file() and not store._spare_path(spare_id).exists()
    tmp_id = store.new_id()
    store.stage(tmp_id, [b"tmp"])
    assert store.read(tmp_id) == b"tmp"  # staged under .tmp
    store.publish(tmp_id)  # from .tmp, durably, its ab/cd made on the way
    assert store.read(tmp_id) == b"tmp" and store.exists(tmp_id)
    with pytest.raises(FileNotFoundError):
        store.read(store.new_id())


def test_failed_spare_write_removes_the_file(tmp_path: Path) -> None:
    store = ObjectStore(tmp_path / "objects")
    store.create()

    def pieces() -> Iterator[bytes]:
        yield b"x"
        raise OSError(5, "I/O error")

    with pytest.raises(OSError):
        store.write_spare(pieces())
    assert [p for p in (tmp_path / "objects" / ".spare").iterdir() if p.stat().st_size] == []


@pytest.mark.parametrize("size", [0, 1, 4095, 525_000, (1 << 20) + 33])
def test_read_returns_the_whole_file(tmp_path: Path, size: int,
                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """``read`` takes a file in one read of its size (issue 17): every byte, also when the
    kernel hands it over in short reads."""
    store = ObjectStore(tmp_path / "objects")
    store.create()
    data = bytes(range(256)) * (size // 256) + bytes(size % 256)
    object_id, sync = store.write_spare([data])
    sync()
    assert store.read(object_id) == data
    real_read = os.read
    monkeypatch.setattr(os, "read", lambda fd, n: real_read(fd, min(n, 1000)))
    assert store.read(object_id) == data
