"""The trail's quick append on an embedded index (issue 17): when the file's tail is the
one this process left, a deferred record opens no index connection and an access's record
moves the anchor on the pool's driver connection (``AuditTrail._anchor_quick``). The
records, the chain, the fsyncs and the anchor are the ones of the full path."""

from __future__ import annotations

from typing import Any

import pytest
from sqlalchemy import Engine, event, text

from pacsvault.audit import AuditEvent, EventCode, Outcome
from pacsvault.audit.trail import AuditTrail
from pacsvault.vault import Vault
from tests.helpers import count_fsyncs

_SAME = ("v", "kind", "action", "outcome", "code", "ae", "address", "user", "message",
         "detail")


def _accepted(n: int) -> AuditEvent:
    return AuditEvent(action="dicom.association.accepted", outcome=Outcome.SUCCESS,
                      code=EventCode.USER_AUTHENTICATION, actor_ae="MODALITY",
                      actor_address="127.0.0.1", detail={"tls": False, "n": n})


def _query(n: int) -> AuditEvent:
    return AuditEvent(action="dicom.find", outcome=Outcome.SUCCESS, code=EventCode.QUERY,
                      actor_ae="MODALITY", actor_address="127.0.0.1",
                      detail={"level": "study", "matches": n}, study_uids=("1.2.3",),
                      study_patients={"1.2.3": "PID-1"})


def _association(trail: AuditTrail, n: int) -> None:
    trail.defer(_accepted(n))
    trail.append(_query(n))


def _written(vault: Vault, full: bool, monkeypatch: pytest.MonkeyPatch
             ) -> tuple[list[dict[str, Any]], list[int], list[int]]:
    """Three associations' records; per record, pool checkouts and fsyncs it cost."""
    trail = vault.audit
    engine = vault.sessions.kw["bind"]
    assert isinstance(engine, Engine) and engine.dialect.name == "sqlite"
    if full:
        monkeypatch.setattr(trail, "_embedded", False)
    trail.append(_query(0))  # the tail is this process's from here on
    checkouts: list[int] = []

    def checkout(*_args: Any) -> None:
        checkouts.append(1)

    fsyncs = count_fsyncs(monkeypatch)
    event.listen(engine.pool, "checkout", checkout)
    per_checkouts, per_fsyncs = [], []
    try:
        for n in range(1, 4):
            for deferred, record in ((True, _accepted(n)), (False, _query(n))):
                checkouts.clear()
                fsyncs.clear()
                if deferred:
                    trail.defer(record)
                else:
                    trail.append(record)
                per_checkouts.append(len(checkouts))
                per_fsyncs.append(len(fsyncs))
    finally:
        event.remove(engine.pool, "checkout", checkout)
    bodies = [r.raw | {"refs": r.refs} for r in trail.records()]
    return bodies, per_checkouts, per_fsyncs


def test_quick_path_same_records_fewer_connections(tmp_path: Any,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    from tests.helpers import make_vault

    results = {}
    for full in (False, True):
        vault = make_vault(tmp_path / ("full" if full else "quick")).open()
        try:
            with monkeypatch.context() as patch:
                results[full] = _written(vault, full, patch)
            verdict = vault.audit.verify()
            assert verdict.ok, verdict.problem
            anchor = vault.audit.anchor()
            assert anchor is not None and anchor[0] == results[full][0][-1]["seq"]
        finally:
            vault.close()
    quick, full_path = results[False], results[True]
    assert [{k: b[k] for k in (*_SAME, "seq", "refs")} for b in quick[0]] == \
        [{k: b[k] for k in (*_SAME, "seq", "refs")} for b in full_path[0]]
    # the same fsyncs: none for a deferred record, one for an access's
    assert quick[2] == full_path[2] == [0, 1] * 3
    # the full path checks out a connection for each record; the quick one only to move
    # the anchor of an access's record
    assert full_path[1] == [1, 1] * 3
    assert quick[1] == [0, 1] * 3


def test_quick_path_after_another_appender_and_without_anchor(opened: Vault) -> None:
    trail = opened.audit
    _association(trail, 1)
    # another process (a CLI command) appends: the tail is no longer ours; the full path
    # checks it against the anchor, and no problem is found
    other = AuditTrail(trail.root, trail.keys, opened.sessions, instance=trail.instance)
    other.append(_query(2))
    problems: list[str] = []
    trail.on_problem = problems.append
    _association(trail, 3)
    _association(trail, 4)  # ours again: the quick path
    # the anchor row gone (as before a first append): the quick path inserts it
    with opened.engine.begin() as conn:
        conn.execute(text("DELETE FROM audit_head"))
    seq = trail.append(_query(5))
    assert problems == []
    assert trail.anchor() == (seq, trail.anchor()[1])  # type: ignore[index]
    verdict = trail.verify()
    assert verdict.ok, verdict.problem
    accepted, find = "dicom.association.accepted", "dicom.find"
    assert [(r.action, r.detail.get("n", r.detail.get("matches")))
            for r in trail.records()][-8:] == [
        (accepted, 1), (find, 1), (find, 2), (accepted, 3), (find, 3), (accepted, 4),
        (find, 4), (find, 5)]


def test_a_deferred_record_does_not_wake_a_flusher_already_due(
        opened: Vault, monkeypatch: pytest.MonkeyPatch) -> None:
    """The flusher sleeping until an earlier record's deadline is not woken by the next
    ``defer`` (issue 17: a wake-up per C-FIND association); that record is still durable
    within ``DEFER_SECONDS`` of its writing."""
    import time

    from pacsvault.audit.trail import DEFER_SECONDS
    from tests.helpers import wait_until

    trail = opened.audit
    _association(trail, 1)  # the flusher started, and now sleeps until a deadline
    assert wait_until(lambda: trail._flusher_timed, 10, period=0.005)
    woken: list[int] = []
    real = trail._wake.notify

    def counted(n: int = 1) -> None:
        woken.append(n)
        real(n)

    monkeypatch.setattr(trail._wake, "notify", counted)
    start = time.monotonic()
    trail.defer(_accepted(2))
    seq = list(trail.records())[-1].seq
    assert woken == []
    assert wait_until(lambda: (trail.anchor() or (0, ""))[0] >= seq, DEFER_SECONDS + 10,
                      period=0.01)
    # made durable by the flusher at its deadline (not by another append), within the window
    # (a loaded machine may add its scheduling delay)
    assert time.monotonic() - start <= DEFER_SECONDS + 2.0
    assert trail.verify().ok
