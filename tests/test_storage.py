"""The object store's two-phase write and crash recovery, and the archive's read path."""

from __future__ import annotations

from pathlib import Path

import pytest

from pacsvault.crypto.objects import ObjectFormatError
from pacsvault.storage.objects import ObjectStore
from pacsvault.vault import Vault, create
from tests import corpus


def test_recover_publishes_indexed_and_discards_unacknowledged(tmp_path: Path) -> None:
    store = ObjectStore(tmp_path / "objects")
    store.create()
    kept, dropped = ObjectStore.new_id(), ObjectStore.new_id()
    store.stage(kept, [b"ciphertext-1"])
    store.stage(dropped, [b"ciphertext-2"])
    (tmp_path / "objects" / ".tmp" / "junk").write_bytes(b"x")
    # A staged object is readable before publication (the index may already name it).
    assert store.read(kept) == b"ciphertext-1"
    result = store.recover(lambda object_id: object_id == kept)
    assert (result.published, result.discarded) == (1, 2)
    assert store.path(kept).read_bytes() == b"ciphertext-1"
    assert not store.path(dropped).exists()
    assert list((tmp_path / "objects" / ".tmp").iterdir()) == []


def test_store_leaves_nothing_staged_and_detects_swapped_files(tmp_path: Path) -> None:
    create(tmp_path / "data", key_file=tmp_path / "key")
    vault = Vault.open(tmp_path / "data", tmp_path / "key")
    try:
        files = corpus.synthetic_ct_series(tmp_path / "c", 2, size=16)
        for f in files:
            vault.archive.store(f.read_bytes())
        assert list((tmp_path / "data" / "objects" / ".tmp").iterdir()) == []
        vault.archive.settle()  # publication (the rename into place) runs after store
        a, b = list(vault.archive.locate())
        assert vault.archive.read(a) == files[0].read_bytes()
        # An attacker with write access swaps two ciphertext files: both fail to open.
        pa, pb = vault.objects.path(a.object_id), vault.objects.path(b.object_id)
        da, db = pa.read_bytes(), pb.read_bytes()
        pa.write_bytes(db)
        pb.write_bytes(da)
        with pytest.raises(ObjectFormatError):
            vault.archive.read(a)
        # Nothing from the datasets is stored in clear.
        assert b"Batch^Crash" not in da and b"PVBATCH01" not in da
    finally:
        vault.close()
