"""Master key rotation in-process (issue 14, item 4). The audit trail across it: the chain
verifies across the hand-over (full check and the server's incremental watcher check),
older records' references unseal with the retired events key, and a forged hand-over (a
``keys.rotated`` record by a key that never signed the trail) fails verification. Also:
the syslog queue is re-encrypted, a passphrase-protected key stays protected."""

from __future__ import annotations

import base64
import hashlib
import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from pacsvault.audit import AuditEvent, EventCode, Outcome
from pacsvault.crypto import rotation
from pacsvault.vault import Vault, create
from tests.helpers import new_vault


@pytest.fixture
def vault(tmp_path: Path) -> Iterator[Vault]:
    opened = new_vault(tmp_path).open()
    yield opened
    opened.close()


def _event(n: int, patient: str = "") -> AuditEvent:
    return AuditEvent(action="test.event", outcome=Outcome.SUCCESS,
                      code=EventCode.APPLICATION_ACTIVITY, message=f"event {n}",
                      patient_ids=(patient,) if patient else ())


def test_trail_verifies_across_rotation_and_old_refs_unseal(vault: Vault) -> None:
    for n in range(5):
        vault.audit.append(_event(n, patient="PVTRAILOLD"))
    before, problem = vault.audit.check(None)
    assert not problem
    out = rotation.rotate(vault)
    assert out.recovery_code
    for n in range(5, 8):
        vault.audit.append(_event(n, patient="PVTRAILNEW"))
    verdict = vault.audit.verify()
    assert verdict.ok, verdict.problem
    _, problem = vault.audit.check(before)  # the watcher's incremental check
    assert not problem
    _, problem = vault.audit.check(None)
    assert not problem
    assert "rotation" not in json.loads(vault.layout.meta.read_text())
    # A fresh process with the new key: verify, and old records' refs still unseal.
    root, key = vault.layout.root, vault.key_path
    assert key is not None
    again = Vault.open(root, key)
    try:
        assert again.audit.verify().ok
        refs = [r.refs.get("patient_ids", []) for r in again.audit.records()
                if r.action == "test.event"]
        assert ["PVTRAILOLD"] in refs and ["PVTRAILNEW"] in refs
        handover = [r for r in again.audit.records() if r.action == "keys.rotated"]
        assert len(handover) == 1 and handover[0].actor_user == "local-admin"
    finally:
        again.close()


def _raw(key: Ed25519PrivateKey) -> str:
    return key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw).hex()


def test_forged_handover_fails_verification(vault: Vault) -> None:
    for n in range(3):
        vault.audit.append(_event(n))
    assert vault.audit.verify().ok
    # An intruder appends a hand-over "from" their own key "to" the vault's key.
    lines = vault.audit.path.read_bytes().splitlines()
    last = json.loads(lines[-1])
    last.pop("sig")
    prev = hashlib.sha256(json.dumps(last, sort_keys=True, separators=(",", ":"))
                          .encode()).hexdigest()
    intruder = Ed25519PrivateKey.generate()
    current = vault.audit.keys.signer
    body = {"v": "pacsvault-audit/1", "seq": last["seq"] + 1, "prev": prev,
            "time": last["time"], "kind": "event", "action": "keys.rotated",
            "outcome": "success", "code": "110113", "ae": "", "address": "", "user": "x",
            "message": "", "detail": {"old_signing_key": _raw(intruder),
                                      "new_signing_key": _raw(current)}}
    digest = hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":"))
                            .encode()).hexdigest()
    body["sig"] = base64.b64encode(intruder.sign(bytes.fromhex(digest))).decode()
    with open(vault.audit.path, "ab") as fh:
        fh.write(json.dumps(body, sort_keys=True, separators=(",", ":")).encode() + b"\n")
    verdict = vault.audit.verify()
    assert not verdict.ok and "forged" in verdict.problem
    # A hand-over naming a key that does not sign what follows fails at that record.
    body["detail"] = {"old_signing_key": _raw(current), "new_signing_key": _raw(intruder)}
    body.pop("sig")
    digest = hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":"))
                            .encode()).hexdigest()
    body["sig"] = base64.b64encode(current.sign(bytes.fromhex(digest))).decode()
    vault.audit.path.write_bytes(b"\n".join(lines) + b"\n" + json.dumps(
        body, sort_keys=True, separators=(",", ":")).encode() + b"\n")
    verdict = vault.audit.verify()
    assert not verdict.ok and "forged hand-over" in verdict.problem


def test_syslog_queue_reencrypted(vault: Vault) -> None:
    """ATNA messages still waiting for the collector survive the rotation, re-encrypted:
    the old key opens none of them, the new one all."""
    from pacsvault.audit import syslog
    from pacsvault.crypto import keys
    from pacsvault.crypto.objects import ObjectFormatError

    where = vault.layout.audit / syslog.QUEUE_DIR_NAME
    old_key = vault._master.derive(keys.PURPOSE_AUDIT_EXPORT, vault.vault_id)
    queue = syslog.SyslogQueue(where, old_key)
    records = [f"<85>1 message {n}".encode() for n in range(3)]
    for record in records:
        queue.put(record)
    queue.close()
    out = rotation.rotate(vault)
    assert out.queued == 3
    new_key = vault._master.derive(keys.PURPOSE_AUDIT_EXPORT, vault.vault_id)
    assert new_key != old_key
    reread = syslog.SyslogQueue(where, new_key)
    stale = syslog.SyslogQueue(where, old_key)
    try:
        entries = reread.entries()
        assert [reread.read(seq, path) for seq, path in entries] == records
        for seq, path in entries:
            with pytest.raises(ObjectFormatError):
                stale.read(seq, path)
    finally:
        reread.close()
        stale.close()


def test_passphrase_protected_key_stays_protected(tmp_path: Path) -> None:
    """The new key file gets the old one's protection (``rewrite_key_file_like``)."""
    from pacsvault.crypto import keys, protection

    key = tmp_path / "keys" / "master.key"
    create(tmp_path / "data", key_file=key)
    words = "granite orbit 47 lantern quietly mosaic"
    plain = Vault.open(tmp_path / "data", key)
    protection.protect_with_passphrase(key, plain._master, plain.vault_id, words)
    plain.close()
    assert protection.protection_of(key) == protection.PASSPHRASE
    vault = Vault.open(tmp_path / "data", key, passphrase=lambda: words)
    try:
        old = vault._master
        rotation.rotate(vault, passphrase=words)
        assert protection.protection_of(key) == protection.PASSPHRASE
        new = protection.load_master(key, vault.vault_id, lambda: words)
        assert new != old and new == vault._master
        meta = json.loads(vault.layout.meta.read_text())
        assert keys.verify_key_check(new, vault.vault_id, meta["key_check"])
    finally:
        vault.close()
    with pytest.raises(keys.VaultKeyError):
        Vault.open(tmp_path / "data", key, passphrase=lambda: "wrong " + words)
