"""The trail's record line from one encoding (``trail_format.signed_line``) and the
index's write lock taken straight on the driver (``index.dialect.take_write_lock``).

Why: both run once per stored batch (issue 17); neither may change a byte of a record
nor the errors a writer sees when the lock is not taken.
"""

from __future__ import annotations

import base64
import hashlib
import threading
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from sqlalchemy import create_engine
from sqlalchemy.exc import OperationalError

from pacsvault.audit.trail_format import canonical, record_hash, signed_line
from pacsvault.index import dialect

_KEY = Ed25519PrivateKey.from_private_bytes(bytes(range(32)))


def _record(**extra: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "v": "pacsvault-audit/1", "seq": 12, "prev": "ab" * 32,
        "time": "2026-12-06T05:00:00.000001+00:00", "kind": "event",
        "action": "dicom.store.committed", "outcome": "success", "code": "110107",
        "ae": "CT_SCANNER", "address": "127.0.0.1", "user": "",
        "message": "", "detail": {"instances": 1, "new": 1, "duplicates": 0},
        "refs": base64.b64encode(bytes(range(200))).decode(),
    }
    body.update(extra)
    return body


def _as_before(body: dict[str, Any]) -> tuple[str, bytes]:
    """What ``AuditTrail._sign`` did before: hash, sign, then encode the signed body."""
    digest = record_hash(body)
    body["sig"] = base64.b64encode(_KEY.sign(bytes.fromhex(digest))).decode()
    return digest, canonical(body)


@pytest.mark.parametrize("body", [
    _record(),
    _record(refs=None) | {"refs": "x"},
    _record(message="Zürich \u2028 \"quoted\" \\ é", user="dr\tx"),
    _record(detail={"sig": "nested", "seq": [1, {"sig": 2}], "zz": None, "a": 1.5}),
    {"action": "only-before", "seq": 1},  # nothing after "sig": the whole-body path
    {"time": "t", "v": "only-after"},  # nothing before "sig"
    {"action": "x", "seq": 1, "sih": "between", "sif": "", "time": "t"},
], ids=["store", "refs", "escapes", "nested-sig", "before", "after", "neighbours"])
def test_signed_line_is_the_canonical_signed_record(body: dict[str, Any]) -> None:
    old = dict(body)
    expected_digest, expected_line = _as_before(old)
    digest, line = signed_line(body, _KEY.sign)
    assert (digest, line) == (expected_digest, expected_line)
    assert body == old  # the same "sig" added to the body
    assert hashlib.sha256(canonical({k: v for k, v in body.items() if k != "sig"})
                          ).hexdigest() == digest


def test_write_lock_not_taken_raises_as_before(tmp_path: Path) -> None:
    engine = create_engine(f"sqlite:///{tmp_path / 'i.db'}", connect_args={"timeout": 0.05})
    with engine.begin() as conn:
        conn.exec_driver_sql("CREATE TABLE t (x INTEGER)")
    held, release = threading.Event(), threading.Event()

    def holder() -> None:
        with engine.begin() as conn:
            dialect.take_write_lock(conn)
            conn.exec_driver_sql("INSERT INTO t VALUES (1)")
            held.set()
            release.wait(10)

    thread = threading.Thread(target=holder)
    thread.start()
    try:
        assert held.wait(10)
        with engine.connect() as conn, conn.begin(), \
                pytest.raises(OperationalError, match="locked"):
            dialect.take_write_lock(conn)
    finally:
        release.set()
        thread.join(10)
    with engine.begin() as conn:  # taken once free; the transaction's writes commit
        dialect.take_write_lock(conn)
        conn.exec_driver_sql("INSERT INTO t VALUES (2)")
    with engine.connect() as conn:
        assert conn.exec_driver_sql("SELECT x FROM t ORDER BY x").all() == [(1,), (2,)]
    engine.dispose()
