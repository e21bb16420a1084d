"""The trail's group commit and deferred records (issue 17: audit at the speed of the data).

Why: every record used to pay its own write, fsync and anchor transaction, so a C-FIND
association (accepted, then the query) paid two of each and concurrent DICOMweb requests
queued behind each other's fsync. Here appends that arrive together are written together,
and an event that lets no data leave may wait for the next record.

- **Group commit.** ``append`` queues its record; whoever holds the trail next writes every
  queued record with one write, one fsync and one anchor move (``_append_locked``), and
  each caller returns only once its own record is durable, with its own seq, or raises
  when that write failed. Nothing about a record changes: same chain, signature, seal.
- **Deferred durability** (``defer``): for an event that is no access
  (``Recorder.emit(deferred=True)``: an association's acceptance), the record is signed,
  chained and written to the file at once (readers see it, the order is the order of
  events) but neither fsync'ed nor anchored: the next append of this process or of any
  other (a query's record, a store batch's, a checkpoint) makes it durable with its own
  fsync and moves the anchor past it, and the flusher thread does it alone at the latest
  ``DEFER_SECONDS`` later; ``close`` too. A crash inside that window can lose it, or cut
  it (the next start describes the cut with a ``repair`` record); the anchor never
  names a record that was not synced. An access's record is never deferred, and on a
  shared index (its copy of the lines moves with the anchor) nothing is.
- **Anchored later** (``AuditTrail.try_append``, an access recorded from the event loop):
  the record is fsync'ed before it returns, only its anchor move waits, settled the same
  way (the next append of any process, or the flusher within ``DEFER_SECONDS``).

``AuditTrail`` mixes this in; the lock order is unchanged (the thread lock ``_lock``, then
the file lock, then the index).
"""

from __future__ import annotations

import logging
import threading
import time
from contextlib import AbstractContextManager
from typing import Any

from sqlalchemy import Connection

from pacsvault.audit.events import AuditEvent
from pacsvault.audit.trail_format import TrailUnwritable

log = logging.getLogger("pacsvault.audit")

# A deferred record is made durable by the next append, or this long after it was written:
# the window in which a crash can lose it (never an access's record).
DEFER_SECONDS = 0.5


class _Ticket:
    """One ``append`` waiting in the group commit: done with its seq, or its error."""

    __slots__ = ("done", "error", "event", "refs", "seq")

    def __init__(self, event: AuditEvent, refs: dict[str, Any]) -> None:
        self.event = event
        self.refs = refs
        self.seq = 0
        self.error: Exception | None = None
        self.done = False


