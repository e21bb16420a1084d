"""A group commit's batches (issue 17): stores queued while a batch's first rows are
written join it (``GroupCommit._index_batch``'s ``late``), and a committer waits a little
for the stores of its process still in flight (``GroupCommit._gather``).

Why: what joins late must end exactly as if it had been taken at first: the same rows,
one store record naming every instance of the batch (written after the last row), every
item marked done, and an item that fails alone leaves the others stored (the batch is
redone one by one, late items included). The same instances go into two fresh vaults:
whole batches taken at once, and the same batches handed over one item at a time through
``late``.
"""

from __future__ import annotations

import secrets
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from pacsvault.dicomfile import parse
from pacsvault.dicomfile.parse import UnreadableObject
from pacsvault.storage import group_commit
from pacsvault.storage.archive import Archive, StoreResult
from pacsvault.storage.rows import Pending
from pacsvault.vault import Vault, create
from tests.test_store_rows_sqlite import _batches, _dump


def _pending(archive: Archive, raws: list[bytes]) -> list[Pending]:
    items = []
    for raw in raws:
        parsed = parse.parse(raw)
        chosen = archive._choose(parsed)
        assert not isinstance(chosen, StoreResult)
        key_id, generation, minted = chosen
        items.append(Pending(parsed, secrets.token_hex(16), key_id, "SCU", generation,
                             new_key=minted))
    return items


def _settle(archive: Archive, batch: list[Pending]) -> list[str]:
    out = []
    for item in batch:
        if item.new_key is not None:
            archive._minted.release(item.parsed, item.key_id)
        assert item.done
        out.append("error" if item.error is not None
                   else "stored" if item.result is None else item.result.status.value)
    return out


def _one_at_a_time(rest: list[Pending], asked: list[int]) -> Callable[[int], list[Pending]]:
    """A queue that receives one more store each time it is read (what joins late)."""
    def late(limit: int) -> list[Pending]:
        asked.append(limit)
        return [rest.pop(0)] if rest and limit > 0 else []
    return late


def _committed(vault: Vault) -> list[dict[str, Any]]:
    return [r.detail for r in vault.audit.records() if r.action == "dicom.store.committed"]


def _named(vault: Vault) -> list[dict[str, Any]]:
    """The store records' references (instances, studies, patients), decrypted."""
    return [r.refs for r in vault.audit.records() if r.action == "dicom.store.committed"]


def _open(root: Path) -> Vault:
    create(root / "data", key_file=root / "key")
    return Vault.open(root / "data", root / "key")


def test_late_items_end_as_if_taken_at_first(tmp_path: Path) -> None:
    batches = _batches(tmp_path)
    dumps, outcomes, details, named = [], [], [], []
    for name in ("at-once", "late"):
        vault = _open(tmp_path / name)
        try:
            archive = vault.archive
            got: list[str] = []
            for k, raws in enumerate(batches):
                if k == 3:
                    archive.forget()
                items = _pending(archive, raws)
                if name == "at-once":
                    archive._run_batch(lambda b=items: b)  # type: ignore[misc]
                    batch = items
                else:
                    first, rest = items[:1], items[1:]
                    asked: list[int] = []
                    archive._run_batch(lambda f=first: f,  # type: ignore[misc]
                                       _one_at_a_time(rest, asked))
                    assert not rest and first == items  # every one joined, in order
                    assert asked[0] == group_commit._MAX_BATCH - 1
                    batch = first
                got += _settle(archive, batch)
            outcomes.append(got)
            dumps.append(_dump(vault))
            details.append(_committed(vault))
            named.append(_named(vault))
        finally:
            vault.close()
    assert outcomes[0] == outcomes[1]
    assert dumps[0] == dumps[1]
    # one record per batch, each counting the whole batch (late items included)
    assert details[0] == details[1]
    assert named[0] == named[1] and all(refs for refs in named[1])
    assert [d["instances"] for d in details[1]] == [3, 2, 4, 2, 2]


