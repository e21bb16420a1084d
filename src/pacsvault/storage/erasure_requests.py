"""Patient erasure requests and what an erasure reports: the ``erasure_requests`` table,
the checks on what an administrator types, the subject digest, and the result types.

Why apart from ``erasure``: these are the facts both the confirmation flow and the pages
(``web/admin_erasure``, ``cli/patients``) share; the rules themselves (two administrators,
legal bases, subject digest) are explained in ``storage/erasure.py``'s docstring.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import hmac
import unicodedata
from dataclasses import dataclass
from typing import Any, cast

from sqlalchemy import Boolean, DateTime, Integer, String, Table, Text
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Mapped, mapped_column

from pacsvault.index.models import Base, utcnow
from pacsvault.index.sealing import Sealed
from pacsvault.storage import retention
from pacsvault.storage.removal import RemovalError

FORGET_COMMAND = "erasure.forget"  # control channel: the server drops its caches
SUBJECT_SECRET = "erasure-subject"  # noqa: S105 (the secret's name)
REQUEST_DAYS = 7  # a request not confirmed within a week lapses
MAX_ID = 64

# Legal bases (code -> English label; the admin page translates them). Only
# ``retention-ended`` needs the retention period to be over; the others are the reasons
# GDPR art. 17 gives to erase earlier, each recorded with the admin's free text.
RETENTION_ENDED = "retention-ended"
LEGAL_BASES: dict[str, str] = {
    RETENTION_ENDED: "retention period over (CSP R1112-7)",
    "patient-request": "patient's request, no legal obligation to keep (art. 17(1)(a-c), "
                       "17(3) does not apply)",
    "wrong-patient": "images of another person or sent in error (no lawful basis)",
    "unlawful": "unlawfully processed (art. 17(1)(d))",
    "legal-obligation": "legal obligation or court order to erase (art. 17(1)(e))",
}


class ErasureError(RemovalError):
    """An erasure that cannot be done (message user-facing, without patient data)."""


class RetentionRunning(ErasureError):
    pass


class ErasureRequest(Base):
    """An erasure asked by one administrator, waiting for a second one (or done).

    ``patients`` is JSON ``[[patient pk, subject digest], ...]``; once done the pks are
    dropped (only digests remain). ``reason`` (free text) stays in the encrypted index.
    """

    __tablename__ = "erasure_requests"
    __table_args__ = ({"sqlite_autoincrement": True},)
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    created: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    requested_by: Mapped[str] = mapped_column(String(64))
    address: Mapped[str] = mapped_column(String(64), default="")
    kind: Mapped[str] = mapped_column(String(16), default="patient")  # or "expired"
    patients: Mapped[str] = mapped_column(Text, default="[]")
    count: Mapped[int] = mapped_column(Integer, default=0)
    # free text an administrator typed: it may name the patient (sealed on PostgreSQL)
    reason: Mapped[str] = mapped_column(Sealed("erasure_requests.reason"), default="")
    legal_basis: Mapped[str] = mapped_column(String(32), default="")
    retention_over: Mapped[bool] = mapped_column(Boolean, default=False)
    status: Mapped[str] = mapped_column(String(16), default="pending")
    decided_by: Mapped[str] = mapped_column(String(64), default="")
    decided: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True))
    mode: Mapped[str] = mapped_column(String(16), default="two-admin")  # or "solo"
    records: Mapped[str] = mapped_column(Text, default="[]")  # object_actions ids


_requests = cast(Table, ErasureRequest.__table__)


def ensure_table(engine: Any) -> None:
    """Make the table if missing (tests' bare engines; a vault's index has it from its
    schema baseline, ``index.schema``, so no request path calls this any more)."""
    with contextlib.suppress(OperationalError):  # made by another process meanwhile
        _requests.create(engine, checkfirst=True)


def check_patient_id(value: str) -> str:
    value = value.strip()
    if not value or len(value) > MAX_ID or any(not c.isprintable() for c in value):
        raise ErasureError("a patient ID is 1 to 64 printable characters")
    return value


def check_issuer(value: str) -> str:
    value = value.strip()
    if len(value) > MAX_ID or any(not c.isprintable() for c in value):
        raise ErasureError("an issuer is at most 64 printable characters")
    return value


def check_basis(value: str) -> str:
    if value not in LEGAL_BASES:
        raise ErasureError("the legal basis is one of: " + ", ".join(LEGAL_BASES))
    return value


def subject_digest(secret: bytes, patient_id: str, issuer: str) -> str:
    """The patient's pseudonymous digest (see the module docstring for why)."""
    message = unicodedata.normalize("NFC", f"{issuer}\x00{patient_id}").encode()
    return hmac.new(secret, message, hashlib.sha256).hexdigest()


@dataclass(frozen=True)
class Target:
    """A patient as an administrator sees it before erasing (screen only, never logs)."""

    pk: int
    patient_id: str
    issuer: str
    name: str
    subject: str
    studies: int
    series: int
    instances: int
    keys: tuple[str, ...]
    retention: retention.PatientRetention

    def retention_over(self, today: dt.date | None = None) -> bool:
        return self.retention.expired(today or dt.datetime.now(dt.UTC).date())


@dataclass(frozen=True)
class Erased:
    record: int  # object_actions id
    studies: int
    series: int
    instances: int
    keys_destroyed: int
    files_deleted: int


@dataclass(frozen=True)
class ErasureResult:
    """The result of a confirmed request or a solo erasure."""

    request: int
    erased: tuple[Erased, ...]
    skipped: int  # patients gone or changed since the request
    backups: str  # what the backup hook said ("" when there is no target)

    @property
    def instances(self) -> int:
        return sum(e.instances for e in self.erased)


@dataclass(frozen=True)
class RequestInfo:
    id: int
    created: dt.datetime
    requested_by: str
    kind: str
    count: int
    reason: str
    legal_basis: str
    status: str
    decided_by: str
    decided: dt.datetime | None
    mode: str

