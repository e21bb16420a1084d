"""An access's record written from an event loop (issue 17): ``AuditTrail.try_append`` and
``Recorder.try_emit`` make the record durable exactly as ``append`` does (its anchor moved
by the next append or the flusher, within ``DEFER_SECONDS``: no index transaction on the
event loop), or write nothing at all when anything they need would make them wait: the
trail held by this process or by another one, a tail that is not this process's, a shared
index, a sink that could block. The caller then appends in a worker thread, so a record is
never written twice nor lost."""

from __future__ import annotations

import fcntl
import logging
import os
import shutil
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
from sqlalchemy import Engine

from pacsvault.audit import AuditEvent, AuditUnavailable, EventCode, Outcome
from pacsvault.audit.trail import AuditTrail, TrailUnwritable
from pacsvault.vault import Vault
from tests.helpers import count_fsyncs


def _query(n: int) -> AuditEvent:
    return AuditEvent(action="dicomweb.search", outcome=Outcome.SUCCESS, code=EventCode.QUERY,
                      actor_user="drtry", actor_address="127.0.0.1",
                      detail={"level": "study", "matches": n}, study_uids=("1.2.3",),
                      study_patients={"1.2.3": "PID-TRY"})


def _engine(vault: Vault) -> Engine:
    engine = vault.sessions.kw["bind"]
    assert isinstance(engine, Engine) and engine.dialect.name == "sqlite"
    return engine


def _pool_settings(engine: Engine) -> set[tuple[int, int]]:
    """(busy timeout, synchronous) of every connection the pool hands out."""
    held = [engine.raw_connection() for _ in range(3)]
    try:
        drivers: list[Any] = [c.driver_connection for c in held]
        return {(d.execute("PRAGMA busy_timeout").fetchone()[0],
                 d.execute("PRAGMA synchronous").fetchone()[0]) for d in drivers}
    finally:
        for c in held:
            c.close()


def _searches(trail: AuditTrail) -> list[int]:
    return [r.detail["matches"] for r in trail.records() if r.action == "dicomweb.search"]


def _count(trail: AuditTrail) -> tuple[int, int]:
    return len(list(trail.records())), trail.path.stat().st_size


@pytest.fixture
def trail(opened: Vault) -> Iterator[AuditTrail]:
    trail = opened.audit
    trail.append(_query(0))  # the tail is this process's from here on
    yield trail


def _anchored(trail: AuditTrail, seq: int, within: float = 10.0) -> bool:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        anchor = trail.anchor()
        if anchor is not None and anchor[0] == seq:
            return True
        time.sleep(0.02)
    return False


def test_try_append_is_an_append_that_did_not_wait(
        opened: Vault, trail: AuditTrail, monkeypatch: pytest.MonkeyPatch) -> None:
    engine = _engine(opened)
    before = trail.anchor()
    fsyncs = count_fsyncs(monkeypatch)

    def no_index() -> None:
        raise AssertionError("try_append used the index")

    with monkeypatch.context() as patch:  # nothing of the index on the event loop's path
        patch.setattr(engine, "raw_connection", no_index)
        patch.setattr(engine, "connect", no_index)
        patch.setattr(trail, "_flusher_timed", True)  # (the flusher, woken, is not this)
        seq = trail.try_append(_query(1))
    assert seq is not None
    assert len(fsyncs) == 1  # the line is durable before the answer leaves
    last = list(trail.records())[-1]
    assert last.seq == seq and last.action == "dicomweb.search"
    assert last.detail["matches"] == 1
    assert last.refs["patients"] == {"PID-TRY": {"study_uids": ["1.2.3"], "sop_uids": []}}
    # the anchor follows within DEFER_SECONDS (the flusher), never ahead of the file
    assert before is not None and before[0] == seq - 1
    assert _anchored(trail, seq)
    assert trail.verify().ok
    seq2 = trail.append(_query(2))  # the next append goes on from it, quick path again
    assert seq2 == seq + 1 and trail.try_append(_query(3)) == seq + 2
    verdict = trail.verify()
    assert verdict.ok, verdict.problem
    # the connections are back with the busy timeout and synchronous=FULL (2)
    assert _pool_settings(_engine(opened)) == {(30000, 2)}


