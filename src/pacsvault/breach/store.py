"""The breach register: every version of every record, encrypted, never rewritten.

Why index rows (``breach_versions``, ``index.deployment_state``; files under
``DATA/breaches`` before issue 16): several instances share one index, each with its own
data directory, and a DPO signed in on any of them must see the whole register. Its history
must be kept whole (art. 33(5): the authority checks the register, including what it said
before the facts were established), and a version written once is never changed: the
unique (breach id, version) lets one of two concurrent writers win and tells the other.
Each version is AES-256-GCM under a random key, the deployment's named secret
``breach-register`` (``Vault.named_secret``: sealed in the index, the same on every
instance), with the breach id and the version number as associated data (a version cannot
be swapped for another). Free text about what happened to patients' data is never stored in
clear, on either backend. Every change is also an audit event (``breach.opened``,
``breach.updated``...) naming the breach id and the version, never patient data.

A register left in ``DATA/breaches`` by an older version is imported on first use (each
version as it was, re-encrypted only if this directory's key was not the deployment's),
then the folder is renamed ``breaches.imported`` (kept, never read again).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import logging
import os
import secrets
from collections.abc import Callable
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError

from pacsvault.audit.events import AuditEvent, EventCode, Outcome
from pacsvault.breach.model import Breach, BreachError, Step, check_id, new_id
from pacsvault.index.deployment_state import BreachVersionRow
from pacsvault.vault import Vault

FORMAT = "pacsvault-breach/1"
SECRET_NAME = "breach-register"  # noqa: S105 (a name, not a secret)
DIR_NAME = "breaches"  # the register's folder before issue 16 (imported on first use)
IMPORTED_NAME = "breaches.imported"
_SUFFIX = ".enc"
log = logging.getLogger("pacsvault.breach")


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


class BreachRegister:
    """Open, change and read breach records of one vault."""

    def __init__(self, vault: Vault, *, clock: Callable[[], dt.datetime] = _now) -> None:
        self._vault = vault
        self._clock = clock
        self.legacy = vault.layout.root / DIR_NAME
        if self.legacy.is_dir():  # another process of this directory may be importing it:
            with contextlib.suppress(FileNotFoundError):  # it finishes the import
                import_files(vault, self.legacy)

    def _key(self) -> AESGCM:
        return AESGCM(self._vault.named_secret(SECRET_NAME))

    @staticmethod
    def _aad(breach_id: str, version: int) -> bytes:
        return f"{FORMAT}:{breach_id}:{version}".encode("ascii")

    # --- reading -----------------------------------------------------------------------

    def versions(self, breach_id: str) -> list[int]:
        with self._vault.sessions() as session:
            found = session.scalars(select(BreachVersionRow.version).where(
                BreachVersionRow.breach_id == check_id(breach_id)))
            return sorted(found)

    def get(self, breach_id: str, version: int | None = None) -> Breach:
        versions = self.versions(breach_id)
        if not versions:
            raise BreachError(f"no breach {breach_id}")
        number = versions[-1] if version is None else version
        if number not in versions:
            raise BreachError(f"breach {breach_id} has no version {number}")
        with self._vault.sessions() as session:
            blob = session.scalar(select(BreachVersionRow.blob).where(
                BreachVersionRow.breach_id == breach_id, BreachVersionRow.version == number))
        if blob is None:
            raise BreachError(f"breach {breach_id} has no version {number}")
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
        with self._vault.sessions() as session:
            found = session.scalars(select(BreachVersionRow.breach_id).distinct())
            return sorted(i for i in found if i.startswith("BR-"))

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
        try:  # never overwrite a version: two writers, one wins, the other is told
            with self._vault.sessions.begin() as session:
                session.add(BreachVersionRow(breach_id=record.id, version=version, blob=blob))
        except IntegrityError:
            raise BreachError(f"breach {record.id} was changed meanwhile (version "
                              f"{version} exists): read it again",
                              f"la fiche {record.id} a été modifiée entre-temps (la version "
                              f"{version} existe) : rechargez-la") from None
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


def _reopen(vault: Vault, breach_id: str, version: int, blob: bytes) -> bytes | None:
    """``blob`` under the deployment's key: as is if it opens with it, re-encrypted if it
    opens with this directory's own ``vault.json`` key (written before the key moved to
    the index), None if neither opens it."""
    aad = BreachRegister._aad(breach_id, version)
    keys = [vault.named_secret(SECRET_NAME)]
    local = vault.file_secret(SECRET_NAME)
    if local is not None and local != keys[0]:
        keys.append(local)
    for n, key in enumerate(keys):
        try:
            plain = AESGCM(key).decrypt(blob[:12], blob[12:], aad)
        except InvalidTag:
            continue
        if n == 0:
            return blob
        nonce = secrets.token_bytes(12)
        return nonce + AESGCM(keys[0]).encrypt(nonce, plain, aad)
    return None


def import_files(vault: Vault, folder: Path) -> int:
    """Move a register kept as files (before issue 16) into the index; answer how many
    versions were added. Idempotent: a version already in the index stays as it is (two
    directories holding the same history import it once). The folder is then renamed
    ``breaches.imported``; a file that does not open stops the import with the folder left
    in place (nothing lost, told at every use)."""
    added = kept = 0
    for entry in sorted(folder.iterdir()):
        if not entry.is_dir() or not entry.name.startswith("BR-"):
            continue
        breach_id = check_id(entry.name)
        for path in sorted(entry.iterdir()):
            name = path.name
            if not (name.startswith("v") and name.endswith(_SUFFIX) and name[1:-4].isdigit()):
                continue
            version = int(name[1:-4])
            blob = _reopen(vault, breach_id, version, path.read_bytes())
            if blob is None:
                raise BreachError(f"breach {breach_id} version {version} in {folder} does not "
                                  "open with this vault's keys; it was not imported")
            try:
                with vault.sessions.begin() as session:
                    session.add(BreachVersionRow(breach_id=breach_id, version=version,
                                                 blob=blob))
                added += 1
            except IntegrityError:
                kept += 1  # already there (imported by another instance, or before)
    target = folder.with_name(IMPORTED_NAME)
    if target.exists():  # a second old folder (a restored backup): keep both
        target = folder.with_name(f"{IMPORTED_NAME}-{int(dt.datetime.now().timestamp())}")
    with contextlib.suppress(FileNotFoundError):  # another process of this directory
        os.replace(folder, target)
    log.info("breach register: %d version(s) imported into the index, %d already there",
             added, kept)
    return added
