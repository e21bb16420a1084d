"""The archive's fast path: group commit, primary-key caches, spare staging files.

Each concurrent ``store`` must return only once its own row is committed and its object
durable; caches may only ever hold committed rows; a failing item of a group commit fails
alone; staging leaves nothing behind.
"""

from __future__ import annotations

import errno
import hashlib
import os
import threading
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from io import BytesIO
from pathlib import Path
from typing import Any

import pytest
from pydicom import dcmread
from pydicom.uid import generate_uid
from sqlalchemy import select

from pacsvault.index.models import Instance, Series, Study
from pacsvault.storage import objects as objects_module
from pacsvault.storage.archive import Archive, StoreStatus
from pacsvault.storage.objects import ObjectStore
from pacsvault.vault import Vault, create
from tests import corpus


@pytest.fixture
def vault(tmp_path: Path) -> Any:
    create(tmp_path / "data", key_file=tmp_path / "key")
    opened = Vault.open(tmp_path / "data", tmp_path / "key")
    yield opened
    opened.close()


def _series(tmp: Path, name: str, count: int, *, study: str | None = None,
            modality: str = "CT", size: int = 16) -> list[bytes]:
    """``count`` slices of one new series (in ``study`` if given), as bytes; ``size`` x
    ``size`` pixels (16: ~1 KB, staged and fsync'ed by the storing thread; 256: 128 KB,
    above ``archive._INLINE_MAX``, by a worker beside the hash and the rows)."""
    files = corpus.synthetic_ct_series(tmp / name, count, size=size)
    out = []
    series_uid = generate_uid()
    for f in files:
        ds = dcmread(f)
        if study is not None:
            ds.StudyInstanceUID = study
        ds.SeriesInstanceUID = series_uid
        ds.Modality = modality
        ds.save_as(f, enforce_file_format=True)
        out.append(f.read_bytes())
    return out


def _visible_elsewhere(vault: Vault, sop_uid: str) -> bool:
    """Committed: another connection sees the row."""
    with vault.engine.connect() as conn:
        return conn.scalar(select(Instance.pk).where(Instance.sop_uid == sop_uid)) is not None


def test_concurrent_stores_each_durable_and_counted(vault: Vault, tmp_path: Path) -> None:
    first = _series(tmp_path, "a", 12)
    study = str(dcmread(corpus.synthetic_ct_series(tmp_path / "probe", 1, size=16)[0])
                .StudyInstanceUID)
    streams = [first, _series(tmp_path, "b", 12, study=study, modality="MR"),
               _series(tmp_path, "c", 12, study=study, modality="CT"),
               _series(tmp_path, "d", 12)]
    seen: list[bool] = []
    lock = threading.Lock()

    def push(raws: list[bytes]) -> None:
        for raw in raws:
            result = vault.archive.store(raw)
            assert result.status is StoreStatus.STORED
            # The moment store returns, the row is committed and the object readable.
            ok = _visible_elsewhere(vault, result.sop_uid)
            item = next(vault.archive.locate(sop_uid=result.sop_uid))
            ok = ok and vault.archive.read(item) == raw
            with lock:
                seen.append(ok)

    with ThreadPoolExecutor(4) as pool:
        for f in [pool.submit(push, raws) for raws in streams]:
            f.result()
    assert seen == [True] * 48
    counts = vault.archive.counts()
    assert (counts["instances"], counts["series"]) == (48, 4)
    with vault.sessions() as session:
        studies = {s.study_uid: s for s in session.scalars(select(Study))}
        for s in studies.values():
            assert s.num_instances == sum(
                x.num_instances for x in session.scalars(select(Series).where(
                    Series.study_pk == s.pk)))
        shared = studies[study]
        assert (shared.num_series, shared.num_instances) == (2, 24)
        assert shared.modalities == "CT\\MR"
    # nothing left staged once publications settled (spares are empty placeholders)
    vault.archive.settle()
    root = vault.objects.root
    assert list((root / ".tmp").iterdir()) == []
    assert all(p.stat().st_size == 0 for p in (root / ".spare").iterdir())


def test_same_instance_from_two_associations_is_stored_once(
        vault: Vault, tmp_path: Path) -> None:
    raws = _series(tmp_path, "dup", 6)
    barrier = threading.Barrier(2)

    def push() -> list[StoreStatus]:
        barrier.wait()
        return [vault.archive.store(raw).status for raw in raws]

    with ThreadPoolExecutor(2) as pool:
        a, b = (f.result() for f in [pool.submit(push), pool.submit(push)])
    for x, y in zip(a, b, strict=True):
        assert Counter([x, y]) == Counter([StoreStatus.STORED, StoreStatus.DUPLICATE])
    assert vault.archive.counts()["instances"] == 6


