"""Issue 17: a plain DICOM connection is handed to its association thread by the accept
loop itself (``listener.PolicyServer.process_request``), without a connection thread of its
own; nothing there reads from the peer, so a silent client holds no one up, and the
association policy still decides (an unknown calling AE is rejected)."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
from pynetdicom import AE
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]
from pynetdicom.transport import AddressInformation

from pacsvault.dicom.listener import PolicyRequestHandler, _numeric
from pacsvault.dicom.server import DicomService
from pacsvault.vault import Vault, create

NODE = "INLINESCU"


@pytest.fixture(scope="module")
def port(tmp_path_factory: pytest.TempPathFactory) -> Iterator[int]:
    root = tmp_path_factory.mktemp("inline")
    create(root / "data", key_file=root / "key")
    vault = Vault.open(root / "data", root / "key")
    vault.nodes.add(NODE, "127.0.0.1")
    service = DicomService(vault)
    try:
        yield service.start("127.0.0.1", 0, None)["dicom_port"]
    finally:
        service.stop()
        vault.close()


def _ae(title: str) -> AE:
    ae = AE(ae_title=title)
    ae.add_requested_context(Verification)
    ae.dimse_timeout = ae.acse_timeout = ae.network_timeout = 60  # loaded machine
    return ae


def test_a_plain_association_starts_from_the_accept_loop(
        port: int, monkeypatch: pytest.MonkeyPatch) -> None:
    handled_in: list[str] = []
    handle = PolicyRequestHandler.handle

    def recorded(self: PolicyRequestHandler) -> None:
        handled_in.append(threading.current_thread().name)
        handle(self)

    monkeypatch.setattr(PolicyRequestHandler, "handle", recorded)
    assoc = _ae(NODE).associate("127.0.0.1", port, ae_title="PACSVAULT")
    assert assoc.is_established
    assert assoc.send_c_echo().Status == 0
    assoc.release()
    assert handled_in == ["dicom-plain"]  # the accept loop's thread, no thread of its own


def test_a_silent_connection_holds_no_one_up(port: int) -> None:
    silent = socket.create_connection(("127.0.0.1", port))
    try:
        time.sleep(0.2)  # accepted, its association thread waits for a first byte
        started = time.monotonic()
        assoc = _ae(NODE).associate("127.0.0.1", port, ae_title="PACSVAULT")
        assert assoc.is_established
        assert assoc.send_c_echo().Status == 0
        assoc.release()
        # far below the first-byte deadline the silent one is under (seconds)
        assert time.monotonic() - started < 5
    finally:
        silent.close()


def test_the_policy_still_decides_on_the_inline_path(port: int) -> None:
    assoc: Any = _ae("STRANGER").associate("127.0.0.1", port, ae_title="PACSVAULT")
    assert assoc.is_rejected
    assoc = _ae(NODE).associate("127.0.0.1", port, ae_title="OTHERPACS")
    assert assoc.is_rejected


@pytest.mark.parametrize("address", [("127.0.0.1", 104), ("::1", 11112, 0, 0),
                                     ("fe80::1", 5, 3, 2), ("localhost", 7)])
def test_the_ends_are_recorded_as_pynetdicom_would(address: tuple[Any, ...]) -> None:
    ours, theirs = _numeric(address), AddressInformation.from_tuple(address)
    assert vars(ours) == vars(theirs)
    assert ours.as_tuple == theirs.as_tuple
