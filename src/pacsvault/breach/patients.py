"""The list of patients to inform, encrypted to a recipient the DPO chooses.

Why a separate export and never in clear: the notification draft and the register carry
counts only; the names and birth dates (needed to print the letters) are the very data of
the breach. The list is built in memory and encrypted with age (``pyrage``: a well-kept
implementation, no crypto written here) to an X25519 recipient (``age1...``, the public
key of the DPO's own identity) or to a passphrase (read from a 0600 file or a prompt by
the caller, never from argv). Only the ciphertext reaches a disk.
"""

from __future__ import annotations

import csv
import io

from sqlalchemy import select

from pacsvault.audit.events import AuditEvent, EventCode, Outcome
from pacsvault.breach.model import Breach, BreachError
from pacsvault.index.models import Patient
from pacsvault.vault import Vault

HEADER = ("patient_id", "name", "birth_date", "studies", "instances", "accesses",
          "left_readable", "ciphertext_only")


def patient_rows(vault: Vault, breach: Breach) -> list[tuple[str, ...]]:
    """One row per patient of the scope, with what the index knows of them."""
    if breach.scope is None:
        raise BreachError(f"breach {breach.id} has no scope computed from the trail")
    wanted = [p.patient_id for p in breach.scope.patients]
    known: dict[str, tuple[str, str]] = {}
    with vault.sessions() as session:
        for start in range(0, len(wanted), 500):
            for row in session.scalars(select(Patient).where(
                    Patient.patient_id.in_(wanted[start:start + 500]))):
                known.setdefault(row.patient_id, (row.name, row.birth_date))
    rows: list[tuple[str, ...]] = []
    for p in breach.scope.patients:
        name, birth = known.get(p.patient_id, ("", ""))
        rows.append((p.patient_id, name, birth, str(p.studies), str(p.instances),
                     str(p.accesses), "yes" if p.readable else "no",
                     "yes" if p.ciphertext_only else "no"))
    return rows


def _csv(rows: list[tuple[str, ...]]) -> bytes:
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(HEADER)
    writer.writerows(rows)
    return out.getvalue().encode("utf-8")


def encrypt_to_recipient(plain: bytes, recipient: str) -> bytes:
    import pyrage  # here, not at import: every serving process imports this module (issue 17)

    try:
        key = pyrage.x25519.Recipient.from_str(recipient.strip())
    except Exception:
        raise BreachError("not an age X25519 recipient (age1...)",
                          "ce n’est pas un destinataire age X25519 (age1…)") from None
    return bytes(pyrage.encrypt(plain, [key]))


def encrypt_to_passphrase(plain: bytes, passphrase: str) -> bytes:
    if len(passphrase) < 12:
        raise BreachError("the passphrase must have at least 12 characters")
    import pyrage

    return bytes(pyrage.passphrase.encrypt(plain, passphrase))


def export(vault: Vault, breach: Breach, *, recipient: str = "", passphrase: str = "",
           by: str = "", address: str = "") -> bytes:
    """The encrypted CSV (age format) for exactly one of ``recipient`` / ``passphrase``.

    The list names patients: its export is an access to their data, recorded (references
    sealed in the trail, like every export) before the bytes exist; no record, no list."""
    if bool(recipient) == bool(passphrase):
        raise BreachError("give either an age recipient or a passphrase")
    rows = patient_rows(vault, breach)
    vault.recorder.emit(AuditEvent(
        action="breach.patients.export", outcome=Outcome.SUCCESS, code=EventCode.EXPORT,
        actor_user=by, actor_address=address, patient_ids=tuple(r[0] for r in rows),
        detail={"breach": breach.id, "patients": len(rows),
                "to": "age recipient" if recipient else "passphrase"},
    ), required=True)
    plain = _csv(rows)
    if recipient:
        return encrypt_to_recipient(plain, recipient)
    return encrypt_to_passphrase(plain, passphrase)