def test_failing_item_fails_alone_and_caches_hold_committed_rows_only(
        vault: Vault, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    archive: Archive = vault.archive
    raws = _series(tmp_path, "f", 8)
    archive.store(raws[0])
    bad_sop = str(dcmread(tmp_path / "f" / "ct0003.dcm").SOPInstanceUID)
    original = Archive._index_one

    def flaky(self: Archive, conn: Any, item: Any, *args: Any) -> None:
        original(self, conn, item, *args)
        if item.parsed.sop_uid == bad_sop:
            raise RuntimeError("simulated index failure")

    monkeypatch.setattr(Archive, "_index_one", flaky)
    results: dict[int, object] = {}

    def push(i: int) -> None:
        try:
            results[i] = archive.store(raws[i]).status
        except RuntimeError as exc:
            results[i] = exc

    with ThreadPoolExecutor(4) as pool:
        list(pool.map(push, range(1, 8)))
    assert isinstance(results[3], RuntimeError)
    assert all(results[i] is StoreStatus.STORED for i in (1, 2, 4, 5, 6, 7))
    assert not _visible_elsewhere(vault, bad_sop)
    monkeypatch.setattr(Archive, "_index_one", original)
    assert archive.store(raws[3]).status is StoreStatus.STORED
    assert archive.counts()["instances"] == 8

    # A new series whose commit fails is not cached: the next store creates the row.
    other = _series(tmp_path, "g", 2)

    def failing_commit(self: Archive, batch: list[Any]) -> None:
        raise RuntimeError("disk gone")

    monkeypatch.setattr(Archive, "_index_batch", failing_commit)
    with pytest.raises(RuntimeError):
        archive.store(other[0])
    monkeypatch.undo()
    archive.forget()
    for raw in other:
        assert archive.store(raw).status is StoreStatus.STORED
    assert archive.counts()["series"] == 2


def test_spares_are_durable_and_settled_by_recovery(tmp_path: Path) -> None:
    store = ObjectStore(tmp_path / "objects")
    store.create()
    kept = store.stage_spare([b"ciphertext-kept"])
    dropped = store.stage_spare([b"ciphertext-dropped"])
    assert store.read(kept) == b"ciphertext-kept"  # readable while staged
    spares = list((tmp_path / "objects" / ".spare").iterdir())
    assert len(spares) > 2  # a batch of empty placeholders was created at once
    result = ObjectStore(tmp_path / "objects").recover(lambda object_id: object_id == kept)
    # unused empty spares are removed without counting as discarded objects
    assert (result.published, result.discarded) == (1, 1)
    assert store.path(kept).read_bytes() == b"ciphertext-kept"
    assert not store.path(dropped).exists()
    assert list((tmp_path / "objects" / ".spare").iterdir()) == []


def test_a_spare_batch_shares_one_directory_made_with_it(tmp_path: Path) -> None:
    """Issue 17: a batch's ids share their ``ab/cd`` directory, made with the batch, so
    publishing is a plain rename; the ids stay 32 random-looking hex digits, distinct."""
    store = ObjectStore(tmp_path / "objects")
    store.create()
    ids = [store.stage_spare([f"ciphertext-{k}".encode()]) for k in range(5)]
    assert len(set(ids)) == 5 and all(len(i) == 32 for i in ids)
    assert len({i[:4] for i in ids}) == 1
    home = store.path(ids[0]).parent
    assert home.is_dir()  # before any publication
    for k, object_id in enumerate(ids):
        store.publish(object_id, durable=False)
        assert store.path(object_id).read_bytes() == f"ciphertext-{k}".encode()
    assert sorted(p.name for p in home.iterdir()) == sorted(f"{i}.pvo" for i in ids)


def _new_study_image(tmp: Path, name: str, size: int = 16) -> bytes:
    return _series(tmp, name, 1, size=size)[0]


# Both ways an object is made durable: a small one staged and fsync'ed by the storing
# thread itself while other stores are under way, else (alone, or large) by a worker
# beside the hash and the rows (``Archive._inline``).
SIZES = pytest.mark.parametrize("size,busy", [(16, True), (16, False), (256, True)],
                                ids=["small-inline", "small-alone-worker", "large-worker"])


@contextmanager
def _others_under_way(archive: Archive, busy: bool) -> Iterator[None]:
    """As if another small store of this process were on its way (``_arrive``)."""
    if not busy:
        yield
        return
    with archive._cond:
        archive._in_flight += 1
    try:
        yield
    finally:
        with archive._cond:
            archive._in_flight -= 1


@SIZES
def test_no_row_commits_before_its_object_is_durable(
        vault: Vault, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, size: int,
        busy: bool) -> None:
    """Issue 17: the commit waits for the object's fsync (a large object's runs beside the
    rows and the trail record; a small one's in the storing thread before it queues).
    Held in its fsync, a store has no committed row and has not returned (no
    acknowledgement); released, it commits. For a study already cached and a new study."""
    raws = _series(tmp_path, "s", 2, size=size)
    vault.archive.store(raws[0])  # the study is cached from here on
    original = objects_module._sync
    reached, release = threading.Event(), threading.Event()

    def held(fd: int, path: Path) -> None:
        reached.set()
        assert release.wait(30)
        original(fd, path)

    monkeypatch.setattr(objects_module, "_sync", held)
    for raw in (raws[1], _new_study_image(tmp_path, "n", size)):
        reached.clear()
        release.clear()
        sop_uid = str(dcmread(BytesIO(raw)).SOPInstanceUID)
        with ThreadPoolExecutor(1) as pool, _others_under_way(vault.archive, busy):
            storing = pool.submit(vault.archive.store, raw)
            assert reached.wait(30)
            time.sleep(0.3)  # time enough to commit, were it not waiting
            assert not storing.done()
            assert not _visible_elsewhere(vault, sop_uid)
            release.set()
            assert storing.result(30).status is StoreStatus.STORED
        assert _visible_elsewhere(vault, sop_uid)


@SIZES
def test_a_failed_object_fsync_refuses_the_store_and_leaves_nothing(
        vault: Vault, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, size: int,
        busy: bool) -> None:
    raws = _series(tmp_path, "e", 2, size=size)
    vault.archive.store(raws[0])
    fsync = os.fsync

    def failing(fd: int) -> None:
        if "/.spare/" in os.readlink(f"/proc/self/fd/{fd}"):
            raise OSError(errno.EIO, "simulated I/O error")
        fsync(fd)

    monkeypatch.setattr(os, "fsync", failing)
    for raw in (raws[1], _new_study_image(tmp_path, "x", size)):
        with pytest.raises(OSError), _others_under_way(vault.archive, busy):
            vault.archive.store(raw)
        assert not _visible_elsewhere(vault, str(dcmread(BytesIO(raw)).SOPInstanceUID))
    monkeypatch.undo()
    vault.archive.settle()
    root = vault.objects.root
    assert all(p.stat().st_size == 0 for p in (root / ".spare").iterdir())
    assert vault.archive.store(raws[1]).status is StoreStatus.STORED
    assert vault.archive.counts()["instances"] == 2


def _four_streams(vault: Vault, tmp_path: Path, size: int = 16) -> list[list[bytes]]:
    """Four series of 6 slices (two of them in one study), each one's first slice stored:
    their studies are cached, so the rest take the cached study's path (staged by the
    storing thread when small, by the staging worker when large)."""
    study = str(dcmread(corpus.synthetic_ct_series(tmp_path / "probe", 1, size=16)[0])
                .StudyInstanceUID)
    streams = [_series(tmp_path, f"g{k}", 6, study=study if k % 2 else None, size=size)
               for k in range(4)]
    for raws in streams:
        vault.archive.store(raws[0])
    return streams


def _push_together(vault: Vault, streams: list[list[bytes]]) -> list[object]:
    """The streams' other slices stored by four threads at once (their stores share group
    commits): each store's status, or the ``OSError`` it raised."""
    outcomes: list[object] = []
    lock = threading.Lock()

    def push(raws: list[bytes]) -> None:
        for raw in raws[1:]:
            try:
                outcome: object = vault.archive.store(raw).status
            except OSError as exc:
                outcome = exc
            with lock:
                outcomes.append(outcome)

    with ThreadPoolExecutor(4) as pool:
        for f in [pool.submit(push, raws) for raws in streams]:
            f.result()
    return outcomes


@SIZES
def test_a_failed_object_fsync_in_a_group_commit_fails_alone(
        vault: Vault, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, size: int,
        busy: bool) -> None:
    streams = _four_streams(vault, tmp_path, size)
    fsync = os.fsync
    armed = threading.Lock()
    failures: list[int] = []

    def failing_once(fd: int) -> None:
        if "/.spare/" in os.readlink(f"/proc/self/fd/{fd}") and armed.acquire(blocking=False):
            failures.append(fd)
            raise OSError(errno.EIO, "simulated I/O error")
        fsync(fd)

    monkeypatch.setattr(os, "fsync", failing_once)
    with _others_under_way(vault.archive, busy):
        outcomes = _push_together(vault, streams)
    assert len(failures) == 1
    assert sum(isinstance(o, OSError) for o in outcomes) == 1
    assert outcomes.count(StoreStatus.STORED) == 19
    assert vault.archive.counts()["instances"] == 23


def test_each_image_is_hashed_once_by_the_storing_thread(
        vault: Vault, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Issue 17: an image's SHA-256 is computed once, by the thread that stores it, while
    a worker encrypts and writes it (hashing lets the interpreter's lock go): the object's
    fsync, which the commit waits for, starts sooner. Before, a study already cached had
    its image hashed in the worker (the storing thread waiting for it), and a new study's
    image was hashed twice. Both paths; the index's digest is the bytes' SHA-256 and the
    bytes read back are the ones sent."""
    raws = _series(tmp_path, "h", 2)
    real = hashlib.sha256
    hashed: list[tuple[int, bool]] = []
    storing = threading.get_ident()
    smallest = min(len(r) for r in raws)

    def counted(data: Any = b"", **kwargs: Any) -> Any:
        if len(data) >= smallest:  # an image's bytes, not a record's
            hashed.append((len(data), threading.get_ident() == storing))
        return real(data, **kwargs)

    monkeypatch.setattr(hashlib, "sha256", counted)
    for raw in raws:  # a new study, then the same study, cached
        hashed.clear()
        assert vault.archive.store(raw).status is StoreStatus.STORED
        assert hashed == [(len(raw), True)]
    monkeypatch.undo()
    for raw in raws:
        sop_uid = str(dcmread(BytesIO(raw)).SOPInstanceUID)
        with vault.engine.connect() as conn:
            digest = conn.scalar(select(Instance.sha256).where(Instance.sop_uid == sop_uid))
        assert digest is not None and bytes(digest) == hashlib.sha256(raw).digest()
        (found,) = vault.archive.locate(sop_uid=sop_uid)
        assert vault.archive.read(found) == raw
        assert vault.archive.store(raw).status is StoreStatus.DUPLICATE


@SIZES
def test_a_failed_staging_in_a_group_commit_fails_alone_and_leaves_nothing(
        vault: Vault, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, size: int,
        busy: bool) -> None:
    """A store whose object could not be written (here its staging fails, as a full
    disk's write would) is refused alone while four threads store together: every other
    store is stored, and no object or row of the refused one is left."""
    streams = _four_streams(vault, tmp_path, size)
    real_stage = vault.archive._stage
    armed = threading.Lock()
    refused: list[str] = []

    def failing_once(raw: bytes, key_id: Any, sop_uid: str) -> Any:
        if armed.acquire(blocking=False):
            refused.append(sop_uid)
            time.sleep(0.05)  # the other threads' stores go on meanwhile
            raise OSError(errno.ENOSPC, "simulated full disk")
        return real_stage(raw, key_id, sop_uid)

    monkeypatch.setattr(vault.archive, "_stage", failing_once)
    with _others_under_way(vault.archive, busy):
        outcomes = _push_together(vault, streams)
    assert len(refused) == 1
    assert sum(isinstance(o, OSError) for o in outcomes) == 1
    assert outcomes.count(StoreStatus.STORED) == 19
    assert vault.archive.counts()["instances"] == 23
    assert not _visible_elsewhere(vault, refused[0])
    vault.archive.settle()
    root = vault.objects.root
    assert all(p.stat().st_size == 0 for p in (root / ".spare").iterdir())
    assert not (root / ".tmp").is_dir() or not list((root / ".tmp").iterdir())
    assert sum(1 for p in root.rglob("*") if p.is_file() and p.stat().st_size) == 23


@pytest.mark.parametrize("busy", [True, False], ids=["others-under-way", "alone"])
def test_a_small_objects_fsync_is_the_storing_threads_a_large_ones_a_workers(
        vault: Vault, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, busy: bool) -> None:
    """Issue 17: while other stores are under way, an object of at most
    ``archive._INLINE_MAX`` bytes is staged and fsync'ed by the thread that stores it (a
    hand-off to a worker cost more context switches and CPU than the overlap saved:
    one-instance studies over four associations); a larger one's fsync runs in a worker
    beside the rows, and so does a small one's stored alone (one association: the overlap
    with the commit is its latency). New study and cached study alike."""
    from pacsvault.storage import archive as archive_module

    original = objects_module._sync
    synced_by: list[bool] = []
    storing = threading.get_ident()

    def recorded(fd: int, path: Path) -> None:
        synced_by.append(threading.get_ident() == storing)
        original(fd, path)

    monkeypatch.setattr(objects_module, "_sync", recorded)
    for size, small in ((16, True), (256, False)):
        raws = _series(tmp_path, f"t{size}", 2, size=size)
        assert (len(raws[0]) <= archive_module._INLINE_MAX) is small
        for raw in raws:  # a new study, then the same study, cached
            synced_by.clear()
            with _others_under_way(vault.archive, busy):
                assert vault.archive.store(raw).status is StoreStatus.STORED
            assert synced_by == [small and busy]