class QueuedAppends:
    """The group commit and deferred records of ``AuditTrail`` (see the module)."""

    _lock: threading.Lock
    copies: bool  # a shared (PostgreSQL) index holds a copy of every line

    # --- provided by AuditTrail -------------------------------------------------------

    def _file_held(self) -> AbstractContextManager[int]:
        raise NotImplementedError

    def _append_locked(
        self, fd: int, events: list[tuple[AuditEvent, dict[str, Any]]],
        conn: Connection | None, problems: list[str], *, repair_only: bool = False,
        sync: bool = True, anchor: bool = True,
    ) -> list[int]:
        raise NotImplementedError

    def _refs(self, event: AuditEvent, conn: Connection | None) -> dict[str, Any]:
        raise NotImplementedError

    def _notify(self, problems: list[str]) -> None:
        raise NotImplementedError

    # --- the queue --------------------------------------------------------------------

    def _init_queue(self) -> None:
        # The group commit: appends waiting for a writer, taken by whoever writes next.
        # ``_queue_lock`` is held only to add or take; ``_wake`` wakes the flusher.
        self._queue_lock = threading.Lock()
        self._wake = threading.Condition(self._queue_lock)
        self._queued: list[_Ticket] = []
        # When the oldest record written without fsync (``defer``) or without its anchor
        # move (``try_append``) was written, None when every record of this process is
        # durable and anchored. Changed with ``_lock`` held.
        self._unsynced_at: float | None = None
        self._flusher: threading.Thread | None = None
        # True while the flusher sleeps until a deadline (not forever): a ``defer`` then
        # needs not wake it, the deadline it wakes at is never later than the new record's
        # (``_unsynced_at`` only moves forward); it re-reads ``_unsynced_at`` and sleeps on.
        # Issue 17: one futex wake and flusher run fewer per C-FIND association.
        self._flusher_timed = False
        self._closed = False

    def append(self, event: AuditEvent) -> int:
        """Append one record; returns its seq once it is durable (raises otherwise).

        Group commit: the record is queued; the first caller to hold the trail writes
        every queued record with one fsync and one anchor move, the others find theirs
        written when they get the lock."""
        ticket = _Ticket(event, self._refs(event, None))
        with self._queue_lock:
            self._queued.append(ticket)
        problems: list[str] = []
        try:
            with self._lock:
                if not ticket.done:
                    with self._file_held() as fd:
                        self._write_queued(fd, problems)
        finally:
            self._notify(problems)
        error = ticket.error
        if error is not None:
            if isinstance(error, TrailUnwritable):  # a fresh one per waiting thread
                raise TrailUnwritable(str(error)) from error
            raise error
        return ticket.seq

    def _write_queued(self, fd: int, problems: list[str]) -> None:
        """Write the queued records in one append (the trail is held)."""
        with self._queue_lock:
            queued, self._queued = self._queued, []
        if not queued:
            return
        try:
            seqs = self._append_locked(fd, [(t.event, t.refs) for t in queued], None,
                                       problems)
            for ticket, seq in zip(queued, seqs[len(seqs) - len(queued):], strict=True):
                ticket.seq = seq
        except Exception as exc:
            for ticket in queued:
                ticket.error = exc
        finally:
            for ticket in queued:
                if not ticket.seq and ticket.error is None:  # interrupted (BaseException)
                    ticket.error = TrailUnwritable("the audit append was interrupted")
                ticket.done = True

    def _synced(self) -> None:
        """Every record this process wrote is durable now (an fsync'ed append)."""
        self._unsynced_at = None

    def defer(self, event: AuditEvent) -> int:
        """Write ``event``'s record now, durable with the next append or within
        ``DEFER_SECONDS`` (see the module). Only for events that let no data leave: the
        caller does not wait for an fsync. Returns its seq; raises when it could not
        even be written. On a shared index (``copies``) every line is copied there with
        the anchor move that covers it, so the record is appended durably at once."""
        if self.copies:
            return self.append(event)
        refs = self._refs(event, None)
        problems: list[str] = []
        start = False
        try:
            with self._lock:
                with self._file_held() as fd:
                    seq = self._append_locked(fd, [(event, refs)], None, problems,
                                              sync=False)[-1]
                start = self._settle_later()
        finally:
            self._notify(problems)
        self._start_flusher(start)
        return seq

    def _settle_later(self) -> bool:
        """(``_lock`` held) What this process wrote is not yet durable and anchored (a
        ``defer``red record) or not yet anchored (``try_append``): the flusher settles it
        within ``DEFER_SECONDS`` unless an append does first. True: the caller starts the
        flusher (``_start_flusher``, once the locks are let go)."""
        start = False
        with self._wake:
            if self._unsynced_at is None:
                self._unsynced_at = time.monotonic()
            if self._flusher is None and not self._closed:
                self._flusher = threading.Thread(
                    target=self._flush_loop, name="audit-flush", daemon=True)
                start = True
            if not self._flusher_timed:
                self._wake.notify()
        return start

    def _start_flusher(self, start: bool) -> None:
        if start:
            assert self._flusher is not None
            self._flusher.start()
        if self._closed:
            self.flush()

    def _flush_loop(self) -> None:
        while True:
            with self._wake:
                while not self._closed:
                    since = self._unsynced_at
                    if since is not None:
                        left = since + DEFER_SECONDS - time.monotonic()
                        if left <= 0:
                            break
                        self._flusher_timed = True
                        self._wake.wait(left)
                    else:
                        self._flusher_timed = False
                        self._wake.wait()
                self._flusher_timed = False
                if self._closed:
                    self._flusher = None
                    return
            self.flush()

    def flush(self) -> None:
        """Make the records written by ``defer`` durable and those of ``try_append``
        anchored now (``_settle``). No-op when they are already."""
        try:
            self._settle(only_ours=True)
        except Exception as exc:  # the next append syncs them, or the start's repair
            log.error("deferred audit records could not be made durable (%s)",
                      type(exc).__name__)

    def anchor_all(self) -> None:
        """Make every record the file holds durable and anchored now, whoever wrote it
        (``_settle``; the tail read and checked first when another process wrote last).
        For a backup's copy of the index, whose anchor decides which records the copy of
        the trail keeps: without it, records anchored later (``try_append``) or deferred
        would wait for the next backup. Raises as an append does."""
        self._settle(only_ours=False)

    def _settle(self, *, only_ours: bool) -> None:
        """An append of nothing: one fsync, the anchor moved to the last record. With
        ``only_ours``, nothing when this process left nothing unsettled."""
        problems: list[str] = []
        try:
            with self._lock:
                if only_ours and self._unsynced_at is None:
                    return
                with self._file_held() as fd:
                    self._append_locked(fd, [], None, problems)
                self._synced()
        finally:
            self._notify(problems)

    def close(self) -> None:
        """Make what ``defer`` wrote durable and stop the flusher (the vault closes)."""
        with self._wake:
            self._closed = True
            flusher = self._flusher
            self._wake.notify()
        if flusher is not None:
            flusher.join(10)
        self.flush()
