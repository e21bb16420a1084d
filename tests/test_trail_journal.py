"""A store batch's record made durable by the index's commit (issue 17, ``audit.trail_journal``).

What is shown, on a real vault and its real trail file: a store's record is not fsync'ed in
the file on its own, it is in the index (``audit_lines``) when ``store`` returns, and the
file holds the same bytes; the flusher's fsync prunes them. A power loss that takes the
file's unsynced end (all of it, or a line cut in the middle) is undone by the real
``audit verify`` and by the next append, byte for byte; bytes that are not those lines are
not "completed" (the usual alarm). A rolled-back batch's lines are fsync'ed at once. A
tail written by another process (maybe unsynced under it) makes the batch fsync its own
record, as before.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from pacsvault.audit import AuditEvent, EventCode, Outcome, trail_queue
from pacsvault.audit.trail import AuditTrail
from pacsvault.vault import Vault
from tests import corpus
from tests.helpers import VaultDir, count_fsyncs


@pytest.fixture(autouse=True)
def _no_flusher(monkeypatch: pytest.MonkeyPatch) -> None:
    """The flusher settles only when a test says so (``flush``), not 0.5 s later."""
    monkeypatch.setattr(trail_queue, "DEFER_SECONDS", 3600.0)


def _journal(vault: Vault) -> list[tuple[int, bytes]]:
    with vault.engine.connect() as conn:
        rows = conn.exec_driver_sql("SELECT seq, line FROM audit_lines ORDER BY seq").all()
    return [(int(seq), str(line).encode("ascii") + b"\n") for seq, line in rows]


@pytest.fixture
def files(tmp_path: Path) -> list[Path]:
    return corpus.synthetic_ct_series(tmp_path / "ct", 4, size=32)


def _warm(vault: Vault, path: Path) -> None:
    """One store, settled: this process wrote the file's tail last, every line synced
    (a process's first append finds a tail it did not leave, and fsyncs)."""
    _store(vault, path)
    vault.audit.flush()


def _store(vault: Vault, path: Path) -> None:
    result = vault.archive.store(path.read_bytes(), source_ae="SCU")
    assert result.status.value == "stored", result


def _event(n: int) -> AuditEvent:
    return AuditEvent(action="dicomweb.search", outcome=Outcome.SUCCESS,
                      code=EventCode.QUERY, message=f"query {n}")


def test_a_store_record_is_journaled_in_the_commit_and_pruned_once_synced(
        opened: Vault, files: list[Path], monkeypatch: pytest.MonkeyPatch) -> None:
    trail = opened.audit
    _warm(opened, files[0])
    before = trail.path.read_bytes()
    fsyncs = count_fsyncs(monkeypatch, of=trail.path)
    for path in files[1:]:
        _store(opened, path)
    assert fsyncs == []  # no fsync of the trail for the stores' records
    after = trail.path.read_bytes()
    journal = _journal(opened)
    # every line written since the last fsync is in the index, the same bytes, in order
    assert journal and b"".join(line for _seq, line in journal) == after[len(before):]
    anchor = trail.anchor()
    assert anchor is not None and anchor[0] == journal[-1][0]  # the anchor names them
    assert sum(1 for r in trail.records() if r.action == "dicom.store.committed") >= 1
    trail.flush()  # the flusher's turn: one fsync of the file, then the index forgets
    assert len(fsyncs) == 1
    assert _journal(opened) == []
    assert trail.verify().ok


@pytest.mark.parametrize("loss", ["whole", "torn", "no-newline"])
def test_what_a_power_loss_took_from_the_file_is_put_back(
        vault: VaultDir, opened: Vault, files: list[Path], loss: str) -> None:
    trail = opened.audit
    _warm(opened, files[0])
    before = trail.path.stat().st_size
    for path in files[1:]:
        _store(opened, path)
    after = trail.path.read_bytes()
    assert _journal(opened)
    # The page cache lost what was never fsync'ed: all of it, or all but part of a line.
    keep = {"whole": before, "torn": before + 37}[loss] if loss != "no-newline" \
        else len(after) - 1  # the last record without its newline
    os.truncate(trail.path, keep)
    res = vault.cli("audit", "verify", check=False)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "intact" in res.stdout
    assert trail.path.read_bytes()[:len(after)] == after  # byte for byte, then verify's own
    # the process that wrote them goes on (its next append finds the file changed)
    opened.audit.append(_event(1))
    assert trail.verify().ok


def test_bytes_that_are_not_the_lost_lines_are_not_completed(
        vault: VaultDir, opened: Vault, files: list[Path]) -> None:
    trail = opened.audit
    _warm(opened, files[0])
    before = trail.path.stat().st_size
    for path in files[1:]:
        _store(opened, path)
    os.truncate(trail.path, before)
    with open(trail.path, "ab") as fh:
        fh.write(b'{"v": 1, "seq": 999, "forged": true')  # not what the index holds
    res = vault.cli("audit", "verify", check=False)
    assert res.returncode == 1, res.stdout + res.stderr
    assert "BROKEN" in res.stdout


def test_the_next_start_puts_them_back_too(vault: VaultDir, files: list[Path]) -> None:
    first = vault.open()
    try:
        _warm(first, files[0])
        before = first.audit.path.stat().st_size
        for path in files[1:]:
            _store(first, path)
        after = first.audit.path.read_bytes()
        os.truncate(first.audit.path, before)
        second = vault.open()  # another process's first append (a CLI command, a start)
        try:
            second.audit.append(_event(2))
            assert second.audit.path.read_bytes()[:len(after)] == after
            assert second.audit.verify().ok
        finally:
            second.close()
    finally:
        first.close()


def test_a_rolled_back_batch_fsyncs_its_lines(
        opened: Vault, files: list[Path], monkeypatch: pytest.MonkeyPatch) -> None:
    trail = opened.audit
    _warm(opened, files[0])
    fsyncs = count_fsyncs(monkeypatch, of=trail.path)
    real = AuditTrail._set_anchor
    failing = [True]

    def anchor_fails(self: AuditTrail, conn: Any, seq: int, digest: str) -> None:
        if failing[0]:
            failing[0] = False
            raise OSError("the index is unwritable for a moment")
        real(self, conn, seq, digest)

    monkeypatch.setattr(AuditTrail, "_set_anchor", anchor_fails)
    size = trail.path.stat().st_size
    with pytest.raises(Exception):  # noqa: B017 (whatever the store path raises)
        _store(opened, files[1])
    assert trail.path.stat().st_size > size  # its record's lines were written...
    assert len(fsyncs) == 1  # ...and fsync'ed when the transaction rolled back
    assert _journal(opened) == []
    _store(opened, files[1])  # the store again: stored (its record fsync'ed: the
    assert _journal(opened) == []  # failed append left the file's state unknown)
    _store(opened, files[2])  # then journaled again
    assert _journal(opened)
    trail.flush()
    assert trail.verify().ok


def test_a_tail_another_process_wrote_makes_the_batch_fsync_its_record(
        vault: VaultDir, opened: Vault, files: list[Path],
        monkeypatch: pytest.MonkeyPatch) -> None:
    trail = opened.audit
    _warm(opened, files[0])
    other = vault.open()
    try:
        other.audit.defer(_event(3))  # another process's line, not fsync'ed
        fsyncs = count_fsyncs(monkeypatch, of=trail.path)
        _store(opened, files[1])
        assert len(fsyncs) == 1  # the chain under it was not known durable: fsync'ed
        assert _journal(opened) == []
        _store(opened, files[2])  # now the tail is this process's own, synced
        assert len(fsyncs) == 1 and _journal(opened)
    finally:
        other.close()
    trail.flush()
    assert trail.verify().ok
