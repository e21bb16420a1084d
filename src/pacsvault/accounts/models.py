"""Tables of user accounts, second factors, API tokens and sign-in throttling.

They extend the index's ``Base``, so they live in the same SQLCipher database as the images'
index: one encrypted file, one key, one backup. Nothing secret is stored in a form that
opens without more than the database: passwords and recovery codes are Argon2id hashes,
API tokens are SHA-256 hashes of 160 random bits, and TOTP secrets (which must be readable to
compute codes) are sealed with AES-256-GCM under a key the caller derives from the master
key, so a database dump or a leaked backup of ``index.db`` plus its key still does not hand
out second factors.

Only portable SQL types are used (no SQLite-specific behaviour is relied on), so the same
models work on PostgreSQL later. Times are stored in UTC through ``UTCDateTime``: SQLite
keeps no time zone, and would otherwise store the wall-clock time of whatever zone the value
carried.
"""

from __future__ import annotations

import contextlib
import datetime as dt
from typing import Any, cast

from sqlalchemy import (
    Boolean,
    DateTime,
    Dialect,
    Engine,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    String,
    Table,
    UniqueConstraint,
)
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Mapped, mapped_column, relationship
from sqlalchemy.types import TypeDecorator

from pacsvault.index.models import Base

ROLES = ("physician", "admin", "auditor")


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


class UTCDateTime(TypeDecorator[dt.datetime]):
    """An aware datetime, stored as UTC and read back as aware UTC on every database.

    Naive values are refused: a naive time in an account table (a lock end, a token expiry)
    would be silently shifted by the machine's time zone.
    """

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: Any, dialect: Dialect) -> dt.datetime | None:
        if value is None:
            return None
        if not isinstance(value, dt.datetime) or value.tzinfo is None:
            raise ValueError("account times must be timezone-aware datetimes")
        return value.astimezone(dt.UTC)

    def process_result_value(self, value: Any, dialect: Dialect) -> dt.datetime | None:
        if value is None:
            return None
        assert isinstance(value, dt.datetime)
        if value.tzinfo is None:
            return value.replace(tzinfo=dt.UTC)
        return value.astimezone(dt.UTC)


class User(Base):
    """A person who signs in to the web interface (and owns API tokens).

    Users are disabled, never deleted: events name them, and the trail must stay
    attributable. ``roles`` is a comma-separated subset of ``ROLES``.
    """

    __tablename__ = "users"
    pk: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(64), unique=True)
    roles: Mapped[str] = mapped_column(String(64))
    password_hash: Mapped[str] = mapped_column(String(255))
    disabled: Mapped[bool] = mapped_column(Boolean, default=False)
    created: Mapped[dt.datetime] = mapped_column(UTCDateTime, default=utcnow)
    password_changed: Mapped[dt.datetime] = mapped_column(UTCDateTime, default=utcnow)
    # Legacy: the old per-account lock (any source locked the account for everyone). No
    # longer read; counters now live in ``sign_in_failures`` (see ``throttle``). Kept
    # because vaults have no migrations; cleared by an unlock or a reset.
    failed_count: Mapped[int] = mapped_column(Integer, default=0)
    last_failed: Mapped[dt.datetime | None] = mapped_column(UTCDateTime)
    locked_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime)
    locked_until: Mapped[dt.datetime | None] = mapped_column(UTCDateTime)
    last_login: Mapped[dt.datetime | None] = mapped_column(UTCDateTime)

    totp: Mapped[TotpSecret | None] = relationship(
        back_populates="user", cascade="all, delete-orphan", uselist=False
    )
    recovery_codes: Mapped[list[RecoveryCode]] = relationship(
        back_populates="user", cascade="all, delete-orphan"
    )
    tokens: Mapped[list[ApiToken]] = relationship(back_populates="user")

    @property
    def role_set(self) -> frozenset[str]:
        return frozenset(r for r in self.roles.split(",") if r)


class TotpSecret(Base):
    """A user's TOTP secret, sealed (nonce ‖ AES-256-GCM, aad bound to the user's pk).

    ``confirmed`` turns true when the user first types a valid code: until then the
    enrolment is pending and can be redone. ``last_step`` is the last RFC 6238 time step
    accepted; a code for that step or an earlier one is refused, so a code seen over a
    shoulder or in a proxy log cannot be used again.
    """

    __tablename__ = "user_totp"
    pk: Mapped[int] = mapped_column(Integer, primary_key=True)
    user_pk: Mapped[int] = mapped_column(ForeignKey("users.pk"), unique=True)
    sealed: Mapped[bytes] = mapped_column(LargeBinary)
    confirmed: Mapped[bool] = mapped_column(Boolean, default=False)
    last_step: Mapped[int | None] = mapped_column(Integer)
    created: Mapped[dt.datetime] = mapped_column(UTCDateTime, default=utcnow)
    user: Mapped[User] = relationship(back_populates="totp")


