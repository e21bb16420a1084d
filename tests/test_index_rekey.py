"""The index is re-keyed under running readers (CI failure of test_rotation_online: an
association check met a connection opened with the old key and the modality waited 30 s
for an answer that never came)."""

from __future__ import annotations

import collections
import os
import threading
from pathlib import Path

import sqlcipher3
from pynetdicom import AE
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from pacsvault.crypto import keys, rotation
from pacsvault.dicom.server import DicomService
from pacsvault.vault import Vault, create


def _vault(tmp_path: Path) -> Vault:
    create(tmp_path / "data", key_file=tmp_path / "key")
    vault = Vault.open(tmp_path / "data", tmp_path / "key")
    vault.nodes.add("MOD1", "127.0.0.1")
    return vault


def test_readers_never_meet_the_old_key_while_the_master_key_rotates(tmp_path: Path) -> None:
    vault = _vault(tmp_path)
    errors: collections.Counter[str] = collections.Counter()
    reads = [0]
    stop = threading.Event()

    def reader() -> None:
        while not stop.is_set():
            try:
                assert vault.nodes.get("MOD1") is not None
                vault.audit.broken()
                reads[0] += 1
            except Exception as exc:  # the failure under test: counted, not raised
                errors[type(exc).__name__] += 1

    threads = [threading.Thread(target=reader) for _ in range(4)]
    for thread in threads:
        thread.start()
    try:
        for _ in range(2):
            before = reads[0]
            rotation.rotate(vault, online=True)
            assert reads[0] >= before
    finally:
        stop.set()
        for thread in threads:
            thread.join()
    try:
        assert not errors, errors
        assert reads[0] > 0
        assert vault.nodes.get("MOD1") is not None  # the engine goes on with the new key
    finally:
        vault.close()
    reopened = Vault.open(tmp_path / "data", tmp_path / "key")
    try:
        assert reopened.nodes.get("MOD1") is not None
    finally:
        reopened.close()


def test_an_association_the_index_cannot_check_is_rejected_at_once(tmp_path: Path) -> None:
    """Any failure while checking a peer answers a transient rejection (which a modality
    retries) instead of silence until its ACSE timeout."""
    vault = _vault(tmp_path)
    service = DicomService(vault)
    ports = service.start("127.0.0.1", 0, None)
    try:
        # The index changes key behind the running server's back: its checks now fail.
        key = vault._master.derive(keys.PURPOSE_INDEX, vault.vault_id)
        conn = sqlcipher3.connect(str(vault.layout.index))
        conn.execute(f"PRAGMA key = \"x'{key.hex()}'\"")
        conn.execute(f"PRAGMA rekey = \"x'{os.urandom(32).hex()}'\"")
        conn.close()
        ae = AE(ae_title="MOD1")
        ae.acse_timeout = 120
        ae.add_requested_context(Verification)
        assoc = ae.associate("127.0.0.1", ports["dicom_port"], ae_title="PACSVAULT")
        assert assoc.is_rejected, (assoc.is_aborted, assoc.is_established)
        assert assoc.acceptor.primitive is not None
        assert assoc.acceptor.primitive.result == 0x02  # rejected-transient
    finally:
        service.stop()
        vault.engine.dispose()
