"""The archive's group commit (issue 17): concurrent stores share one index transaction.

Why: every image used to pay its own write transaction, its own store record in the trail
and its own anchor move. Here stores that arrive together (several associations, or
``serve --workers`` waiting on the other process's trail) are committed together:
``Archive.store`` queues its ``Pending`` and ``_commit`` returns once the commit holding its
own rows is done, or raises that item's error. Whoever finds no commit in progress holds
the trail (``StoreJournal.batch``), takes what is queued (at most ``_MAX_BATCH``), writes
every row and the batch's store record in one transaction, waits for each object's fsync,
and commits. One bad item does not fail the others: the batch is redone one by one. A
record that cannot be made durable refuses the whole batch (``AuditUnavailable``).

``Archive`` mixes this in; it owns the caches, the locks and the keyring this reads and
fills (declared below), and ``_observe`` (a removal seen: caches dropped).
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from typing import Any

from sqlalchemy import Connection, Engine

from pacsvault.audit.events import AuditUnavailable
from pacsvault.audit.stores import JournalBatch, StoreJournal
from pacsvault.crypto.keyring import Keyring
from pacsvault.dicomfile.parse import ParsedInstance
from pacsvault.index import dialect
from pacsvault.storage import keychoice, pgrows, rows
from pacsvault.storage.commit_link import CommitClient
from pacsvault.storage.rows import Pending, StaleChoice, acknowledged, index_one

_MAX_BATCH = 64
# How long a committer waits at most for the stores of this process that are still being
# parsed and encrypted (``_gather``): about one small image's work on a busy interpreter;
# and the largest store waited for: a larger one's own work (a 512x512 CT slice: ~3 ms)
# outweighs the ~1.7 ms a shared commit saves (measured: with four associations of CT
# slices and 3-image MR studies, waiting for every store cost ~7 % of the images/s).
_GATHER_S = 0.002
_GATHER_MAX_BYTES = 64 * 1024
_GENERATION = keychoice.GENERATION


def _read_generation(conn: Connection) -> int:
    """The removal generation, in the batch's transaction (SQLite: straight to the driver,
    once per batch)."""
    cursor = conn.connection.cursor()
    try:
        return int(cursor.execute(_GENERATION).fetchone()[0])
    finally:
        cursor.close()


class _NotDurable(Exception):
    """An object of a batch was not made durable (its item holds the error): the batch's
    transaction rolls back (not an ``OSError``: the trail's own failures are those)."""


class GroupCommit:
    """The group commit of ``Archive`` (see the module)."""

    # A non-SQLite batch's rows (``rows.BatchRows`` is the SQLAlchemy reference path)
    _batch_rows: Callable[[Connection, list[Pending]], rows.BatchRows] = pgrows.DriverRows

    # --- provided by Archive ----------------------------------------------------------

    _engine: Engine
    _keyring: Keyring
    _write_lock: threading.Lock
    _cache_lock: threading.Lock
    _study_cache: dict[str, tuple[int, uuid.UUID]]
    _series_cache: dict[str, int]
    _patient_cache: dict[bytes, uuid.UUID]
    _generation: int
    _received: Callable[[Any], Any]
    journal: StoreJournal | None

    def _observe(self, generation: int) -> None:
        raise NotImplementedError

    def _patient_key(self, parsed: ParsedInstance) -> bytes:
        raise NotImplementedError

    # --- the queue --------------------------------------------------------------------

    def _init_group_commit(self) -> None:
        # ``serve --workers N`` on the embedded index, workers other than 0: their stores
        # are committed by worker 0 (``storage.commit_link``; None: this process commits).
        self.link: CommitClient | None = None
        self._queue: list[Pending] = []
        lock = threading.RLock()
        self._cond = threading.Condition(lock)
        self._committing = False
        self._record: JournalBatch | None = None  # the commit in progress's (``_write_lock``)
        self._late: Callable[[int], list[Pending]] | None = None  # (``_write_lock``)
        # Stores of this process on their way to the queue (``_arrive``/``_depart``), and
        # the committer waiting for them (``_gather``), woken on the queue's lock.
        self._in_flight = 0
        self._arrivals = threading.Condition(lock)
        self._gathering = False
        self._flying = threading.local()

    def _arrive(self, size: int) -> None:
        """A store of ``size`` bytes begins (``Archive.store``): a committer may wait for
        it (``_gather``) if it is small."""
        if size > _GATHER_MAX_BYTES:
            return
        with self._cond:
            self._in_flight += 1
        self._flying.on = True

    def _depart(self) -> None:
        """The store is over; if it never reached the queue (refused, a duplicate, an
        error), it is no longer waited for."""
        if getattr(self._flying, "on", False):
            self._flying.on = False
            with self._cond:
                self._in_flight -= 1
                if self._gathering:
                    self._arrivals.notify()

    def _gather(self) -> None:
        """Before taking a batch: while small stores of this process (``_arrive``) are
        still being parsed and encrypted, wait for them to queue (at most ``_GATHER_S``, or
        until a batch is full), so that they share this commit. Issue 17: with four
        associations storing one-instance studies a batch held ~2.4 images, and each batch
        costs ~1.7 ms of CPU whatever its size (the trail record and its fsync, the anchor,
        the commit's WAL frames and fsync). One association never waits here (its store
        is queued already, none is in flight); the committer's own object is being
        fsync'ed meanwhile, which its commit waits for anyway."""
        if not self._in_flight:  # (read without the lock: a hint)
            return
        deadline = time.monotonic() + _GATHER_S
        with self._cond:
            self._gathering = True
            try:
                while self._in_flight and len(self._queue) < _MAX_BATCH:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        break
                    self._arrivals.wait(left)
            finally:
                self._gathering = False

    def _commit(self, pending: Pending) -> None:
        """Return once ``pending``'s rows are committed (or raise its error).

        Whoever finds no commit in progress commits everything queued so far; the others
        wait for the commit that includes their own rows. The batch is taken from the
        queue only once the commit holds the trail (``_run_batch``), which another process
        of ``serve --workers`` may be holding for its own commit: what was queued while
        waiting for it rides along instead of waiting for the next turn (issue 17: with
        two workers on the embedded index, batches taken before that wait were ~1.25
        images each, and every commit waited on the other process's).
        """
        link = self.link
        if link is not None and link.commit(pending, self._learn):
            return  # committed by worker 0 (or its error raised)
        with self._cond:
            self._queue.append(pending)
            if getattr(self._flying, "on", False):  # queued: no longer waited for
                self._flying.on = False
                self._in_flight -= 1
                if self._gathering:
                    self._arrivals.notify()
            while not pending.done:
                if self._committing:
                    self._cond.wait()
                    continue
                self._committing = True
                self._cond.release()
                try:
                    self._run_batch(self._take, self._take)
                finally:
                    self._cond.acquire()
                    self._committing = False
                    self._cond.notify_all()
        if pending.error is not None:
            raise pending.error

    def _take(self, limit: int = _MAX_BATCH) -> list[Pending]:
        """The queue's head, at most ``limit`` (the committer's own item is in it: only
        the committer takes)."""
        with self._cond:
            batch, self._queue = self._queue[:limit], self._queue[limit:]
        return batch

    def _run_batch(self, take: Callable[[], list[Pending]],
                   late: Callable[[int], list[Pending]] | None = None) -> None:
        batch: list[Pending] | None = None
        try:
            with self._write_lock:
                self._gather()
                # Every object of the batch is written; each one's fsync, if it still
                # runs, is waited for before the commit (``_index_batch``).
                try:
                    with self._journal() as self._record:
                        batch = take()
                        self._late = late  # (``_index_batch`` takes it: its first call only)
                        self._index_batch(batch)
                except AuditUnavailable:
                    raise  # no record, no acknowledgement: the whole batch is refused
                except Exception:
                    self._late = None  # (the one-by-one retries take nothing more)
                    if batch is None or len(batch) == 1:
                        raise
                    # One bad item must not fail the others: index them one by one.
                    for item in batch:
                        item.learnt.clear()
                        item.result = None
                        try:
                            with self._journal() as self._record:
                                self._index_batch([item])
                        except Exception as exc:
                            item.error = exc
        except BaseException as exc:
            if batch is None:  # the trail could not be held: what is queued is refused
                batch = take()
            for item in batch:
                if item.error is None:
                    item.error = exc
        finally:
            for item in batch or ():
                item.done = True

    def _journal(self) -> AbstractContextManager[JournalBatch | None]:
        """The audit trail held for one commit (taken before the index's write lock)."""
        return self.journal.batch() if self.journal is not None else nullcontext(None)

    def _index_batch(self, batch: list[Pending]) -> None:
        """One transaction: ``batch``'s rows, its store record, the commit. ``_late``
        (SQLite; set by ``_run_batch`` for its first call): the queue, taken again once the
        rows of what was taken are written, until it is empty or the batch full; what it
        gives joins ``batch`` (the same list: the caller's retries and done marks see it)
        before the record is written, so that stores queued meanwhile share this commit
        (issue 17: see ``_gather``). The first item's latency grows by the rows of those;
        no wait is added here (the queue is only read)."""
        late, self._late = self._late, None
        with self._engine.begin() as conn:
            # The write lock first, then the generation: no removal can commit between
            # this check and the rows below (a deferred transaction would read before
            # locking).
            if dialect.is_sqlite(conn):
                dialect.take_write_lock(conn)  # BEGIN IMMEDIATE
                together = None
            else:  # the lock, then the generation and the batch's known UIDs, in one
                # round trip; its rows in one more (``pgrows.DriverRows``: psycopg)
                together = self._batch_rows(conn, batch)
            generation = (together.generation if together is not None
                          else _read_generation(conn))
            with self._cache_lock:
                self._observe(generation)
            overlay_studies: dict[str, int] = {}
            overlay_series: dict[str, int] = {}
            for item in batch:
                if item.generation != generation:
                    # chosen before a removal: maybe a deleted study or a destroyed key
                    item.error = StaleChoice("objects were removed meanwhile")
                    continue
                if item.durable is not None and item.durable.done():
                    failed = item.durable.exception()
                    if failed is not None:  # its object is not durable: never indexed
                        item.error = failed
                        continue
                self._index_one(conn, item, overlay_studies, overlay_series, together)
                if late is not None and together is None and item is batch[-1] \
                        and len(batch) < _MAX_BATCH:
                    batch.extend(late(_MAX_BATCH - len(batch)))  # (the loop goes on)
            if together is not None:
                together.flush()
            record = self._record  # (set by ``_run_batch``, under ``_write_lock``)
            if record is not None:  # durable before the rows commit, or nothing commits
                record.write(conn, acknowledged(batch))
            # Issue 17: the objects' fsyncs ran beside the rows and the record's fsync;
            # no row commits before its object is durable. One that failed rolls the
            # batch back (``_run_batch`` then indexes the others one by one; its record
            # may name it: as after a failed COMMIT, a record never lacks, it may exceed).
            for item in batch:
                if item.durable is None or item.error is not None or item.result is not None:
                    continue
                failed = item.durable.exception()  # waits for the fsync
                if failed is not None:
                    item.error = failed
                    raise _NotDurable("an object of the batch could not be made durable")
        # committed: cache what was learnt (unless a newer removal was seen meanwhile)
        with self._cache_lock:
            if self._generation != generation:
                return
            for item in batch:
                self._keep(item)

    def _keep(self, item: Pending) -> None:
        """Caller holds ``_cache_lock``: what ``item``'s committed rows taught."""
        study = item.learnt.get("study")
        if study is not None:
            self._study_cache[item.parsed.study_uid] = study
        series = item.learnt.get("series")
        if series is not None:
            self._series_cache[item.parsed.series_uid] = series
        patient = item.learnt.get("patient")
        if patient is not None:
            self._patient_cache[self._patient_key(item.parsed)] = patient

    def _learn(self, item: Pending, generation: int) -> None:
        """``item`` was committed (or failed) by worker 0's committer (``commit_link``) in
        a batch that read ``generation``: a removal seen there drops this process's caches
        too, and what the rows taught is kept as after a commit of this process."""
        with self._cache_lock:
            if generation > self._generation:
                self._observe(generation)
            if generation == self._generation == item.generation:
                self._keep(item)

    def removal_generation(self) -> int:
        """The removal generation the caches hold (``commit_link``'s answers)."""
        with self._cache_lock:
            return self._generation

    def commit_pending(self, pending: Pending) -> None:
        """Worker 0's committer (``commit_link``): another worker's store joins this
        process's group commit as its own stores do (``pending.durable``: its ``synced``
        frame, waited for before the commit)."""
        self._commit(pending)

    def _index_one(
        self, conn: Connection, item: Pending, overlay_studies: dict[str, int],
        overlay_series: dict[str, int], together: rows.BatchRows | None = None,
    ) -> None:
        with self._cache_lock:
            cached_study = self._study_cache.get(item.parsed.study_uid)
            cached_series = self._series_cache.get(item.parsed.series_uid)
        index_one(conn, item, overlay_studies, overlay_series, cached_study, cached_series,
                  self._received, self._keyring.wrap, together)