class RecoveryCode(Base):
    """One single-use recovery code (Argon2id hash); ``used_at`` set when consumed."""

    __tablename__ = "user_recovery_codes"
    pk: Mapped[int] = mapped_column(Integer, primary_key=True)
    user_pk: Mapped[int] = mapped_column(ForeignKey("users.pk"), index=True)
    code_hash: Mapped[str] = mapped_column(String(255))
    created: Mapped[dt.datetime] = mapped_column(UTCDateTime, default=utcnow)
    used_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime)
    user: Mapped[User] = relationship(back_populates="recovery_codes")


class ApiToken(Base):
    """A bearer token ``pv_<token_id>_<secret>``: only SHA-256(secret) is stored.

    The id is not secret (it names the token in lists, events and ``token revoke``); the
    secret has 160 random bits, so a fast hash is enough and keeps each request cheap.
    """

    __tablename__ = "api_tokens"
    pk: Mapped[int] = mapped_column(Integer, primary_key=True)
    token_id: Mapped[str] = mapped_column(String(32), unique=True)
    user_pk: Mapped[int] = mapped_column(ForeignKey("users.pk"), index=True)
    secret_sha256: Mapped[bytes] = mapped_column(LargeBinary(32))
    label: Mapped[str] = mapped_column(String(64), default="")
    created: Mapped[dt.datetime] = mapped_column(UTCDateTime, default=utcnow)
    expires: Mapped[dt.datetime] = mapped_column(UTCDateTime)
    revoked: Mapped[dt.datetime | None] = mapped_column(UTCDateTime)
    last_used: Mapped[dt.datetime | None] = mapped_column(UTCDateTime)
    # Token policy (issue 19, index revision 0005): the network the token may be used
    # from ("" = any allowed by the practice rule), whether it may be used from outside
    # the trusted networks (internet mode only), the address of its last use, and when its
    # idle clock last restarted (creation, a use, or the upgrade that introduced it).
    source_network: Mapped[str] = mapped_column(String(64), default="")
    remote: Mapped[bool] = mapped_column(Boolean, default=False)
    last_address: Mapped[str] = mapped_column(String(64), default="")
    active: Mapped[dt.datetime | None] = mapped_column(UTCDateTime)
    user: Mapped[User] = relationship(back_populates="tokens")


class ApiTokenSource(Base):
    """An address a token has been used from: a use from an address not listed here is an
    audit event (a token copied to another machine shows up in the trail)."""

    __tablename__ = "api_token_sources"
    __table_args__ = (UniqueConstraint("token_pk", "address"),)
    pk: Mapped[int] = mapped_column(Integer, primary_key=True)
    token_pk: Mapped[int] = mapped_column(ForeignKey("api_tokens.pk", ondelete="CASCADE"),
                                          index=True)
    address: Mapped[str] = mapped_column(String(64))
    first_seen: Mapped[dt.datetime] = mapped_column(UTCDateTime)


class LoginAttempt(Base):
    """Failed attempts from one source (an IPv4 address or an IPv6 /64, see ``throttle``).

    Throttling per source as well as per account stops one address from trying one
    password against every account ("password spraying"), which per-account counters miss.
    """

    __tablename__ = "login_attempts"
    pk: Mapped[int] = mapped_column(Integer, primary_key=True)
    address: Mapped[str] = mapped_column(String(64), unique=True)
    failed_count: Mapped[int] = mapped_column(Integer, default=0)
    last_failed: Mapped[dt.datetime | None] = mapped_column(UTCDateTime)
    locked_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime)
    locked_until: Mapped[dt.datetime | None] = mapped_column(UTCDateTime)


