"""Known devices and addresses: where a user has completed a full sign-in before.

Why: the sign-in counters (``throttle``) must slow down and block whoever is guessing, and
never the owner. A *known device* is a browser holding the device cookie this account
signed in with (256 random bits, set after a full sign-in with the second factor,
``__Host-`` cookie, HttpOnly, Secure, SameSite=Strict; only its SHA-256 is stored, so a
database dump hands out no cookie). A *known address* is an address the user fully signed
in from. Failures from anywhere else never block the user there; a known device is also
exempt from the per-address counter (one guessing program on the practice's shared
address, or on the owner's own PC, does not lock her browser out).

One cookie per browser, shared by the accounts that signed in with it: the server keeps a
row per (user, device). A presented cookie is reused only if the server already knows it
(for any user); otherwise a new one is made, so a value planted in a browser is worthless.
Known sources are forgotten ``known_for`` after their last sign-in, and at once when an
admin resets the user's second factor (a lost or stolen device).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import re
import secrets

from sqlalchemy import delete, select
from sqlalchemy.orm import Session

from pacsvault.accounts.models import KnownSource, User
from pacsvault.accounts.throttle import Source, address_key

DEVICE = "device"
ADDRESS = "address"
_COOKIE_RE = re.compile(r"^[A-Za-z0-9_-]{43}$")


def _digest(cookie: str) -> str:
    return hashlib.sha256(cookie.encode("ascii")).hexdigest()


def well_formed(cookie: str) -> bool:
    return bool(_COOKIE_RE.match(cookie))


def recognise(session: Session, user_pk: int | None, cookie: str, address: str,
              now: dt.datetime, known_for: dt.timedelta) -> Source:
    """The throttling source of an attempt on ``user_pk`` (None: no such account, which
    has no known source; the queries run anyway so both cases cost the same)."""
    pk = user_pk if user_pk is not None else -1
    since = now - known_for
    if cookie and well_formed(cookie):
        row = session.scalar(select(KnownSource).where(
            KnownSource.user_pk == pk, KnownSource.kind == DEVICE,
            KnownSource.value == _digest(cookie), KnownSource.last_seen > since))
        if row is not None:
            return Source(address, f"device:{row.pk}", familiar=True, device=True)
    known = session.scalar(select(KnownSource.pk).where(
        KnownSource.user_pk == pk, KnownSource.kind == ADDRESS,
        KnownSource.value == address_key(address), KnownSource.last_seen > since))
    return Source(address, f"addr:{address_key(address)}", familiar=known is not None)


def remember(session: Session, user: User, cookie: str, address: str,
             now: dt.datetime) -> str:
    """After a full sign-in: the address and the device become known for ``user``.
    Returns the device cookie to set (the presented one if the server knows it)."""
    if not (cookie and well_formed(cookie) and session.scalar(select(KnownSource.pk).where(
            KnownSource.kind == DEVICE, KnownSource.value == _digest(cookie))) is not None):
        cookie = secrets.token_urlsafe(32)
    for kind, value in ((DEVICE, _digest(cookie)), (ADDRESS, address_key(address))):
        row = session.scalar(select(KnownSource).where(
            KnownSource.user_pk == user.pk, KnownSource.kind == kind,
            KnownSource.value == value))
        if row is None:
            session.add(KnownSource(user_pk=user.pk, kind=kind, value=value,
                                    address=address_key(address), created=now,
                                    last_seen=now))
        else:
            row.last_seen = now
            row.address = address_key(address)
    session.flush()
    return cookie


def forget(session: Session, user_pk: int) -> None:
    session.execute(delete(KnownSource).where(KnownSource.user_pk == user_pk))


def describe(session: Session, source: str) -> str:
    """Readable form of a counter's source: the address, or the known device's owner and
    last address."""
    kind, _, value = source.partition(":")
    if kind == "addr":
        return value
    if kind == "device" and value.isdigit():
        row = session.get(KnownSource, int(value))
        if row is not None:
            return f"known device (last at {row.address})"
        return "known device"
    return source
