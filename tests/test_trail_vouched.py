"""The running watcher skips the Ed25519 check of lines this process wrote, byte for byte
(issue 17: ``AuditTrail.vouched``, ``trail_verify._ours``): every other line, and any of
ours edited since, is verified as before. In-process, no server."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from pacsvault.audit import AuditEvent, EventCode, Outcome
from pacsvault.audit.trail import AuditTrail
from pacsvault.audit.trail_format import KeyPlan
from pacsvault.audit.watch import TrailWatcher
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


def _counted(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    verified: list[int] = []
    real = KeyPlan.verifies

    def verifies(self: KeyPlan, index: int, *args: Any, **kwargs: Any) -> bool:
        verified.append(index)
        return real(self, index, *args, **kwargs)

    monkeypatch.setattr(KeyPlan, "verifies", verifies)
    return verified


def _edit_last(path: Path) -> None:
    """Same length, same inode: the last record's message changed."""
    data = path.read_bytes()
    start = data.rstrip(b"\n").rfind(b"\n") + 1
    line = data[start:]
    edited = line.replace(b'"message":"event 0', b'"message":"event 9', 1)
    assert edited != line and len(edited) == len(line)
    with open(path, "r+b") as fh:
        fh.seek(start)
        fh.write(edited)


def test_own_lines_skip_the_signature_others_do_not(vault: Vault,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    trail = vault.audit
    for n in range(3):
        trail.append(_event(n))
    watcher = TrailWatcher(trail, vault.recorder, 3600)
    watcher.start()
    try:
        verified = _counted(monkeypatch)
        trail.append(_event(3))
        trail.defer(_event(4))
        trail.append(_event(5))
        assert watcher.check_now() == []
        assert verified == []  # three lines of ours: no signature check
        assert not trail.vouched  # each taken out as it was seen
        # a line written by another process (a CLI command): verified
        other = AuditTrail(trail.root, trail.keys, vault.sessions, instance=trail.instance)
        other.append(_event(6))
        trail.append(_event(7))
        assert watcher.check_now() == []
        assert len(verified) == 1
        # one of ours edited after it was written: verified, and the edit is found
        trail.append(_event(8))
        _edit_last(trail.path)
        found = watcher.check_now()
        assert len(found) == 1 and "altered or forged" in found[0]
    finally:
        watcher.stop()
    assert trail.vouched is None  # no watcher: nothing kept


def test_no_watcher_keeps_nothing_and_a_full_verify_checks_every_line(
        vault: Vault, monkeypatch: pytest.MonkeyPatch) -> None:
    trail = vault.audit
    for n in range(4):
        trail.append(_event(n))
    assert trail.vouched is None
    watcher = TrailWatcher(trail, vault.recorder, 3600)
    watcher.start()
    try:
        trail.append(_event(4))
        verified = _counted(monkeypatch)
        verdict = trail.verify()  # ``audit verify``, the start-up check: every signature
        assert verdict.ok
        assert len(verified) == verdict.records
    finally:
        watcher.stop()
