"""The breach register on disk: every version of every record, encrypted, never rewritten.

Why files under ``DATA/breaches`` and not index rows: the register is small, its history
must be kept whole (art. 33(5): the authority checks the register, including what it said
before the facts were established), and a version written once is never changed (O_EXCL).
Each version is AES-256-GCM under a random key kept in ``vault.json`` wrapped by the
master key (``Vault.named_secret``: key rotation re-wraps it, so old versions stay
readable), with the breach id and the version number as associated data (a version cannot
be swapped for another). Free text about what happened to patients' data is never on disk
in clear. Every change is also an audit event (``breach.opened``, ``breach.updated``...)
naming the breach id and the version, never patient data.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import secrets
from collections.abc import Callable
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from pacsvault.audit.events import AuditEvent, EventCode, Outcome
from pacsvault.breach.model import Breach, BreachError, Step, check_id, new_id
from pacsvault.fsutil import fsync_dir, write_durably
from pacsvault.vault import Vault

FORMAT = "pacsvault-breach/1"
SECRET_NAME = "breach-register"  # noqa: S105 (a name, not a secret)
DIR_NAME = "breaches"
_SUFFIX = ".enc"


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


class BreachRegister:
    """Open, change and read breach records of one vault."""

    def __init__(self, vault: Vault, *, clock: Callable[[], dt.datetime] = _now) -> None:
        self._vault = vault
        self._clock = clock
        self.root = vault.layout.root / DIR_NAME

    def _key(self) -> AESGCM:
        return AESGCM(self._vault.named_secret(SECRET_NAME))

    @staticmethod
    def _aad(breach_id: str, version: int) -> bytes:
        return f"{FORMAT}:{breach_id}:{version}".encode("ascii")

    def _path(self, breach_id: str, version: int) -> Path:
        return self.root / breach_id / f"v{version:06d}{_SUFFIX}"

    # --- reading -----------------------------------------------------------------------

    def versions(self, breach_id: str) -> list[int]:
        folder = self.root / check_id(breach_id)
        if not folder.is_dir():
            return []
        out = []
        for entry in folder.iterdir():
            name = entry.name
            if name.startswith("v") and name.endswith(_SUFFIX) and name[1:-4].isdigit():
                out.append(int(name[1:-4]))
        return sorted(out)

    def get(self, breach_id: str, version: int | None = None) -> Breach:
        versions = self.versions(breach_id)
        if not versions:
            raise BreachError(f"no breach {breach_id}")
        number = versions[-1] if version is None else version
        if number not in versions:
            raise BreachError(f"breach {breach_id} has no version {number}")
        blob = self._path(breach_id, number).read_bytes()
        try:
            plain = self._key().decrypt(blob[:12], blob[12:], self._aad(breach_id, number))
        except InvalidTag:
            raise BreachError(f"breach {breach_id} version {number} does not open with "
                              "this vault's key (damaged or from another vault)") from None
        record = Breach.from_json(json.loads(plain))
        record.version = number
        return record

    def history(self, breach_id: str) -> list[Breach]:
        return [self.get(breach_id, n) for n in self.versions(breach_id)]

    def ids(self) -> list[str]:
        if not self.root.is_dir():
            return []
        return sorted(p.name for p in self.root.iterdir() if p.is_dir() and
                      p.name.startswith("BR-"))

    def all(self) -> list[Breach]:
        return [self.get(i) for i in self.ids() if self.versions(i)]

    # --- writing -----------------------------------------------------------------------

    def open(self, record: Breach, *, by: str, address: str = "") -> Breach:
        now = self._clock()
        record.id = record.id or new_id(now)
        record.created = now.isoformat(timespec="seconds")
        record.steps.insert(0, Step(record.created, "opened", by))
        return self._write(record, 1, by, address, "breach.opened")

    def update(self, breach_id: str, change: Callable[[Breach], None], *, by: str,
               address: str = "", action: str = "breach.updated",
               step: str = "updated", force: bool = False) -> Breach:
        """Apply ``change`` to the latest version and keep the result as a new one (with
        ``force``, even when nothing but the dated step changes)."""
        current = self.get(breach_id)
        before = current.to_json()
        change(current)
        if current.to_json() == before and not force:
            return current  # nothing changed: no version, no event
        now = self._clock().isoformat(timespec="seconds")
        if before.get("decision") != current.decision and current.decision:
            current.decided_at = current.decided_at or now
            step = f"{step}; decision: {current.decision}"
        current.steps.append(Step(now, step, by))
        return self._write(current, current.version + 1, by, address, action)

    def _write(self, record: Breach, version: int, by: str, address: str,
               action: str) -> Breach:
        record.version = version
        record.updated = self._clock().isoformat(timespec="seconds")
        record.updated_by = by
        record.validate()
        plain = json.dumps(record.to_json(), ensure_ascii=False, sort_keys=True).encode()
        nonce = secrets.token_bytes(12)
        blob = nonce + self._key().encrypt(nonce, plain, self._aad(record.id, version))
        folder = self.root / record.id
        for directory in (self.root, folder):
            directory.mkdir(mode=0o700, exist_ok=True)
        path = self._path(record.id, version)
        try:  # never overwrite a version: two writers, one wins, the other is told
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            raise BreachError(f"breach {record.id} was changed meanwhile (version "
                              f"{version} exists): read it again",
                              f"la fiche {record.id} a été modifiée entre-temps (la version "
                              f"{version} existe) : rechargez-la") from None
        try:
            write_durably(fd, [blob])
        finally:
            os.close(fd)
        fsync_dir(folder)
        self._vault.recorder.emit(AuditEvent(
            action=action, outcome=Outcome.SUCCESS, code=EventCode.SECURITY_ALERT,
            actor_user=by, actor_address=address,
            detail={"breach": record.id, "version": version, "decision": record.decision,
                    "notifications": len(record.notifications)},
        ), required=True)
        return record

    def note_step(self, breach_id: str, what: str, *, by: str = "pacsvault",
                  action: str = "breach.step") -> Breach:
        """A dated step that changes nothing else (a clock alert sent, a document made)."""
        return self.update(breach_id, lambda record: None, by=by, action=action, step=what,
                           force=True)
