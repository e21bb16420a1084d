"""Rows that several pacsvault processes sharing one index read and write (issue 16, part 3).

Why in the index: everything that used to live in one process's memory (browser sessions
with their CSRF token, pending sign-ins, WebAuthn challenges, which alert was sent) must be
the same for every instance behind a load balancer, and the index is the one store they all
share (SQLCipher embedded, PostgreSQL when scaled out). Only portable SQLAlchemy is used
here (no SQLite-only SQL, no PRAGMA), so the same code runs on both.

Times are integers: microseconds since the Unix epoch (UTC). They compare exactly on every
database and carry no time zone to get wrong.

Nothing here opens without more than a database dump: session and ticket ids are stored as
SHA-256 digests, and what a session or ticket must keep secret (its CSRF token, the sign-in
ticket, recovery codes shown once, a known-device cookie) is sealed with AES-256-GCM under
a key derived from the id itself (``seal``/``unseal``), which only the browser holds.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import os
from typing import Any, cast

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from sqlalchemy import (
    BigInteger,
    Boolean,
    CursorResult,
    Index,
    Integer,
    LargeBinary,
    String,
    Text,
    delete,
    update,
)
from sqlalchemy.exc import IntegrityError, SQLAlchemyError
from sqlalchemy.orm import Mapped, Session, mapped_column, sessionmaker

from pacsvault.index.models import Base

_EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)
_NONCE = 12


def to_micros(when: dt.datetime) -> int:
    """An aware datetime as microseconds since the epoch (exact, comparable everywhere)."""
    if when.tzinfo is None:
        raise ValueError("shared-state times must be timezone-aware")
    delta = when - _EPOCH
    return (delta.days * 86_400 + delta.seconds) * 1_000_000 + delta.microseconds


def from_micros(value: int) -> dt.datetime:
    return _EPOCH + dt.timedelta(microseconds=int(value))


def digest(secret: str) -> bytes:
    """The stored form of a bearer secret (session id, ticket): its SHA-256."""
    return hashlib.sha256(secret.encode("utf-8", "replace")).digest()


def box_key(secret: str, purpose: bytes) -> bytes:
    """The AES-256-GCM key sealing a row's secrets, derived from the bearer secret that
    names the row: whoever holds the row but not the secret reads nothing."""
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None,
                info=b"pacsvault/v1/shared-state/" + purpose).derive(
        secret.encode("utf-8", "replace"))


def seal(key: bytes, plain: bytes, aad: bytes) -> bytes:
    nonce = os.urandom(_NONCE)
    return nonce + AESGCM(key).encrypt(nonce, plain, aad)


def unseal(key: bytes, sealed: bytes, aad: bytes) -> bytes | None:
    """The plaintext, or None when the box does not open (wrong key, altered row)."""
    if len(sealed) < _NONCE + 16:
        return None
    try:
        return AESGCM(key).decrypt(sealed[:_NONCE], sealed[_NONCE:], aad)
    except InvalidTag:
        return None


class WebSessionRow(Base):
    """A browser session (``web.sessions``): stage, owner, timers; its secrets sealed."""

    __tablename__ = "web_sessions"
    __table_args__ = (Index("ix_web_sessions_stage_created", "stage", "created"),)
    key: Mapped[bytes] = mapped_column(LargeBinary(32), primary_key=True)  # SHA-256 of id
    stage: Mapped[str] = mapped_column(String(16))
    user: Mapped[str] = mapped_column(String(64), default="", index=True)
    address: Mapped[str] = mapped_column(String(64), default="")
    created: Mapped[int] = mapped_column(BigInteger)
    last_seen: Mapped[int] = mapped_column(BigInteger)
    enrolled: Mapped[bool] = mapped_column(Boolean, default=False)
    password_changed: Mapped[int | None] = mapped_column(BigInteger)
    next: Mapped[str] = mapped_column(Text, default="")
    # AES-GCM under box_key(id): JSON {csrf, ticket, fresh_codes}
    sealed: Mapped[bytes] = mapped_column(LargeBinary)


class SignInTicketRow(Base):
    """A sign-in whose password was right, waiting for its second factor
    (``accounts.core``)."""

    __tablename__ = "sign_in_tickets"
    key: Mapped[bytes] = mapped_column(LargeBinary(32), primary_key=True)  # SHA-256
    user_pk: Mapped[int] = mapped_column(Integer)
    name: Mapped[str] = mapped_column(String(64), index=True)
    address: Mapped[str] = mapped_column(String(64))  # the address key it was given to
    expires: Mapped[int] = mapped_column(BigInteger, index=True)
    name_key: Mapped[str] = mapped_column(String(64), default="")
    source_address: Mapped[str] = mapped_column(String(64), default="")
    source_key: Mapped[str] = mapped_column(String(80), default="")
    familiar: Mapped[bool] = mapped_column(Boolean, default=False)
    known_device: Mapped[bool] = mapped_column(Boolean, default=False)
    # AES-GCM under box_key(ticket): the known-device cookie presented ("" when none)
    sealed: Mapped[bytes] = mapped_column(LargeBinary)


class WebAuthnChallengeRow(Base):
    """A WebAuthn challenge (``accounts.passkeys``): single use, short-lived."""

    __tablename__ = "webauthn_challenges"
    key: Mapped[bytes] = mapped_column(LargeBinary(32), primary_key=True)  # SHA-256
    challenge: Mapped[bytes] = mapped_column(LargeBinary(64))
    rp_id: Mapped[str] = mapped_column(String(255))
    rp_origin: Mapped[str] = mapped_column(String(300))
    user_pk: Mapped[int] = mapped_column(Integer)
    expires: Mapped[int] = mapped_column(BigInteger, index=True)


class AlertNoticeRow(Base):
    """Which alert's first notice was sent, until when (``audit.alerts``): one notice per
    deployment, not one per instance."""

    __tablename__ = "alert_notices"
    rule: Mapped[str] = mapped_column(String(64), primary_key=True)
    subject: Mapped[str] = mapped_column(String(255), primary_key=True)
    until: Mapped[int] = mapped_column(BigInteger)


SHARED_TABLES = tuple(model.__table__ for model in (
    WebSessionRow, SignInTicketRow, WebAuthnChallengeRow, AlertNoticeRow))


def claim_notice(sessions: sessionmaker[Session], rule: str, subject: str,
                 now: dt.datetime, until: dt.datetime) -> bool:
    """Whether this instance sends the first notice of (``rule``, ``subject``): True
    unless another instance sharing the index sent one whose grouping window has not
    ended. Claims the window until ``until``. When the index cannot answer, True: an
    alert sent twice is better than one never sent."""
    subject = subject[:255]
    try:
        with sessions.begin() as s:
            taken = cast(CursorResult[Any], s.execute(
                update(AlertNoticeRow)
                .where(AlertNoticeRow.rule == rule, AlertNoticeRow.subject == subject,
                       AlertNoticeRow.until <= to_micros(now))
                .values(until=to_micros(until))
                .execution_options(synchronize_session=False)))
            if taken.rowcount == 1:
                return True
            if s.get(AlertNoticeRow, (rule, subject)) is not None:
                return False  # another instance's notice, still in its window
            s.execute(delete(AlertNoticeRow).where(  # windows over: nothing to keep
                AlertNoticeRow.until <= to_micros(now)))
            s.add(AlertNoticeRow(rule=rule, subject=subject, until=to_micros(until)))
        return True
    except IntegrityError:  # another instance claimed it at this very moment
        return False
    except SQLAlchemyError:
        return True