def test_try_append_writes_nothing_when_anything_would_wait(
        opened: Vault, trail: AuditTrail, monkeypatch: pytest.MonkeyPatch) -> None:
    engine = _engine(opened)
    before = _count(trail)

    def refused() -> None:
        start = time.monotonic()
        assert trail.try_append(_query(9)) is None
        assert time.monotonic() - start < 5  # no busy wait (the timeout is 30 s)
        assert _count(trail) == before

    # this process's trail lock held (a store batch, another request's append)
    with trail._lock:
        refused()
    # an append queued for the group commit
    with trail._queue_lock:
        trail._queued.append(object())  # type: ignore[arg-type]
    try:
        refused()
    finally:
        with trail._queue_lock:
            trail._queued.clear()
    # the trail's file lock held by another appender (a CLI command, another worker)
    lock_fd = os.open(trail.root / "trail.lock", os.O_RDWR)
    try:
        fcntl.flock(lock_fd, fcntl.LOCK_EX)
        refused()
    finally:
        fcntl.flock(lock_fd, fcntl.LOCK_UN)
        os.close(lock_fd)
    # the index's write lock held by another connection (a store batch of another
    # process): no longer a reason to wait, the record needs no index transaction
    with engine.connect() as other:
        other.exec_driver_sql("BEGIN IMMEDIATE")
        start = time.monotonic()
        held = trail.try_append(_query(8))
        assert held is not None and time.monotonic() - start < 5
        assert _searches(trail)[-1] == 8
        other.exec_driver_sql("ROLLBACK")
    assert _anchored(trail, held)  # moved once the lock was free
    before = _count(trail)
    assert _pool_settings(engine) == {(30000, 2)}
    # a shared index: every line is copied with the anchor move
    with monkeypatch.context() as patch:
        patch.setattr(trail, "_embedded", False)
        refused()
    # the tail is no longer this process's: another appender wrote after it
    other_trail = AuditTrail(trail.root, trail.keys, opened.sessions, instance=trail.instance)
    other_trail.append(_query(10))
    before = _count(trail)
    refused()
    # none of it was lost or doubled: the waiting append writes the record once
    seq = trail.append(_query(11))
    assert _searches(trail)[-2:] == [10, 11]
    assert trail.anchor() == (seq, trail.anchor()[1])  # type: ignore[index]
    assert trail.try_append(_query(12)) == seq + 1  # ours again
    verdict = trail.verify()
    assert verdict.ok, verdict.problem


def test_try_append_a_record_that_cannot_be_written_raises(
        trail: AuditTrail, monkeypatch: pytest.MonkeyPatch) -> None:
    def full(fd: int) -> None:
        raise OSError(28, "No space left on device")

    with monkeypatch.context() as patch:
        patch.setattr(os, "fsync", full)
        with pytest.raises(TrailUnwritable):
            trail.try_append(_query(1))
    seq = trail.append(_query(2))  # writable again; the chain goes on
    assert trail.anchor() == (seq, trail.anchor()[1])  # type: ignore[index]
    assert trail.verify().ok


class _Slow:
    """A sink that may block (say, a queue on disk): ``try_emit`` must not use it."""

    def __init__(self) -> None:
        self.seen: list[AuditEvent] = []

    def write(self, event: AuditEvent) -> None:
        self.seen.append(event)


def test_try_emit_gives_the_event_to_every_sink_once_or_to_none(
        opened: Vault, trail: AuditTrail, caplog: pytest.LogCaptureFixture) -> None:
    recorder = opened.recorder
    caplog.set_level(logging.INFO, logger="pacsvault.events")

    def lines() -> int:
        return sum(1 for r in caplog.records if "dicomweb.search" in r.getMessage())

    before = _count(trail)
    assert recorder.try_emit(_query(1))
    assert _count(trail)[0] == before[0] + 1 and lines() == 1
    # the trail would wait: no sink got it, the caller emits in a worker thread
    with trail._lock:
        assert not recorder.try_emit(_query(2))
    assert _count(trail)[0] == before[0] + 1 and lines() == 1
    # an event that is no access, or a deferrable one: never tried
    assert not recorder.try_emit(AuditEvent(
        action="web.signin", outcome=Outcome.SUCCESS, code=EventCode.USER_AUTHENTICATION))
    # a sink that may block: not tried either
    slow = _Slow()
    recorder.add_sink(slow)
    assert not recorder.try_emit(_query(3))
    assert slow.seen == [] and _count(trail)[0] == before[0] + 1 and lines() == 1


