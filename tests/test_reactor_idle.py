"""An idle accepted association does not wake its two threads every millisecond (issue 17),
yet still answers, releases and stops at once."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import pytest
from pynetdicom import AE
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from pacsvault.dicom import reactor
from pacsvault.dicom.server import DicomService
from pacsvault.vault import Vault, create

IDLE = 0.5  # seconds: pynetdicom's 1 ms loops woke each thread ~500 times in it


def test_an_idle_association_sleeps_and_still_answers_releases_and_stops(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    counts = {"dul": 0, "assoc": 0}
    wait, expired = reactor.WakeableDUL._pv_wait, reactor.WakeableDUL.idle_timer_expired

    def counted_wait(self: reactor.WakeableDUL) -> None:
        counts["dul"] += 1
        wait(self)

    def counted_expired(self: reactor.WakeableDUL) -> bool:  # once per association round
        counts["assoc"] += 1
        return bool(expired(self))

    monkeypatch.setattr(reactor.WakeableDUL, "_pv_wait", counted_wait)
    monkeypatch.setattr(reactor.WakeableDUL, "idle_timer_expired", counted_expired)
    create(tmp_path / "data", key_file=tmp_path / "key")
    vault = Vault.open(tmp_path / "data", tmp_path / "key")
    vault.nodes.add("IDLESCU", "127.0.0.1")
    service = DicomService(vault)
    ports = service.start("127.0.0.1", 0, None)
    try:
        ae = AE(ae_title="IDLESCU")
        ae.add_requested_context(Verification)
        ae.dimse_timeout = ae.acse_timeout = 120  # a loaded machine is slow, not wrong
        assoc = ae.associate("127.0.0.1", ports["dicom_port"], ae_title="PACSVAULT")
        assert assoc.is_established
        assert assoc.send_c_echo().Status == 0
        time.sleep(0.2)  # let both server threads settle into their waits
        before = dict(counts)
        time.sleep(IDLE)
        idle = {k: counts[k] - before[k] for k in counts}
        # about one wake-up per 20 ms (``IDLE_TICK``: 25), twice that as slack; was ~one
        # per ms (a few hundred on a loaded machine)
        assert idle["dul"] <= 50, idle
        assert idle["assoc"] <= 50, idle
        assert assoc.send_c_echo().Status == 0  # woken by the request, not a tick
        started = time.monotonic()
        assoc.release()
        assert assoc.is_released
        assert time.monotonic() - started < 10  # generous: the machine is shared

        # an idle association the server stops: its threads are woken and end
        second = ae.associate("127.0.0.1", ports["dicom_port"], ae_title="PACSVAULT")
        assert second.is_established
        server_threads = _server_association_threads()
        assert server_threads
    finally:
        started = time.monotonic()
        service.stop()
        stopped = time.monotonic() - started
        vault.close()
    assert stopped < 10
    for thread in server_threads:
        thread.join(10)
        assert not thread.is_alive()
    second.abort()


def _server_association_threads() -> list[threading.Thread]:
    """The server side's association threads (the client's are plain Associations)."""
    found: list[Any] = [t for t in threading.enumerate()
                        if isinstance(t, reactor.FastAssociation)]
    return found
