"""Issue 15: the running trail check reads only what was appended (audit/watch.py).

The watcher's periodic check used to re-read and re-hash the whole trail every 30 s. Now
it verifies the appended lines alone while the file still starts as verified (same inode,
not shorter, the last verified line in place). What that cannot see is handed to a full
check: a replaced, cut or shifted file at once; a same-length edit of an OLD record at the
watcher's periodic full check (every ``FULL_CHECK_EVERY`` checks). In-process, no server.
"""

from __future__ import annotations

import base64
import hashlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from pacsvault.audit import AuditEvent, EventCode, Outcome
from pacsvault.audit.trail import AuditTrail, Checkpoint
from pacsvault.audit.watch import FULL_CHECK_EVERY, TAMPER_ACTION, TrailWatcher
from pacsvault.vault import Vault
from tests.helpers import new_vault


@pytest.fixture
def vault(tmp_path: Path) -> Iterator[Vault]:
    opened = new_vault(tmp_path).open()
    yield opened
    opened.close()


def _event(n: int) -> AuditEvent:
    return AuditEvent(action="test.event", outcome=Outcome.SUCCESS,
                      code=EventCode.APPLICATION_ACTIVITY, message=f"event {n:04d}")


def _canonical(body: dict[str, Any]) -> bytes:
    return json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def _line_of(path: Path, seq: int) -> tuple[int, bytes]:
    """(byte offset, line) of record ``seq``."""
    offset = 0
    for line in path.read_bytes().splitlines(keepends=True):
        if json.loads(line)["seq"] == seq:
            return offset, line
        offset += len(line)
    raise AssertionError(f"no record {seq}")


def _edit_in_place(path: Path, seq: int) -> None:
    """Same length, same inode: 'event 0002' becomes 'event 9002' in record ``seq``."""
    offset, line = _line_of(path, seq)
    edited = line.replace(b'"message":"event 0', b'"message":"event 9', 1)
    assert edited != line and len(edited) == len(line)
    with open(path, "r+b") as fh:
        fh.seek(offset)
        fh.write(edited)


def _verified(vault: Vault) -> tuple[AuditTrail, Checkpoint]:
    """Six records and the check that verified them."""
    for n in range(6):
        vault.audit.append(_event(n))
    point, problem = vault.audit.check(None)
    assert not problem
    return vault.audit, point


def test_appended_lines_alone_are_verified(vault: Vault) -> None:
    trail = vault.audit
    for n in range(5):
        trail.append(_event(n))
    point, problem = trail.check(None)
    assert not problem
    assert point.offset == trail.path.stat().st_size
    for n in range(5, 8):
        trail.append(_event(n))
    point, problem = trail.check(point)
    assert not problem
    assert point.offset == trail.path.stat().st_size
    assert point.digest == hashlib.sha256(trail.path.read_bytes()).hexdigest()
    assert point.inode == trail.path.stat().st_ino
    # a forged next record (chained, signed with another key) is found at once
    last = json.loads(trail.path.read_bytes().splitlines()[-1])
    last.pop("sig")
    forged = dict(last, seq=int(last["seq"]) + 1,
                  prev=hashlib.sha256(_canonical(last)).hexdigest(), message="forged")
    forged["sig"] = base64.b64encode(Ed25519PrivateKey.generate().sign(
        hashlib.sha256(_canonical(forged)).digest())).decode()
    with open(trail.path, "ab") as fh:
        fh.write(_canonical(forged) + b"\n")
    _, problem = trail.check(point)
    assert "altered or forged" in problem


def test_an_edited_old_record_is_found_by_the_periodic_full_check(vault: Vault) -> None:
    trail = vault.audit
    for n in range(6):
        trail.append(_event(n))
    watcher = TrailWatcher(trail, vault.recorder, 3600)
    watcher.start()
    try:
        assert watcher.check_now() == []
        seq = int(json.loads(trail.path.read_bytes().splitlines()[2])["seq"])
        _edit_in_place(trail.path, seq)
        trail.append(_event(6))  # the file goes on growing after the edit
        found: list[str] = []
        checks = 0
        while not found and checks < FULL_CHECK_EVERY:
            found = watcher.check_now()
            checks += 1
        assert found, f"not found within {FULL_CHECK_EVERY} checks"
        assert f"record {seq}" in found[0]
        assert any(r.action == TAMPER_ACTION for r in trail.records())
    finally:
        watcher.stop()


def test_full_check_finds_an_edited_old_record(vault: Vault) -> None:
    trail, point = _verified(vault)
    _edit_in_place(trail.path, 3)
    trail.append(_event(6))
    _, problem = trail.check(point, full=True)
    assert "record 3" in problem and "altered or forged" in problem


def test_a_shifted_or_cut_file_is_checked_in_full_at_once(vault: Vault) -> None:
    trail, point = _verified(vault)
    lines = trail.path.read_bytes().splitlines(keepends=True)
    # one old record deleted, then a genuine append: the prefix shifted
    trail.path.write_bytes(b"".join(lines[:2] + lines[3:]))
    trail.append(_event(6))
    _, problem = trail.check(point)
    assert "out of order" in problem or "does not follow" in problem


def test_a_cut_tail_is_found_at_once(vault: Vault) -> None:
    trail, point = _verified(vault)
    lines = trail.path.read_bytes().splitlines(keepends=True)
    trail.path.write_bytes(b"".join(lines[:-2]))
    _, problem = trail.check(point)
    assert "truncated" in problem


def test_a_retention_rewrite_is_verified_in_full_and_passes(vault: Vault) -> None:
    import datetime as dt

    trail, point = _verified(vault)
    inode = trail.path.stat().st_ino
    cutoff = dt.datetime.now(dt.UTC) + dt.timedelta(seconds=1)
    assert trail.purge_before(cutoff, "test retention") > 0
    trail.append(_event(6))
    assert trail.path.stat().st_ino != inode
    point, problem = trail.check(point)
    assert not problem
    assert point.inode == trail.path.stat().st_ino
    assert point.offset == trail.path.stat().st_size
