"""The tamper-evident audit trail: ``DATA/audit/trail.jsonl``.

One JSON record per line, append-only. Each record names the hash of the one before it
(``prev``) and carries an Ed25519 signature over its own hash, made with a key derived from
the master key: editing, deleting, reordering or forging records breaks the chain or a
signature, and re-hashing a forgery is useless without the key. Truncating the tail is
caught by the *head anchor* (last sequence number and hash) kept in the encrypted index.

Patient-identifying references (patient IDs, study and instance UIDs) are sealed in each
record with AES-256-GCM under a derived key; the rest (time, actor, action, outcome, event
code, counts) stays readable so an auditor can see the shape of activity without keys.
Sealed references are grouped per patient (``patients``), so a patient's access request
can be answered with their own references only.

Retention replaces the oldest records by one signed ``seal`` record that keeps the hash of
the last removed record and a digest of the removed lines, so the chain still verifies.

This process never removes bytes from the file. A write cut short (disk full, crash) leaves
an incomplete last line; the next append (or ``pacsvault audit repair``) first writes a
signed ``repair`` record naming the length and SHA-256 of the bytes that were cut, and the
chain goes on from the last whole record. A record is *durable* only once its line is
written whole and fsync'ed: ``append`` raises otherwise, and the caller refuses the access.

Several instances (data directories) of one vault sharing a PostgreSQL index each keep
their own chain, anchored by their own ``audit_head`` row (``instance``); every line is
also copied into the index in the anchor's transaction (``audit.instances``: the copy,
cross-instance checkpoints and the deployment-wide verification). An embedded index
(SQLite: one instance) gets no copy.

Appends are group-committed (issue 17): threads appending at the same time queue their
records, and whichever holds the trail writes every queued one with one write, one fsync
and one anchor move; each caller still returns only once its own record is durable. An
event that is no access (an association accepted) may be *deferred* (``defer``): it
goes out with the next record written, in the same fsync (a C-FIND association: the
acceptance and the query record, one commit), and at the latest ``DEFER_SECONDS`` later
on its own (``flush``; ``close`` flushes too). A caller that must not wait (an event
loop) uses ``try_append``: the same record, fsync'ed before it returns, its anchor moved
by the next append or within ``DEFER_SECONDS`` (no index transaction on that path), or
nothing written at all when the trail is taken.

This module is the appender (locks, the head anchor, key hand-over) and the facade: the
record format is ``trail_format``, the file's end read back, checked against the anchor
and repaired ``trail_tip``, a store batch's record made durable by the index's commit
(embedded index) ``trail_journal``, sealed references ``trail_refs``, verification
``trail_verify``, the retention rewrite ``trail_retention``; their public names are
importable from here.
"""

from __future__ import annotations

import datetime as dt
import errno
import fcntl
import hashlib
import json
import logging
import os
import threading
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from pathlib import Path
from typing import Any, cast

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from sqlalchemy import Connection, Engine, Table, select, update
from sqlalchemy.orm import Session, sessionmaker

from pacsvault.audit import instances, trail_journal, trail_tip, trail_verify
from pacsvault.audit.events import AuditEvent
from pacsvault.audit.trail_format import (
    FORMAT,
    GENESIS,
    ROTATED_ACTION,
    Record,
    Tip,
    TrailError,
    TrailKeys,
    TrailUnwritable,
    Verdict,
    signed_line,
)
from pacsvault.audit.trail_queue import DEFER_SECONDS, QueuedAppends
from pacsvault.audit.trail_refs import grouped_refs, seal, unseal
from pacsvault.audit.trail_retention import seal_before
from pacsvault.audit.trail_verify import Checkpoint
from pacsvault.index.models import AuditHead

__all__ = [
    "DEFER_SECONDS", "FORMAT", "GENESIS", "ROTATED_ACTION", "AuditTrail", "BatchWriter",
    "Checkpoint",
    "Record", "TrailError", "TrailKeys", "TrailSink", "TrailUnwritable", "Verdict",
]

log = logging.getLogger("pacsvault.audit")

_heads = cast(Table, AuditHead.__table__)
VOUCH_MAX = 100_000  # lines remembered for the watcher at most (32 bytes each)
_SET_ANCHOR = "UPDATE audit_head SET seq = ?, digest = ? WHERE instance = ?"
_SET_ANCHOR_PG = "UPDATE audit_head SET seq = %s, digest = %s WHERE instance = %s"