def test_late_take_stops_at_the_batch_limit(tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(group_commit, "_MAX_BATCH", 3)
    vault = _open(tmp_path / "v")
    try:
        archive = vault.archive
        raws = [raw for batch in _batches(tmp_path)[:2] for raw in batch]  # 5 stores
        items = _pending(archive, raws)
        first, rest = items[:1], items[1:]
        asked: list[int] = []
        archive._run_batch(lambda: first, _one_at_a_time(rest, asked))
        assert len(first) == 3 and len(rest) == 2 and asked == [2, 1]
        assert all(item.done and item.error is None for item in first)
        assert [d["instances"] for d in _committed(vault)] == [3]
    finally:
        vault.close()


def test_a_late_item_failing_alone_leaves_the_others_stored(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    vault = _open(tmp_path / "v")
    try:
        archive = vault.archive
        items = _pending(archive, _batches(tmp_path)[0])
        bad = items[2]
        original = Archive._index_one

        def index_one(self: Archive, conn: Any, item: Pending, *args: Any) -> None:
            if item is bad:
                raise RuntimeError("this one only")
            original(self, conn, item, *args)

        monkeypatch.setattr(Archive, "_index_one", index_one)
        first, rest = items[:1], items[1:]
        archive._run_batch(lambda: first, _one_at_a_time(rest, []))
        assert first == items and all(item.done for item in items)
        assert [type(item.error) for item in items] == [type(None), type(None), RuntimeError]
        assert archive.counts()["instances"] == 2
        # redone one by one: one record per stored instance, none for the failed one
        assert [d["instances"] for d in _committed(vault)] == [1, 1]
    finally:
        vault.close()


# --- gathering the stores in flight (``GroupCommit._gather``) ---------------------------


def _held(monkeypatch: pytest.MonkeyPatch, sop_uid: str) -> tuple[threading.Event,
                                                                   threading.Event]:
    """(reached, release): the store of ``sop_uid`` stops in ``_choose`` (in flight, not
    queued) until ``release`` is set."""
    reached, release = threading.Event(), threading.Event()
    original = Archive._choose

    def choose(self: Archive, parsed: Any) -> Any:
        if parsed.sop_uid == sop_uid:
            reached.set()
            assert release.wait(30)
        return original(self, parsed)

    monkeypatch.setattr(Archive, "_choose", choose)
    return reached, release


def test_a_committer_waits_for_a_store_in_flight_and_they_share_the_commit(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(group_commit, "_GATHER_S", 30.0)
    vault = _open(tmp_path / "v")
    try:
        archive = vault.archive
        first, second = _batches(tmp_path)[0][:2]
        reached, release = _held(monkeypatch, parse.parse(second).sop_uid)
        results: list[Any] = []
        other = threading.Thread(target=lambda: results.append(
            archive.store(second, source_ae="SCU")))
        other.start()
        assert reached.wait(30)
        threading.Timer(0.2, release.set).start()  # queues while the committer waits
        assert archive.store(first, source_ae="SCU").status.value == "stored"
        other.join(30)
        assert [r.status.value for r in results] == ["stored"]
        assert [d["instances"] for d in _committed(vault)] == [2]  # one batch, one record
        assert archive._in_flight == 0
    finally:
        vault.close()


def test_the_wait_is_bounded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(group_commit, "_GATHER_S", 0.05)
    vault = _open(tmp_path / "v")
    try:
        archive = vault.archive
        first, second = _batches(tmp_path)[0][:2]
        reached, release = _held(monkeypatch, parse.parse(second).sop_uid)
        other = threading.Thread(target=lambda: archive.store(second, source_ae="SCU"))
        other.start()
        assert reached.wait(30)
        try:
            archive.store(first, source_ae="SCU")  # returns although ``second`` is held
            assert [d["instances"] for d in _committed(vault)] == [1]
        finally:
            release.set()
            other.join(30)
        assert [d["instances"] for d in _committed(vault)] == [1, 1]
        assert archive._in_flight == 0
    finally:
        vault.close()


def test_one_association_never_waits_and_refused_stores_are_not_waited_for(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    vault = _open(tmp_path / "v")
    try:
        archive = vault.archive

        def no_wait(timeout: float | None = None) -> bool:
            raise AssertionError("a lone store waited")

        monkeypatch.setattr(archive._arrivals, "wait", no_wait)
        for raw in _batches(tmp_path)[0]:
            archive.store(raw, source_ae="SCU")
        archive.store(_batches(tmp_path)[0][0], source_ae="SCU")  # a duplicate
        with pytest.raises(UnreadableObject):
            archive.store(b"\0" * 128 + b"DICM" + b"\0" * 64, source_ae="SCU")
        assert archive._in_flight == 0
        assert [d["instances"] for d in _committed(vault)] == [1, 1, 1, 1]
    finally:
        vault.close()


def test_a_large_store_is_not_waited_for(tmp_path: Path) -> None:
    """Its own work outweighs what sharing a commit saves (``_GATHER_MAX_BYTES``)."""
    vault = _open(tmp_path / "v")
    try:
        archive = vault.archive
        archive._arrive(group_commit._GATHER_MAX_BYTES + 1)
        assert archive._in_flight == 0
        archive._depart()
        assert archive._in_flight == 0
        archive._arrive(group_commit._GATHER_MAX_BYTES)
        assert archive._in_flight == 1
        archive._depart()
        assert archive._in_flight == 0
    finally:
        vault.close()
