"""The object store: ciphertext files under ``DATA/objects``.

File names are random 128-bit ids, never UIDs or patient attributes. Writing is two-phase
so a crash can neither lose an acknowledged object nor leave one that nothing refers to:

1. ``stage``: write ``.tmp/<id>.part``, fsync (also fsync ``.tmp`` itself);
2. the caller commits the index row that names ``<id>``;
3. ``publish``: rename into ``ab/cd/<id>.pvo`` and fsync the directory.

At start, ``recover`` publishes every staged file whose id the index knows (the crash came
between 2 and 3) and deletes the others (the crash came before 2: never acknowledged).
Only ciphertext is ever written, staged files included.

``ObjectBackend`` is what the archive, reads, removals and the sealed store use of an object
store; ``ObjectStore`` (these files, the default) and ``storage.s3.S3Store`` (a bucket,
``[storage] url = "s3://..."``) implement it. ``storage.backends.open_store`` picks one.

The archive's fast path stages into **spares** instead (``stage_spare``): empty files
``.spare/<id>.part`` created in batches, whose names were made durable by one directory
fsync for the whole batch; a batch's ids share their ``ab/cd`` directory, made with the
batch, and the next batch is made by a background thread before this one runs out.
Writing an object into a spare and fsync'ing that file is then enough for it to survive a
crash under its name, with no directory fsync per object. Its publication is a plain
rename (``durable=False``): a crash either keeps it or leaves the object in ``.spare``,
where reads still find it and ``recover`` publishes it (indexed) or deletes it (not
indexed, or an unused empty spare).
"""

from __future__ import annotations

import contextlib
import errno
import functools
import logging
import os
import secrets
import shutil
import threading
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn, Protocol

from pacsvault.fsutil import fsync_dir, write_all, write_durably

log = logging.getLogger("pacsvault.storage")

TMP_DIR = ".tmp"
SPARE_DIR = ".spare"
_PART = ".part"
_SPARE_BATCH = 64
_SPARE_LOW = 48  # the next batch is made in the background below this many left
_HEX = frozenset("0123456789abcdef")


class DiskFullError(Exception):
    """Not enough free space to store more objects safely."""


class StorageUnavailable(OSError):
    """The object store cannot be reached or did not confirm a write (an S3 endpoint down,
    a PUT answered without the expected checksum): the store fails, never succeeds."""


@dataclass(frozen=True)
class Recovery:
    published: int
    discarded: int


class ObjectBackend(Protocol):
    """What the rest of pacsvault uses of an object store (local files or a bucket).

    The durability contract: ``stage_spare`` returns only once the object is durable under
    its new id (fsync'ed file; S3 PUT confirmed), *before* the caller commits the index row
    naming it; ``publish`` may be lazy; ``read`` finds an indexed object wherever it is
    (``FileNotFoundError`` when it is gone); ``remove`` deletes for good (removals).
    """

    kind: str

    def create(self) -> None: ...

    def check_space(self, incoming: int) -> None: ...

    def stage_spare(self, pieces: Iterable[bytes]) -> str: ...

    def publish(self, object_id: str, *, durable: bool = True) -> None: ...

    def discard(self, object_id: str) -> None: ...

    def exists(self, object_id: str) -> bool: ...

    def recover(self, is_indexed: Callable[[str], bool]) -> Recovery: ...

    def read(self, object_id: str) -> bytes: ...

    def delete(self, object_id: str) -> None: ...

    def remove(self, object_ids: Sequence[str]) -> int: ...


def check_id(object_id: str) -> str:
    """An object id is 32 lowercase hex digits (random, never a UID): anything else is
    refused before it reaches a path or a key name."""
    if len(object_id) != 32 or not _HEX.issuperset(object_id):
        raise ValueError("invalid object id")
    return object_id