@contextmanager
def _unsynced_commit(driver: Any, invalidate: Callable[[], None]) -> Iterator[None]:
    """An anchor transaction committed with synchronous=NORMAL (why: ``AuditTrail._db``),
    the connection set back to FULL afterwards or discarded (``invalidate``): never back
    in the pool with the weaker setting."""
    driver.execute("PRAGMA synchronous=NORMAL")
    try:
        yield
    finally:
        try:
            driver.execute("PRAGMA synchronous=FULL")
        except Exception:
            invalidate()
            raise


class AuditTrail(QueuedAppends):
    def __init__(self, root: Path, keys: TrailKeys, sessions: sessionmaker[Session],
                 instance: str = instances.MAIN) -> None:
        self.root = root
        self.instance = instance
        self.path = root / "trail.jsonl"
        self._lockfile = root / "trail.lock"
        self._keys = keys
        self._public = keys.signer.public_key()
        self._sessions = sessions
        bind = sessions.kw.get("bind")
        self._engine: Engine | None = bind if isinstance(bind, Engine) else None
        # A shared (PostgreSQL) index: lines are copied there with the anchor.
        self.copies = self._engine is not None and self._engine.dialect.name != "sqlite"
        # The embedded index: an append to a tail this process left needs no index read,
        # and its anchor move goes straight to the driver (``_anchor_quick``).
        self._embedded = self._engine is not None and self._engine.dialect.name == "sqlite"
        self._lock = threading.Lock()
        # (inode, size, mtime, ctime) of the file right after this process's last append,
        # and the tip it left: when the file is exactly as we left it (ctime cannot be set
        # back from user space), the next append skips re-reading and re-checking the tail.
        self._left: tuple[tuple[int, int, int, int], Tip] | None = None
        # Called (outside the locks) with a description whenever an append finds the file
        # different from what was anchored: the running server's watcher raises the alert.
        self.on_problem: Callable[[str], None] | None = None
        # SHA-256 of each line this process appended under the current key, kept for the
        # running server's watcher (``watch``), which then needs no signature check of
        # them (``trail_verify._ours``); None: not kept (no watcher: CLI commands).
        self.vouched: set[bytes] | None = None
        # Issue 17 (``trail_journal``), embedded index: the lines this process wrote since
        # its last fsync of the file, kept while every line under them is durable
        # (``_sound``: False once unsynced lines were written on a tail another process
        # had written); a store batch then journals them in the index instead of an fsync.
        # ``_journaled``: the last line this process committed in the index and has not
        # pruned since (0: nothing of this process's to prune). (``_lock`` held.)
        self._unsynced: list[tuple[int, bytes]] = []
        self._sound = True
        self._journaled = 0
        self._journal_upto = 0  # the seq a batch in progress journaled (0: none)
        self._init_queue()

    # --- writing ----------------------------------------------------------------------

    def create(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        os.close(fd)

    @contextmanager
    def _exclusive(self) -> Iterator[int]:
        """Thread lock + file lock: the server and CLI commands append to one trail.

        The lock is a separate file so that a retention rewrite (which replaces the trail
        file) cannot leave another process appending to the old one.
        """
        with self._lock, self._file_held() as fd:
            yield fd

    @contextmanager
    def _file_held(self, *, wait: bool = True) -> Iterator[int]:
        """The file lock and an append descriptor (the caller holds ``_lock``); with
        ``wait`` False, -1 instead when another appender holds the lock."""
        lock_fd = os.open(self._lockfile, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            try:
                fcntl.flock(lock_fd, fcntl.LOCK_EX if wait else fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                yield -1
                return
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
            try:
                yield fd
            finally:
                os.close(fd)
        finally:
            fcntl.flock(lock_fd, fcntl.LOCK_UN)
            os.close(lock_fd)

    @contextmanager
    def _shared(self) -> Iterator[None]:
        """Readers that must not see a line half-written by another process."""
        with self._lock:
            lock_fd = os.open(self._lockfile, os.O_RDWR | os.O_CREAT, 0o600)
            try:
                fcntl.flock(lock_fd, fcntl.LOCK_SH)
                yield
            finally:
                fcntl.flock(lock_fd, fcntl.LOCK_UN)
                os.close(lock_fd)

    @contextmanager
    def _db(self, conn: Connection | None) -> Iterator[Connection]:
        """The caller's transaction (a store batch), or a short one of our own."""
        if conn is not None:
            yield conn
            return
        assert self._engine is not None, "the trail needs a sessionmaker bound to an engine"
        if self._engine.dialect.name != "sqlite":
            with self._engine.begin() as own:
                yield own
            return
        # Embedded index (issue 17): our own transaction moves the anchor (and may flag a
        # damaged trail) after the lines' fsync; it commits without an fsync of its own
        # (WAL, synchronous=NORMAL for this transaction only), made durable by the next
        # synced commit or checkpoint. A power loss can leave the anchor behind the
        # trail, never ahead of it: the state of a crash between the two steps, which
        # every reader already accepts. The access's record itself is fsync'ed as before.
        with self._engine.connect() as own:
            # Straight to the driver (no transaction is opened by a PRAGMA), as
            # ``_set_anchor`` does: through SQLAlchemy each would cost a statement build.
            driver = own.connection.dbapi_connection
            assert driver is not None
            with _unsynced_commit(driver, own.invalidate), own.begin():
                yield own

    def _append_locked(
        self, fd: int, events: list[tuple[AuditEvent, dict[str, Any]]],
        conn: Connection | None, problems: list[str], *, repair_only: bool = False,
        sync: bool = True, anchor: bool = True, journal: bool = False,
    ) -> list[int]:
        """Write a repair record if the tail is torn, then ``events``; one fsync.

        Raises ``TrailUnwritable`` unless every line is written and fsync'ed; the anchor
        moves only after that. ``sync`` False (``defer``): written, neither fsync'ed nor
        anchored; the next synced append (even of no event: ``flush``) covers them.
        ``anchor`` False (``try_append``, this process's own tail only): fsync'ed, the
        anchor move left to the next append or ``flush`` (the caller arranges it).
        ``journal`` (a store batch's ``conn``, embedded index): when the chain under this
        tail is durable or journaled (``trail_journal``), no fsync: the lines go into the
        index in ``conn``'s transaction with the anchor (``_journal_upto``: ``batch`` then
        has the file fsync'ed later, or at once if that transaction rolls back).
        """
        left, self._left = self._left, None
        here = trail_tip.file_identity(fd)
        mine = left is not None and left[0] == here
        tip = left[1] if left is not None and mine else trail_tip.read_tip(self.path, self._anchor)
        lines: list[bytes] = []
        seqs: list[int] = []
        seq, prev, last_time = tip.seq, tip.chain, tip.time
        # The tail is the one this process left (nothing to check against the anchor, no
        # repair) on the embedded index: no index connection before the lines are written;
        # a deferred record (``sync`` False) needs none at all (issue 17: ~0.1-0.2 ms of a
        # C-FIND association's CPU; same lines, same fsync, same anchor).
        quick = mine and conn is None and self._embedded
        journal = journal and mine and self._sound and self._embedded and conn is not None
        with (nullcontext(None) if quick else self._db(conn)) as db:
            problem = ""
            if not mine:
                assert db is not None
                if self._embedded:  # lines a power loss took, put back from the index
                    tip = self._restore(fd, db, tip)
                    seq, prev, last_time = tip.seq, tip.chain, tip.time
                problem = trail_tip.check_head(db, self.instance, self._public, tip)
            if problem:
                problems.append(problem)
            prefix = b"\n" if tip.needs_newline else b""
            if tip.region:
                assert db is not None  # a torn tail is never ``mine``
                if not tip.region.endswith(b"\n"):
                    prefix = b"\n"
                seq += 1
                now = dt.datetime.now(dt.UTC).isoformat(timespec="microseconds")
                time = max(now, last_time) if last_time else now
                body = trail_tip.repair_body(db, self.instance, tip, seq, time)
                prev, line = self._sign(body)
                last_time = time
                lines.append(line + b"\n")
                seqs.append(seq)
            if repair_only and not lines:
                return []
            for event, refs in events:
                seq += 1
                now = event.time.astimezone(dt.UTC).isoformat(timespec="microseconds")
                time = max(now, last_time) if last_time else now  # monotonic order
                body = {
                    "v": FORMAT, "seq": seq, "prev": prev, "time": time,
                    "kind": instances.kind_of(event.action),
                    "action": event.action, "outcome": event.outcome.name.lower(),
                    "code": event.code.value, "ae": event.actor_ae,
                    "address": event.actor_address, "user": event.actor_user,
                    "message": event.message, "detail": dict(event.detail),
                }
                if refs:
                    body["refs"] = self._seal(seq, refs)
                prev, line = self._sign(body)
                last_time = time
                lines.append(line + b"\n")
                seqs.append(seq)
            fsync = sync and not journal
            self._write_all(fd, prefix + b"".join(lines), sync=fsync)
            self._vouch(lines)
            if fsync:
                self._synced()  # this fsync covered every line written before it
            elif self._embedded:
                self._unsynced.extend(zip(seqs, lines, strict=True))
                if not mine:  # under them, maybe another process's unsynced lines
                    self._sound = False
            if not (sync and anchor):  # settled later (``flush``, the next append)
                self._left = (trail_tip.file_identity(fd),
                              Tip(seq, prev, last_time, None, b"", b"", False))
                return seqs
            try:
                if db is None:  # (prunes what this process journaled, if anything)
                    self._anchor_quick(seq, prev, prune=self._journaled > 0)
                    self._journaled = 0
                else:
                    if self.copies:  # one INSERT per record, in the anchor's transaction
                        instances.copy_lines(db, self.instance,
                                             list(zip(seqs, lines, strict=True)),
                                             self._local_lines)
                    if journal:  # durable with the commit that moves the anchor
                        trail_journal.insert(db, self.instance, [
                            (s, line) for s, line in self._unsynced if s > self._journaled])
                        self._journal_upto = seq
                    elif self._embedded:  # synced: the index need not hold them (nor
                        # what a killed process left there)
                        trail_journal.prune(db.connection.driver_connection, self.instance,
                                            seq)
                        self._journaled = 0
                    self._set_anchor(db, seq, prev)
            except Exception as exc:
                if conn is not None:
                    raise
                # The lines are durable: the access is recorded. Only truncation detection
                # lags until the next append moves the anchor.
                log.error("the audit anchor could not be updated (%s)", type(exc).__name__)
        self._left = (trail_tip.file_identity(fd), Tip(seq, prev, last_time, None, b"", b"", False))
        return seqs

    def _restore(self, fd: int, db: Connection, tip: Tip) -> Tip:
        """Put back the lines the index holds beyond ``tip`` (``trail_journal``: a power
        loss took the file's unsynced tail), fsync'ed; the file's new tip."""
        data, count = trail_journal.restore_bytes(db, self.instance, tip)
        if not count:
            return tip
        self._write_all(fd, data)
        log.warning("audit trail: %d record(s) after record %d put back from the index "
                    "(the file had lost its unsynced end: a power loss?)", count, tip.seq)
        return trail_tip.read_tip(self.path, self._anchor)

    def restore(self) -> None:
        """Put back, before reading the file, the records only the index holds
        (``trail_journal``); ``audit verify`` calls it, the server's start does it with
        ``repair``. Nothing to do on a shared index, or when the file is whole; nothing
        is done to a missing file (verification reports it)."""
        if not self._embedded or not self.path.exists():
            return
        with self._exclusive() as fd, self._db(None) as db:
            tip = trail_tip.read_tip(self.path, self._anchor)
            if self._restore(fd, db, tip) is not tip:
                self._left = None

    def _synced(self) -> None:
        super()._synced()
        self._lines_durable()

    def _lines_durable(self) -> None:
        """Every line in the file is fsync'ed: nothing of this process's to journal."""
        self._unsynced.clear()
        self._sound = True

    def _after_batch(self, fd: int, journaled: int, failed: bool) -> bool:
        """(``_lock`` held) A store batch's transaction ended. Committed with its lines
        journaled: they are durable; the flusher fsyncs the file (then they are pruned)
        within ``DEFER_SECONDS`` unless an append does first; True: start it. Rolled back:
        the lines stay in the file, fsync'ed now as a batch's record always was (a power
        loss must not take a line the next records chain to)."""
        if not journaled:
            return False
        if not failed:
            self._journaled = journaled
            return self._settle_later()
        try:
            os.fsync(fd)
        except OSError as exc:
            self._sound = False  # the next batch fsyncs its own record (or is refused)
            log.error("audit trail: fsync after a rolled-back batch failed (%s)",
                      type(exc).__name__)
            return False
        self._lines_durable()
        return False

    def _vouch(self, lines: list[bytes]) -> None:
        """Remember the lines just written whole (``vouched``), without their newline."""
        vouched = self.vouched
        if vouched is None:
            return
        if len(vouched) > VOUCH_MAX:  # the watcher fell behind: those get verified
            vouched.clear()
        vouched.update(hashlib.sha256(line[:-1]).digest() for line in lines)

    def _sign(self, body: dict[str, Any]) -> tuple[str, bytes]:
        """Add ``sig``; returns the record's hash (what the next one chains to) and its
        line without the newline (``trail_format.signed_line``: one encoding)."""
        return signed_line(body, self._keys.signer.sign)

    @staticmethod
    def _write_all(fd: int, data: bytes, *, sync: bool = True) -> None:
        view = memoryview(data)
        try:
            while view:
                written = os.write(fd, view)
                if written <= 0:
                    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
                view = view[written:]
            if sync:
                os.fsync(fd)
        except OSError as exc:
            name = errno.errorcode.get(exc.errno or 0, type(exc).__name__)
            raise TrailUnwritable(f"the audit trail could not be written ({name})") from exc

    def _notify(self, problems: list[str]) -> None:
        callback = self.on_problem
        for problem in problems:
            log.critical("audit trail: %s", problem)
            if callback is not None:
                try:
                    callback(problem)
                except Exception as exc:  # the watcher must not break an append
                    log.error("audit watcher callback failed: %s", type(exc).__name__)

    @contextmanager
    def batch(self) -> Iterator[BatchWriter]:
        """Hold the trail for a caller's index transaction (lock order: trail, then index).

        The store path writes its batch record through the yielded writer inside the same
        transaction as the index rows, so the anchor commits with them.
        """
        writer = BatchWriter(self)
        start = False
        try:
            with self._exclusive() as fd:
                writer._fd = fd
                self._journal_upto = 0
                try:
                    yield writer
                except BaseException:
                    self._after_batch(fd, self._journal_upto, failed=True)
                    raise
                start = self._after_batch(fd, self._journal_upto, failed=False)
                writer._fd = None
        finally:
            self._journal_upto = 0
            self._notify(writer.problems)
        self._start_flusher(start)

    def repair(self) -> Record | None:
        """Describe a torn tail with a signed repair record; None if the tail is whole."""
        problems: list[str] = []
        try:
            with self._exclusive() as fd:
                seqs = self._append_locked(fd, [], None, problems, repair_only=True)
        finally:
            self._notify(problems)
        if not seqs:
            return None
        for rec in self.records():
            if rec.seq == seqs[0] and rec.kind == "repair":
                return rec
        return None

    @property
    def keys(self) -> TrailKeys:
        return self._keys

    @property
    def engine(self) -> Engine | None:
        """The index holding the anchors (and, shared, every instance's copy)."""
        return self._engine

    def rotate_keys(self, keys: TrailKeys, event: AuditEvent | None,
                    before: Callable[[], None] | None = None) -> int | None:
        """Master key rotation: holding the trail (no other append in between), run
        ``before`` (the index is re-keyed there: the anchor lives in it), append ``event``
        (``keys.rotated``, naming the new public key) signed by the CURRENT key, then sign
        with ``keys`` from the next record on. ``event`` None: already written by an
        interrupted run, only the keys change."""
        problems: list[str] = []
        seq: int | None = None
        try:
            with self._exclusive() as fd:
                if before is not None:
                    before()
                if event is not None:
                    seq = self._append_locked(fd, [(event, {})], None, problems)[-1]
                self._keys = keys
                self._public = keys.signer.public_key()
                if self.vouched is not None:  # signed under the old key: verified as such
                    self.vouched.clear()
        finally:
            self._notify(problems)
        return seq

    @property
    def _mine(self) -> Any:
        """This instance's anchor row (one per instance sharing the index)."""
        return _heads.c.instance == self.instance

    def _set_anchor(self, conn: Connection, seq: int, digest: str) -> None:
        if conn.dialect.name in ("sqlite", "postgresql"):
            # Once per store batch (group commit): straight to the driver, same connection
            # and transaction; building the UPDATE through SQLAlchemy cost more than the
            # rest of the record (issue 17; PostgreSQL: issue 16).
            cursor = conn.connection.cursor()
            try:
                cursor.execute(_SET_ANCHOR if conn.dialect.name == "sqlite" else _SET_ANCHOR_PG,
                               (seq, digest, self.instance))
                count = cursor.rowcount
            finally:
                cursor.close()
        else:
            count = conn.execute(
                update(_heads).where(self._mine).values(seq=seq, digest=digest)).rowcount
        if not count:
            instances.insert_anchor(conn, self.instance, seq, digest, retry=self.copies)

    def try_append(self, event: AuditEvent) -> int | None:
        """``append`` for a caller that must not wait (the web service's event loop: a
        thread hand-off cost a QIDO-RS request ~0.5 ms, issue 17): the record written and
        fsync'ed before it returns, as ``append`` makes it, or None with nothing written
        when what it needs is taken: the trail (this process's lock or a queued append,
        another process's file lock), or when the file is not as this process left it
        (its check reads the index). Embedded index only (a shared index copies each line
        with the anchor: None). The caller then ``append``s, in a worker thread.

        Its anchor move (an index transaction, ~0.3-0.5 ms of a QIDO-RS request) is left
        to the flusher, within ``DEFER_SECONDS``, or to the next append that moves the
        anchor anyway (a store batch's, a search's in a worker): meanwhile the anchor is
        behind the trail, the state a power loss already leaves (every reader accepts
        it; it never names a record that was not synced). The record itself is durable
        before the answer leaves, as always. No index connection on this path: a store
        batch holding the index's write lock no longer sends the search to a worker."""
        if not self._embedded or self._engine is None or self._left is None:
            return None
        refs = self._refs(event, None)  # (as ``append``: before anything is held)
        if not self._lock.acquire(blocking=False):
            return None
        problems: list[str] = []
        start = False
        try:
            left = self._left
            if left is None or self._queued:
                return None
            with self._file_held(wait=False) as fd:
                if fd < 0 or trail_tip.file_identity(fd) != left[0]:
                    return None
                seq = self._append_locked(fd, [(event, refs)], None, problems,
                                          anchor=False)[-1]
            start = self._settle_later()
        finally:
            self._lock.release()
            self._notify(problems)
        self._start_flusher(start)
        return seq

    def _anchor_quick(self, seq: int, digest: str, *, prune: bool = False) -> None:
        """``_set_anchor`` in a short transaction of its own on the embedded index, on the
        pool's driver connection without SQLAlchemy's connection and transaction objects
        (issue 17: once per access record). As ``_db``: committed with synchronous=NORMAL
        (no fsync of its own; the lines were fsync'ed first), the connection given back
        with FULL or discarded. No anchor row yet (a new trail): ``_set_anchor``'s insert.
        ``prune``: this process journaled lines (``trail_journal``) that the fsync before
        this covered: forgotten by the index in the same transaction."""
        assert self._engine is not None
        raw = self._engine.raw_connection()
        try:
            driver: Any = raw.driver_connection
            with _unsynced_commit(driver, raw.invalidate):
                count = driver.execute(_SET_ANCHOR, (seq, digest, self.instance)).rowcount
                if prune:
                    trail_journal.prune(driver, self.instance, seq)
                if count:
                    driver.commit()
                else:
                    driver.rollback()
        finally:
            raw.close()  # back to the pool (rolled back there if anything was left open)
        if not count:
            with self._db(None) as db:
                self._set_anchor(db, seq, digest)

    def _local_lines(self, after: int, upto: int) -> list[tuple[int, bytes]]:
        """The record lines of this instance's file with ``after < seq <= upto`` (the
        copy's catch-up after a rolled-back batch, or a first copy of an older trail).
        The caller holds the trail."""
        return instances.lines_of(self.path, after, upto)

    def _anchor(self) -> tuple[int, str] | None:
        with self._sessions() as session:
            head = session.execute(select(AuditHead).where(self._mine)).scalar_one_or_none()
            return (head.seq, head.digest) if head else None

    def broken(self) -> str:
        """The anchor's damage flag ("" while none was found)."""
        return self._broken()

    def _broken(self) -> str:
        with self._sessions() as session:
            head = session.execute(select(AuditHead).where(self._mine)).scalar_one_or_none()
            return head.broken if head else ""


    # --- references -------------------------------------------------------------------

    def _refs(self, event: AuditEvent, conn: Connection | None) -> dict[str, Any]:
        return grouped_refs(event, conn, self._engine)

    def _seal(self, seq: int, refs: dict[str, Any]) -> str:
        return seal(self._keys, seq, refs)

    def _unseal(self, seq: int, blob: str) -> dict[str, Any]:
        return unseal(self._keys, seq, blob)

    # --- reading ----------------------------------------------------------------------

    def records(self) -> Iterator[Record]:
        """Every record, references decrypted (integrity is ``verify``'s job)."""
        if not self.path.exists():
            return
        with open(self.path, encoding="ascii", errors="replace") as fh:
            for line in fh:
                try:
                    body = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if not isinstance(body, dict):
                    continue
                refs: dict[str, Any] = {}
                if "refs" in body:
                    try:
                        refs = self._unseal(int(body["seq"]), body["refs"])
                    except (InvalidTag, ValueError, KeyError, TypeError):
                        refs = {}
                yield Record(
                    instance=self.instance, seq=int(body.get("seq", 0)),
                    time=str(body.get("time", "")),
                    kind=str(body.get("kind", "")), action=str(body.get("action", "")),
                    outcome=str(body.get("outcome", "")), code=str(body.get("code", "")),
                    actor_ae=str(body.get("ae", "")), actor_address=str(body.get("address", "")),
                    actor_user=str(body.get("user", "")), message=str(body.get("message", "")),
                    detail=dict(body.get("detail") or {}), refs=refs, raw=body,
                )


    def all_records(self) -> list[Record]:
        """Every instance's records by time: this file's, then on a shared index the
        other instances' copies (``instances.merged_records``); on an embedded index the
        same as ``records``."""
        return instances.merged_records(self)

    # --- verification (``trail_verify``) ----------------------------------------------

    @property
    def public_key(self) -> Ed25519PublicKey:
        """The key signing new records (a rotation in this process swaps it)."""
        return self._public

    def anchor(self) -> tuple[int, str] | None:
        """The head anchor kept in the index: (last seq, its hash), None before any."""
        return self._anchor()

    def shared(self) -> AbstractContextManager[None]:
        """Hold off appenders while reading whole lines (``_shared``)."""
        return self._shared()

    def verify(self, *, tail: int | None = None) -> Verdict:
        """Check the chain, signatures, order and head anchor (``trail_verify.verify``)."""
        return trail_verify.verify(self, tail=tail)

    def check(self, since: Checkpoint | None, *, tail: int | None = None,
              full: bool = False) -> tuple[Checkpoint, str]:
        """The running server's check (``trail_verify.check``): only the lines appended
        since ``since`` while the file still starts as verified; ``full`` re-hashes the
        verified prefix too (the watcher's periodic full check)."""
        return trail_verify.check(self, since, tail=tail, full=full)

    # --- retention --------------------------------------------------------------------

    def purge_before(self, cutoff: dt.datetime, reason: str) -> int:
        """Replace records older than ``cutoff`` by one signed seal; returns how many."""
        with self._exclusive():
            purged = seal_before(self.path, self._keys.signer, cutoff, reason)
            if purged and self.copies:
                instances.seal_copy(self._engine, self.instance, self.path)
            return purged


class BatchWriter:
    """Appends records while the trail is held by ``AuditTrail.batch``."""

    def __init__(self, trail: AuditTrail) -> None:
        self._trail = trail
        self._fd: int | None = None
        self.problems: list[str] = []

    def write(self, conn: Connection, events: list[AuditEvent]) -> list[int]:
        """Durably append ``events``, moving the anchor inside ``conn``'s transaction."""
        if self._fd is None:
            raise TrailError("the trail is not held")
        pairs = [(event, self._trail._refs(event, conn)) for event in events]
        return self._trail._append_locked(self._fd, pairs, conn, self.problems, journal=True)


class TrailSink:
    """Recorder sink writing every event to the trail. ``durable``: a failure to write
    here means the event is not recorded, and an access depending on it is refused."""

    durable = True

    def __init__(self, trail: AuditTrail) -> None:
        self._trail = trail

    def write(self, event: AuditEvent) -> None:
        self._trail.append(event)

    def try_write(self, event: AuditEvent) -> bool:
        """``write`` without waiting, or False with nothing written (``try_append``)."""
        return self._trail.try_append(event) is not None

    def defer(self, event: AuditEvent) -> None:
        """An event that is no access: written with the next record (``AuditTrail.defer``)."""
        self._trail.defer(event)