class SignInFailure(Base):
    """Failed sign-ins for one user name from one source (see ``throttle``).

    ``name_key`` is an HMAC of the typed name, never the name: the name field often receives
    a password typed one field too early, and unknown names must be counted exactly like
    real ones (or the counters would tell which names exist). ``source`` is
    ``addr:<address>``, ``device:<known source pk>``, or ``new-sources`` (all unfamiliar
    sources of that name together). A row is *blocking* while ``locked_until`` is ahead.
    """

    __tablename__ = "sign_in_failures"
    __table_args__ = (UniqueConstraint("name_key", "source"),)
    pk: Mapped[int] = mapped_column(Integer, primary_key=True)
    name_key: Mapped[str] = mapped_column(String(64))
    source: Mapped[str] = mapped_column(String(80))
    failed_count: Mapped[int] = mapped_column(Integer, default=0)
    last_failed: Mapped[dt.datetime | None] = mapped_column(UTCDateTime)
    locked_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime)
    locked_until: Mapped[dt.datetime | None] = mapped_column(UTCDateTime)


class KnownSource(Base):
    """A browser (``kind`` "device": ``value`` = SHA-256 hex of its device cookie) or an
    address (``kind`` "address": ``value`` = the address key) from which the user completed
    a full sign-in (both factors). Failures elsewhere never block the user there."""

    __tablename__ = "known_sign_in_sources"
    __table_args__ = (UniqueConstraint("user_pk", "kind", "value"),
                      Index("ix_known_sign_in_sources_kind_value", "kind", "value"))
    pk: Mapped[int] = mapped_column(Integer, primary_key=True)
    user_pk: Mapped[int] = mapped_column(ForeignKey("users.pk"), index=True)
    kind: Mapped[str] = mapped_column(String(8))
    value: Mapped[str] = mapped_column(String(64))
    address: Mapped[str] = mapped_column(String(64), default="")  # last used from
    created: Mapped[dt.datetime] = mapped_column(UTCDateTime, default=utcnow)
    last_seen: Mapped[dt.datetime] = mapped_column(UTCDateTime, default=utcnow)


class Passkey(Base):
    """A WebAuthn credential (a passkey or security key): the alternative second factor.

    Only public data is kept: the credential id and COSE public key the authenticator gave
    at registration, its signature counter (a clone shows up as a counter that does not
    increase) and the transports the browser reported (a hint for the next sign-in).
    The flows are in ``accounts.passkeys``.
    """

    __tablename__ = "passkeys"
    pk: Mapped[int] = mapped_column(Integer, primary_key=True)
    user_pk: Mapped[int] = mapped_column(ForeignKey("users.pk"), index=True)
    credential_id: Mapped[bytes] = mapped_column(LargeBinary(1023), unique=True)
    public_key: Mapped[bytes] = mapped_column(LargeBinary)
    sign_count: Mapped[int] = mapped_column(Integer, default=0)
    transports: Mapped[str] = mapped_column(String(128), default="")
    label: Mapped[str] = mapped_column(String(64), default="")
    created: Mapped[dt.datetime] = mapped_column(UTCDateTime, default=utcnow)
    last_used: Mapped[dt.datetime | None] = mapped_column(UTCDateTime)


class UserPreference(Base):
    """A user's own settings for the web pages (for now the language: "fr", "en"; no row
    means "as the browser asks"). A table of its own rather than columns on ``users``:
    vaults have no migrations, and ``create_all`` adds a missing table, never a column."""

    __tablename__ = "user_preferences"
    pk: Mapped[int] = mapped_column(Integer, primary_key=True)
    user_pk: Mapped[int] = mapped_column(ForeignKey("users.pk"), unique=True)
    language: Mapped[str] = mapped_column(String(8), default="")
    updated: Mapped[dt.datetime] = mapped_column(UTCDateTime, default=utcnow)


ACCOUNT_TABLES: tuple[Table, ...] = tuple(
    cast(Table, model.__table__)
    for model in (User, TotpSecret, RecoveryCode, ApiToken, LoginAttempt, Passkey,
                  UserPreference, SignInFailure, KnownSource, ApiTokenSource)
)
# Tables added after vaults existed: ``ensure_tables`` creates them when a vault is opened.
LATER_TABLES: tuple[Table, ...] = tuple(
    cast(Table, model.__table__) for model in (SignInFailure, KnownSource))


def create_tables(engine: Engine) -> None:
    """Create the account tables if missing: a vault made before accounts existed gets them
    on open (``open_index(create=True)`` already creates them once this module is imported)."""
    Base.metadata.create_all(engine, tables=list(ACCOUNT_TABLES))


def ensure_tables(engine: Engine) -> None:
    """Create the tables that ``LATER_TABLES`` lists if missing (vaults have no migrations
    and are opened without ``create_all``); idempotent, harmless if another process does it
    at the same moment."""
    for table in LATER_TABLES:
        with contextlib.suppress(OperationalError):  # made by another process meanwhile
            table.create(engine, checkfirst=True)