def _read_whole(path: str) -> bytes:
    """A file's bytes in one ``read`` of its size: open, fstat, read, close.

    Why (issue 17, C-GET): ``open(path, "rb").read()`` made ~10 system calls per object
    (an isatty ioctl, lseeks, a second fstat, a read to find the end); a retrieval reads
    one object per sub-operation. An object file is never written once it has its name,
    so its size is known; a short read goes on until the end of the file. A file that
    grew after the fstat (it cannot, see above) would be read short: its last chunk then
    fails authentication, nothing wrong is served."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        size = os.fstat(fd).st_size
        data = os.read(fd, size)
        if len(data) < size:
            parts = [data]
            left = size - len(data)
            while left:
                more = os.read(fd, left)
                if not more:
                    break
                parts.append(more)
                left -= len(more)
            data = b"".join(parts)
        return data
    finally:
        os.close(fd)


class ObjectStore:
    kind = "local"

    def __init__(self, root: Path, min_free_bytes: int = 0) -> None:
        self.root = root
        self.min_free_bytes = min_free_bytes
        self._tmp = root / TMP_DIR
        self._spare = root / SPARE_DIR
        self._spares: list[str] = []
        self._spare_lock = threading.Lock()
        # A batch of spares being made in the background (``_refill``), and its wake-up for
        # a store that found none left; ``recover`` bumps the epoch (a batch begun before
        # it is not handed out).
        self._refilling = False
        self._refill_failed = False  # then the next batch is made inline, error and all
        self._spare_ready = threading.Condition(self._spare_lock)
        self._spare_epoch = 0
        # ``ab/cd`` directories known to exist, as strings (see ``_names``)
        self._known_dirs: set[str] = set()
        self._root_str = os.fspath(root)
        self._spare_str = os.fspath(self._spare)

    def create(self) -> None:
        self._tmp.mkdir(parents=True, exist_ok=True, mode=0o700)

    @staticmethod
    def new_id() -> str:
        return secrets.token_hex(16)

    def path(self, object_id: str) -> Path:
        check_id(object_id)
        return self.root / object_id[:2] / object_id[2:4] / f"{object_id}.pvo"

    def _names(self, object_id: str) -> tuple[str, str, str]:
        """(its ``ab/cd`` directory, its published path, its spare path) as strings, the
        id validated: what the store path uses per object. Issue 17: as ``Path`` objects
        (``path``, ``_spare_path``) these cost ~8-10 µs each here, three to four of them
        per stored image; the same strings built directly cost ~1 µs."""
        check_id(object_id)
        home = f"{self._root_str}/{object_id[:2]}/{object_id[2:4]}"
        return home, f"{home}/{object_id}.pvo", f"{self._spare_str}/{object_id}{_PART}"

    def _staged(self, object_id: str) -> Path:
        self.path(object_id)  # validates the id
        return self._tmp / f"{object_id}{_PART}"

    def check_space(self, incoming: int) -> None:
        free = shutil.disk_usage(self.root).free
        if free - incoming < self.min_free_bytes:
            raise DiskFullError("free disk space below the configured reserve")

    def stage(self, object_id: str, pieces: Iterable[bytes]) -> int:
        """Durably write an object under ``.tmp``; returns its size on disk."""
        tmp = self._staged(object_id)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        size = _fill(fd, tmp, pieces)
        fsync_dir(self._tmp)
        return size

    # --- spares: staging without a directory fsync per object ----------------------------

    def _spare_path(self, object_id: str) -> Path:
        self.path(object_id)  # validates the id
        return self._spare / f"{object_id}{_PART}"

    def _take_spare(self) -> str:
        """A spare's object id. The next batch is made in the background once fewer than
        ``_SPARE_LOW`` are left (``_refill``); a store finds none left only when stores
        outran that batch (it then waits for it), or at first use (it makes one itself).

        Why (issue 17): making a batch creates ``_SPARE_BATCH`` files and fsyncs their
        directory; under ingest, with the other threads' fsyncs keeping the file system's
        journal busy, that took ~1 ms per file here, and the store that found the list
        empty made the batch inline: one association stood still ~60 ms every 64 images
        (the filler's association threads spent ~18 % of their time there)."""
        with self._spare_lock:
            while not self._spares and self._refilling:
                self._spare_ready.wait()
            if not self._spares:
                self._spares = self._new_spares()
                self._refill_failed = False
            object_id = self._spares.pop()
            refill = (len(self._spares) < _SPARE_LOW and not self._refilling
                      and not self._refill_failed)
            if refill:
                self._refilling = True
                epoch = self._spare_epoch
        if refill:
            try:
                threading.Thread(target=self._refill, args=(epoch,), name="spare-refill",
                                 daemon=True).start()
            except BaseException:
                with self._spare_lock:
                    self._refilling = False
                    self._spare_ready.notify_all()
                raise
        return object_id

    def _refill(self, epoch: int) -> None:
        """Make the next batch of spares (``_take_spare``'s background thread). A failure
        (a full disk...) is left to the store that next finds none left: it makes the
        batch itself, and gets the error; no other background attempt until then."""
        made: list[str] = []
        try:
            made = self._new_spares()
        except Exception as exc:  # (the inline attempt reports it to its store)
            log.warning("spare object files could not be made (%s)", type(exc).__name__)
        finally:  # whatever happened, a store waiting for this batch is woken
            with self._spare_lock:
                self._refilling = False
                self._refill_failed = not made
                if made and epoch == self._spare_epoch:
                    self._spares.extend(made)
                    made = []
                self._spare_ready.notify_all()
        for object_id in made:  # ``recover`` ran meanwhile: not handed out
            with contextlib.suppress(OSError):
                os.unlink(self._names(object_id)[2])

    def _new_spares(self) -> list[str]:
        """A batch of empty spares, their names made durable by one directory fsync."""
        fresh = not self._spare.is_dir()
        self._spare.mkdir(exist_ok=True, mode=0o700)
        if fresh:
            fsync_dir(self.root)
        # One batch, one ``ab/cd`` directory: its ids share their first four hex digits
        # (the other 112 bits random), and the directory is made now, once, so
        # ``publish`` is a plain rename. Issue 17: in a vault with few objects nearly
        # every object needed a directory of its own (65,536 of them), and a ``mkdir``
        # cost this machine ~0.4 ms CPU, a tenth of a small image's store.
        prefix = secrets.token_hex(2)
        ids = [prefix + secrets.token_hex(14) for _ in range(_SPARE_BATCH)]
        home = self._names(ids[0])[0]
        if home not in self._known_dirs:
            Path(home).mkdir(parents=True, exist_ok=True, mode=0o700)
            self._known_dirs.add(home)  # not fsync'ed: as ``publish(durable=False)``
        for object_id in ids:
            os.close(os.open(self._names(object_id)[2],
                             os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
        fsync_dir(self._spare)  # one fsync makes the whole batch's names durable
        return ids

    def stage_spare(self, pieces: Iterable[bytes]) -> str:
        """Write an object into a spare and fsync it; returns its new object id.

        Durable once this returns: the spare's name already was, the fsync covers its data
        and size.
        """
        object_id = self._take_spare()
        path = self._spare_path(object_id)
        _fill(os.open(path, os.O_WRONLY), path, pieces)
        return object_id

    def write_spare(self, pieces: Iterable[bytes]) -> tuple[str, Callable[[], None]]:
        """``stage_spare`` in two steps: the object written into a spare (not yet
        durable), and the returned ``sync`` (to call once) that fsyncs and closes it.

        Why (issue 17): on one association every image waited for three fsyncs in a row
        (object, trail record, index commit). The archive runs this fsync beside the rows
        and the record and commits only once ``sync`` returned, so what a crash can leave
        is what it could before (a record, or a staged object, without a committed row).
        A failing write or fsync removes the file, as ``stage_spare``'s does.
        """
        object_id = self._take_spare()
        path = self._names(object_id)[2]
        fd = os.open(path, os.O_WRONLY)
        _fill(fd, path, pieces, sync=False)
        return object_id, functools.partial(_sync, fd, path)

    def publish(self, object_id: str, *, durable: bool = True) -> None:
        """Move a staged object to its final place, durably unless ``durable=False`` (then
        a crash may leave it staged: still readable, and ``recover`` publishes it)."""
        home, final, source = self._names(object_id)
        if home not in self._known_dirs and not os.path.isdir(home):
            Path(home).mkdir(parents=True, exist_ok=True, mode=0o700)
            if durable:
                fsync_dir(Path(home).parent)
                fsync_dir(self.root)
        if durable:
            self._known_dirs.discard(home)
        else:
            self._known_dirs.add(home)  # at most 65,536: the ab/cd fan-out
        try:
            os.replace(source, final)
        except FileNotFoundError:
            source = os.fspath(self._staged(object_id))
            os.replace(source, final)
        if durable:
            fsync_dir(Path(home))
            fsync_dir(Path(source).parent)

    def discard(self, object_id: str) -> None:
        self._staged(object_id).unlink(missing_ok=True)
        self._spare_path(object_id).unlink(missing_ok=True)

    def recover(self, is_indexed: Callable[[str], bool]) -> Recovery:
        """Finish or undo the writes a crash interrupted (see module docstring)."""
        published = discarded = 0
        with self._spare_lock:
            self._spares.clear()
            self._spare_epoch += 1  # a batch in the making is not handed out
        for directory in (self._tmp, self._spare):
            if not directory.is_dir():
                continue
            for leftover in sorted(directory.iterdir()):
                object_id = leftover.name.removesuffix(_PART)
                valid = leftover.name.endswith(_PART) and len(object_id) == 32
                if valid and is_indexed(object_id):
                    self.publish(object_id)
                    published += 1
                else:
                    unused_spare = directory == self._spare and leftover.stat().st_size == 0
                    leftover.unlink(missing_ok=True)
                    discarded += 0 if unused_spare else 1
        return Recovery(published, discarded)

    def read(self, object_id: str) -> bytes:
        # Indexed objects may still be staged (published a moment later, or by recovery):
        # look again where a concurrent publication moves them.
        # The published path first (a retrieval reads many objects: plain strings, issue 17).
        _, final, spare = self._names(object_id)
        for place in (final, spare, None, final):
            try:
                return _read_whole(place if place is not None else os.fspath(
                    self._staged(object_id)))
            except FileNotFoundError:
                continue
        raise FileNotFoundError("object file not found")

    def delete(self, object_id: str) -> None:
        self.path(object_id).unlink(missing_ok=True)

    def exists(self, object_id: str) -> bool:
        """Published (staged objects are not counted: ``read`` still finds them)."""
        return self.path(object_id).exists()

    def remove(self, object_ids: Sequence[str]) -> int:
        """Delete objects for good (a removal's files); how many files went. Staged places
        first: a publication racing us moves the file to where the last unlink finds it.
        The directories touched are fsync'ed."""
        deleted = 0
        touched: set[Path] = set()
        for object_id in object_ids:
            final = self.path(object_id)
            for path in (self._spare_path(object_id), self._staged(object_id), final):
                try:
                    path.unlink()
                except FileNotFoundError:
                    continue
                deleted += 1
                touched.add(path.parent)
        for directory in touched:
            fsync_dir(directory)
        return deleted


def _fill(fd: int, path: str | Path, pieces: Iterable[bytes], *, sync: bool = True) -> int:
    """Write an object's pieces into the open file ``fd`` (staged or spare) durably, then
    close it; returns its size. A write that fails removes the file, a full disk (or quota)
    being a ``DiskFullError``. ``sync`` False: written only, ``fd`` left open for
    ``_sync`` (``write_spare``)."""
    try:
        size = write_durably(fd, pieces) if sync else write_all(fd, pieces)
    except OSError as exc:
        _failed(fd, path, exc)
    if sync:
        _uncache(fd)
        os.close(fd)
    return size


def _sync(fd: int, path: str | Path) -> None:
    """The fsync of ``write_spare``, then the file closed (removed if the fsync fails)."""
    try:
        os.fsync(fd)
    except OSError as exc:
        _failed(fd, path, exc)
    _uncache(fd)
    os.close(fd)


def _uncache(fd: int) -> None:
    """Drop a durable object's pages from the page cache (they are clean once fsync'ed).

    Why (issue 17): an object is written once and read seldom, but its pages stayed
    cached, so sustained ingest grew the page cache by every byte received: each write
    took fresh memory, pushing out what is read often (the index's pages), and on a
    virtual machine whose free memory the host backs lazily, each fresh page faults in
    the host (measured on the 2-core VM: 1.7-2.2 ms to write a 0.5 MB object into fresh
    pages, 0.06 ms into recycled ones; ``copy_folio_from_iter_atomic`` was 36 % of the
    server's CPU under 4 associations of CT slices). Dropped here, the next object
    reuses the same pages. A first read after ingest comes from the disk (then cached
    as usual). Advice only: a file system that ignores it changes nothing, and a failure
    never fails a store whose fsync succeeded.
    """
    with contextlib.suppress(OSError):
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)


def _failed(fd: int, path: str | Path, exc: OSError) -> NoReturn:
    os.close(fd)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        raise DiskFullError("disk full while writing an object") from None
    raise exc
