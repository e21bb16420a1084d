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
import uuid
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from typing import Any

from sqlalchemy import Connection, Engine

from pacsvault.audit.events import AuditUnavailable
from pacsvault.audit.stores import JournalBatch, StoreJournal
from pacsvault.crypto.keyring import Keyring
from pacsvault.index import dialect
from pacsvault.storage import keychoice, pgrows, rows
from pacsvault.storage.rows import Pending, StaleChoice, acknowledged, index_one

_MAX_BATCH = 64
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
    _generation: int
    _received: Callable[[Any], Any]
    journal: StoreJournal | None

    def _observe(self, generation: int) -> None:
        raise NotImplementedError

    # --- the queue --------------------------------------------------------------------

    def _init_group_commit(self) -> None:
        self._queue: list[Pending] = []
        self._cond = threading.Condition()
        self._committing = False
        self._record: JournalBatch | None = None  # the commit in progress's (``_write_lock``)

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
        with self._cond:
            self._queue.append(pending)
            while not pending.done:
                if self._committing:
                    self._cond.wait()
                    continue
                self._committing = True
                self._cond.release()
                try:
                    self._run_batch(self._take)
                finally:
                    self._cond.acquire()
                    self._committing = False
                    self._cond.notify_all()
        if pending.error is not None:
            raise pending.error

    def _take(self) -> list[Pending]:
        """The queue's head (the committer's own item is in it: only the committer takes)."""
        with self._cond:
            batch, self._queue = self._queue[:_MAX_BATCH], self._queue[_MAX_BATCH:]
        return batch

    def _run_batch(self, take: Callable[[], list[Pending]]) -> None:
        batch: list[Pending] | None = None
        try:
            with self._write_lock:
                # Every object of the batch is written; each one's fsync, if it still
                # runs, is waited for before the commit (``_index_batch``).
                try:
                    with self._journal() as self._record:
                        batch = take()
                        self._index_batch(batch)
                except AuditUnavailable:
                    raise  # no record, no acknowledgement: the whole batch is refused
                except Exception:
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
                study = item.learnt.get("study")
                if study is not None:
                    self._study_cache[item.parsed.study_uid] = study
                series = item.learnt.get("series")
                if series is not None:
                    self._series_cache[item.parsed.series_uid] = series

    def _index_one(
        self, conn: Connection, item: Pending, overlay_studies: dict[str, int],
        overlay_series: dict[str, int], together: rows.BatchRows | None = None,
    ) -> None:
        with self._cache_lock:
            cached_study = self._study_cache.get(item.parsed.study_uid)
            cached_series = self._series_cache.get(item.parsed.series_uid)
        index_one(conn, item, overlay_studies, overlay_series, cached_study, cached_series,
                  self._received, self._keyring.wrap, together)