def test_try_emit_refuses_the_access_when_the_record_is_not_durable(
        opened: Vault, trail: AuditTrail, monkeypatch: pytest.MonkeyPatch) -> None:
    def full(fd: int) -> None:
        raise OSError(28, "No space left on device")

    with monkeypatch.context() as patch:
        patch.setattr(os, "fsync", full)
        with pytest.raises(AuditUnavailable):
            opened.recorder.try_emit(_query(1))
    assert not opened.recorder.available
    # the tail is checked again after a failed write: not without waiting
    assert not opened.recorder.try_emit(_query(2))
    opened.recorder.emit(_query(2))  # the caller's fallback, in a worker thread
    assert opened.recorder.available
    assert opened.recorder.try_emit(_query(3))  # the tail is this process's again
    assert _searches(trail)[-2:] == [2, 3]


def test_a_waiting_try_append_does_not_hold_up_another_thread(
        opened: Vault, trail: AuditTrail) -> None:
    """While a group-commit append waits on the file lock, a ``try_append`` returns None
    at once; once the lock is free both records are there, each once."""
    lock_fd = os.open(trail.root / "trail.lock", os.O_RDWR)
    fcntl.flock(lock_fd, fcntl.LOCK_EX)
    done: list[Any] = []
    waiter = threading.Thread(target=lambda: done.append(trail.append(_query(20))))
    try:
        waiter.start()
        time.sleep(0.2)  # the waiter holds the trail's thread lock, waiting for the file
        assert trail.try_append(_query(21)) is None
        assert not done
    finally:
        fcntl.flock(lock_fd, fcntl.LOCK_UN)
        os.close(lock_fd)
        waiter.join(30)
    assert done and trail.try_append(_query(22)) == done[0] + 1
    assert _searches(trail)[-2:] == [20, 22]


def test_a_late_anchor_never_moves_back_nor_ahead(opened: Vault, trail: AuditTrail) -> None:
    """The anchor of a ``try_append`` is moved later: meanwhile another appender (a CLI
    command, another worker) appends and anchors further; the late move then anchors the
    file's last record, never the older one, and never a record that is not durable."""
    with trail._wake:
        trail._flusher_timed = True  # (keep the flusher asleep: the move is ``flush``'s)
    mine = trail.try_append(_query(30))
    assert mine is not None
    other = AuditTrail(trail.root, trail.keys, opened.sessions, instance=trail.instance)
    theirs = other.append(_query(31))
    assert theirs == mine + 1 and trail.anchor()[0] == theirs  # type: ignore[index]
    trail.flush()  # (it read their tail, checked against the anchor, and anchored it)
    assert trail.anchor()[0] == theirs  # type: ignore[index]
    assert trail.try_append(_query(32)) == theirs + 1
    assert trail.append(_query(33)) == theirs + 2
    assert trail.anchor()[0] == theirs + 2  # type: ignore[index]
    assert _searches(trail)[-4:] == [30, 31, 32, 33]
    assert trail.verify().ok


def test_a_crash_before_the_late_anchor_leaves_a_trail_that_verifies(
        opened: Vault, trail: AuditTrail) -> None:
    """Killed between the record's fsync and its anchor move: the next start finds the
    file one record ahead of the anchor (as after a power loss), verifies it, and goes on;
    the record is there."""
    with trail._wake:
        trail._flusher_timed = True
    seq = trail.try_append(_query(40))
    assert seq is not None and trail.anchor()[0] == seq - 1  # type: ignore[index]
    restarted = AuditTrail(trail.root, trail.keys, opened.sessions, instance=trail.instance)
    verdict = restarted.verify()
    assert verdict.ok, verdict.problem
    assert _searches(restarted)[-1] == 40
    assert restarted.append(_query(41)) == seq + 1
    assert restarted.anchor()[0] == seq + 1  # type: ignore[index]
    assert restarted.verify().ok


def test_a_backup_copy_keeps_the_records_anchored_later(
        opened: Vault, trail: AuditTrail) -> None:
    """A backup copies the index, then the trail up to the copy's anchor: a search's
    record not yet anchored (``try_append``) must be in the copy, not left for the next
    backup. The staging anchors every record first (``backup.staging._anchor_all``)."""
    from pacsvault.backup import staging

    with trail._wake:
        trail._flusher_timed = True  # (the flusher asleep: only the staging anchors)
    seq = trail.try_append(_query(50))
    assert seq is not None and trail.anchor()[0] == seq - 1  # type: ignore[index]
    staged = staging._stage(opened)
    try:
        assert staged.anchor_seq == seq
        copied = (staged.root / "audit" / "trail.jsonl").read_bytes().splitlines()
        assert copied and staging._record_seq(copied[-1] + b"\n") == seq
    finally:
        staged.close()
        shutil.rmtree(staged.root, ignore_errors=True)
