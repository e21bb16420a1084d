"""API tokens for viewer applications and scripts: ``pv_<id>_<secret>``.

Why this shape: the ``pv_`` prefix lets secret scanners and people recognise a pacsvault
token pasted where it should not be; the id (16 hex characters, not secret) names the token
in ``token list``, ``token revoke`` and the audit trail without revealing it; the secret is
32 characters of base32 = 160 random bits (>= 128 asked), so brute force is out of reach and
a plain SHA-256 of it is a sufficient stored form: unlike a password it needs no slow hash,
and every DICOMweb request can afford the check.

Only SHA-256(secret) is stored; the token is printed once at creation. Checking a token
looks the row up by id, then compares the hashes with ``hmac.compare_digest``; an unknown id
is compared against a dummy hash so that both take the same time.

Tokens always expire (``parse_expiry``: "30d", "12h", "90m", "2w"; never more than 365 days,
and the service holds them to ``[tokens] max_days``, 90 by default), die after a stretch
without use (``idle``: the ``active`` time restarts at every use), can be revoked, and act
with the roles their user has *at the time of the request*, so removing a role or disabling
the user takes effect on the user's tokens at once.

A lifetime beyond the limit is *refused*, not capped: an administrator who asked for 400
days and silently got 90 would learn it when a script stops working months later; a
refusal at creation says it while they are at the keyboard.
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import hmac
import re
import secrets
from dataclasses import dataclass

from sqlalchemy import select
from sqlalchemy.orm import Session

from pacsvault.accounts.models import ApiToken, User
from pacsvault.config.tokens import CEILING_DAYS

TOKEN_PREFIX = "pv"  # noqa: S105 (a public prefix, not a secret)
ID_BYTES = 8
SECRET_BYTES = 20
DEFAULT_EXPIRY = dt.timedelta(days=30)
MAX_EXPIRY = dt.timedelta(days=CEILING_DAYS)
MIN_EXPIRY = dt.timedelta(minutes=1)

_TOKEN_RE = re.compile(r"^pv_([0-9a-f]{16})_([a-z2-7]{32})$")
_EXPIRY_RE = re.compile(r"^\s*(\d{1,6})\s*([mhdw])\s*$", re.IGNORECASE)
_UNITS = {"m": "minutes", "h": "hours", "d": "days", "w": "weeks"}
_DUMMY = hashlib.sha256(b"pacsvault: no such token").digest()


class TokenError(Exception):
    """A token request that cannot be honoured (message is user-facing)."""


def lifetime_error(limit_days: int) -> str:
    return (f"a token may last at most {limit_days} days on this archive ([tokens] max_days "
            f"in the settings, never more than {CEILING_DAYS}); ask for {limit_days}d or "
            "less")


def parse_expiry(text: str) -> dt.timedelta:
    """``"30d"`` → 30 days; minutes (m), hours (h), days (d), weeks (w); 1 min to 365 days
    (the archive's own ``max_days`` is checked where the settings are known)."""
    match = _EXPIRY_RE.match(text)
    if not match:
        raise TokenError(f"invalid expiry {text!r}: use a number and a unit, e.g. 30d, 12h, "
                         "90m or 2w")
    delta = dt.timedelta(**{_UNITS[match.group(2).lower()]: int(match.group(1))})
    if delta < MIN_EXPIRY:
        raise TokenError("a token must last at least 1 minute")
    if delta > MAX_EXPIRY:
        raise TokenError(f"a token may last at most {CEILING_DAYS} days, and at most "
                         "[tokens] max_days on this archive (90 days by default)")
    return delta


def hash_secret(secret: str) -> bytes:
    return hashlib.sha256(secret.encode("ascii")).digest()


def new_token() -> tuple[str, str, str]:
    """(token id, secret, full token)."""
    token_id = secrets.token_hex(ID_BYTES)
    secret = base64.b32encode(secrets.token_bytes(SECRET_BYTES)).decode("ascii").lower()
    return token_id, secret, f"{TOKEN_PREFIX}_{token_id}_{secret}"


def split_token(token: str) -> tuple[str, str] | None:
    """(id, secret) of a well-formed token, else None."""
    match = _TOKEN_RE.match(token.strip())
    return (match.group(1), match.group(2)) if match else None


def token_id_of(token: str) -> str:
    parts = split_token(token)
    return parts[0] if parts else ""


@dataclass(frozen=True)
class IssuedToken:
    token: str  # shown once, never stored
    token_id: str
    user: str
    expires: dt.datetime


@dataclass(frozen=True)
class TokenIdentity:
    """Who a valid token acts for, with the user's current roles."""

    user: str
    roles: frozenset[str]
    token_id: str


@dataclass(frozen=True)
class TokenLookup:
    """``reason``: "" (valid), "malformed", "unknown", "bad-secret", "expired", "idle"
    (unused too long), "revoked", "disabled". ``row`` is set whenever the id matched (for
    events and last_used)."""

    identity: TokenIdentity | None
    reason: str
    row: ApiToken | None = None

    @property
    def ok(self) -> bool:
        return self.identity is not None

    @property
    def secret_matched(self) -> bool:
        """The caller proved possession of a real token (even an expired one): not a guess."""
        return self.reason in ("", "expired", "idle", "revoked", "disabled")


def create_token(session: Session, user: User, lifetime: dt.timedelta, now: dt.datetime,
                 label: str = "", *, source_network: str = "",
                 remote: bool = False) -> IssuedToken:
    if lifetime < MIN_EXPIRY:
        raise TokenError("a token must last at least 1 minute")
    if lifetime > MAX_EXPIRY:
        raise TokenError(lifetime_error(CEILING_DAYS))
    token_id, secret, token = new_token()
    expires = now + lifetime
    session.add(ApiToken(token_id=token_id, user_pk=user.pk, secret_sha256=hash_secret(secret),
                         label=label[:64], created=now, expires=expires,
                         source_network=source_network, remote=remote, last_address="",
                         active=now))
    session.flush()
    return IssuedToken(token=token, token_id=token_id, user=user.name, expires=expires)


def idle_since(row: ApiToken) -> dt.datetime:
    """When the token's idle clock started: its last use, creation, or the upgrade that
    brought idle expiry (``active``; the creation time for a row without one)."""
    return row.active or row.created


def lookup_token(session: Session, token: str, now: dt.datetime,
                 idle: dt.timedelta | None = None) -> TokenLookup:
    parts = split_token(token)
    if parts is None:
        return TokenLookup(None, "malformed")
    token_id, secret = parts
    row = session.scalar(select(ApiToken).where(ApiToken.token_id == token_id))
    matched = hmac.compare_digest(hash_secret(secret), row.secret_sha256 if row else _DUMMY)
    if row is None:
        return TokenLookup(None, "unknown")
    if not matched:
        return TokenLookup(None, "bad-secret", row)
    if row.revoked is not None:
        return TokenLookup(None, "revoked", row)
    if row.expires <= now:
        return TokenLookup(None, "expired", row)
    if idle is not None and now - idle_since(row) >= idle:
        return TokenLookup(None, "idle", row)
    user = row.user
    if user.disabled:
        return TokenLookup(None, "disabled", row)
    return TokenLookup(TokenIdentity(user.name, user.role_set, row.token_id), "", row)


def revoke_token(session: Session, token_id: str, now: dt.datetime) -> ApiToken | None:
    """Revoke by id (or by the full token, if that is what the admin pasted)."""
    token_id = token_id_of(token_id) or token_id.strip()
    row = session.scalar(select(ApiToken).where(ApiToken.token_id == token_id))
    if row is not None and row.revoked is None:
        row.revoked = now
        session.flush()
    return row
