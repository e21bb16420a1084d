"""The trail's anchor commit on an embedded index (issue 17): the access's record is
fsync'ed as before; the anchor's own transaction commits with ``synchronous=NORMAL``
(durable with the next synced commit; a power loss leaves it behind the trail, never
ahead), and the pooled connection goes back with ``synchronous=FULL`` for everyone else."""

from __future__ import annotations

from typing import Any

import pytest
from sqlalchemy import Engine, event

from pacsvault.audit import AuditEvent, EventCode, Outcome
from pacsvault.vault import Vault
from tests.helpers import count_fsyncs


def _query(n: int) -> AuditEvent:
    return AuditEvent(action="dicomweb.search", outcome=Outcome.SUCCESS,
                      code=EventCode.QUERY, message=f"query {n}")


def test_anchor_relaxed_record_synced_pool_restored(opened: Vault,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    trail = opened.audit
    engine = opened.sessions.kw["bind"]
    assert isinstance(engine, Engine) and engine.dialect.name == "sqlite"
    pragmas: list[str] = []
    traced: list[Any] = []

    def seen(statement: str) -> None:  # SQLite's own trace: driver-level statements too
        if statement.upper().startswith("PRAGMA SYNCHRONOUS="):
            pragmas.append(statement.split("=")[-1].strip().upper())

    def checkout(dbapi_conn: Any, _record: Any, _proxy: Any) -> None:
        dbapi_conn.set_trace_callback(seen)
        traced.append(dbapi_conn)

    fsyncs = count_fsyncs(monkeypatch)
    event.listen(engine.pool, "checkout", checkout)
    try:
        seqs = [trail.append(_query(i)) for i in range(3)]
    finally:
        event.remove(engine.pool, "checkout", checkout)
        for dbapi_conn in traced:
            dbapi_conn.set_trace_callback(None)
    assert len(fsyncs) == 3  # each record's lines: fsync'ed before the call returns
    assert pragmas == ["NORMAL", "FULL"] * 3
    anchor = trail.anchor()
    assert anchor is not None and anchor[0] == seqs[-1]
    held = [engine.connect() for _ in range(4)]
    try:
        assert {c.exec_driver_sql("PRAGMA synchronous").scalar() for c in held} == {2}
    finally:
        for c in held:
            c.close()
