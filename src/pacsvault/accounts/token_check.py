"""The bearer token check's common case in one read (issue 17: secure must not mean slow).

Why: every DICOMweb request of a viewer or script checks its token. The full check
(``TokenService._check_token``) opens an ORM session and a write transaction, loads the
token, then its user, and may write ``last_used`` — 5–9 % of a single-frame request's
server time. Almost always the token is valid, used from the address it was last used
from, and was used less than a minute ago: then nothing is to be written or recorded, and
one indexed read of the token and its user (no ORM, no transaction opened for writing;
on the embedded index straight through the driver, ``read_token``) settles it with exactly
the same rules. The web layer runs it on its event loop there (``deps.quick_principal``):
a worker-thread hop per request cost more than the read.

Nothing is cached between requests: revocation, expiry, a disabled user or a changed
role takes effect at the very next request, on every instance and process sharing the
index, as before. Anything but that common case (unknown or bad token, any refusal, a
use to record, a new address) returns None and the caller runs the full check, which
records, throttles and answers as it always did. The secret is compared in constant time
(``hmac.compare_digest`` of the SHA-256 digests), an unknown id against a dummy digest.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
from collections.abc import Callable
from typing import NamedTuple, cast

from sqlalchemy import Engine, Table, bindparam, select

from pacsvault.accounts import tokens
from pacsvault.accounts.models import ApiToken, User
from pacsvault.index.rawselect import RawSelect

_tokens = cast(Table, ApiToken.__table__)
_users = cast(Table, User.__table__)

_DUMMY = hashlib.sha256(b"pacsvault: no such token").digest()
_QUERY = (
    select(_tokens.c.secret_sha256, _tokens.c.revoked, _tokens.c.expires,
           _tokens.c.active, _tokens.c.created, _tokens.c.last_used,
           _tokens.c.last_address, _tokens.c.source_network, _tokens.c.remote,
           _users.c.name, _users.c.roles, _users.c.disabled)
    .join(_users, _users.c.pk == _tokens.c.user_pk)
    # Built once with its parameter: no statement to build and no cache key to work out
    # per request (SQLAlchemy memoises both on this object).
    .where(_tokens.c.token_id == bindparam("token_id"))
)


class _Row(NamedTuple):
    """One row of ``_QUERY``, under the same names as SQLAlchemy's ``Row``."""

    secret_sha256: bytes | None
    revoked: dt.datetime | None
    expires: dt.datetime
    active: dt.datetime | None
    created: dt.datetime
    last_used: dt.datetime | None
    last_address: str | None
    source_network: str | None
    remote: bool | None
    name: str
    roles: str
    disabled: bool


_READ = RawSelect(_QUERY)
assert _Row._fields == _READ.names


def read_token(engine: Engine, token_id: str) -> _Row | None:
    """The token's row joined with its user's (None: no such token); on the embedded index
    straight through the driver (``index.rawselect``; ``tests/test_token_fastpath.py``
    compares it with SQLAlchemy's row): Core's own work cost more than SQLite's read."""
    values = _READ.first(engine, {"token_id": token_id})
    return None if values is None else _Row._make(values)


def quick_identity(
    engine: Engine, token: str, address_key: str, now: dt.datetime, idle: dt.timedelta,
    fresh: dt.timedelta, refusal: Callable[[str, bool], str],
) -> tokens.TokenIdentity | None:
    """The token's identity when it is valid *and* nothing needs writing or recording
    (last used less than ``fresh`` ago, from ``address_key``); None otherwise: then the
    caller runs the full check. ``refusal(source_network, remote)``: the network rule's
    reason ("" when this address may use the token), as the full check applies it."""
    parts = tokens.split_token(token)
    if parts is None:
        return None
    token_id, secret = parts
    row = read_token(engine, token_id)
    stored = row.secret_sha256 if row is not None else None
    matched = hmac.compare_digest(tokens.hash_secret(secret),
                                  bytes(stored) if stored else _DUMMY)
    if row is None or not matched:
        return None
    last_used = row.last_used
    if (row.revoked is not None or row.expires <= now or row.disabled
            or now - (row.active or row.created) >= idle
            or last_used is None or now - last_used >= fresh
            or row.last_address != address_key
            or refusal(row.source_network or "", bool(row.remote))):
        return None
    return tokens.TokenIdentity(str(row.name),
                                frozenset(r for r in str(row.roles).split(",") if r),
                                token_id)
