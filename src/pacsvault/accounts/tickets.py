"""Pending sign-ins (tickets) in the shared index: the password step on one instance, the
second factor on another (issue 16, part 3).

A ticket is 256 random bits handed to the web layer after a right password; the index keeps
its SHA-256 (``sign_in_tickets``, ``index.shared_state``), the user, the address key it was
given to, its end, and the throttle's view of the source. The known-device cookie the
browser presented is a bearer secret: it is sealed under a key derived from the ticket, so
a database dump hands out no device cookie. Used from another address, a ticket is
destroyed (it leaked), as it was in memory.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import secrets
from collections.abc import Iterator
from dataclasses import dataclass, field

from sqlalchemy import delete
from sqlalchemy.orm import Session, sessionmaker

from pacsvault.accounts.throttle import Source, address_key
from pacsvault.index import shared_state as shared
from pacsvault.index.shared_state import SignInTicketRow

_PURPOSE = b"sign-in-ticket"


@dataclass
class PendingSignIn:
    user_pk: int
    name: str
    address: str
    expires: dt.datetime = field(compare=False)
    name_key: str = ""
    source: Source | None = None
    device: str = field(default="", repr=False)  # the device cookie presented


class TicketStore:
    """``sign_in_tickets``: each call is its own short transaction."""

    def __init__(self, sessions: sessionmaker[Session]) -> None:
        self._sessions = sessions

    def new(self, user_pk: int, name: str, source: Source, name_key: str, device: str,
            now: dt.datetime, lifetime: dt.timedelta, *,
            session: Session | None = None) -> str:
        """A new ticket, written in ``session``'s transaction when given (the caller's:
        a second transaction would wait for the write lock the caller holds)."""
        ticket = secrets.token_urlsafe(32)
        key = shared.digest(ticket)
        sealed = shared.seal(shared.box_key(ticket, _PURPOSE), device.encode(), key)
        with self._within(session) as s:
            s.execute(delete(SignInTicketRow).where(
                SignInTicketRow.expires <= shared.to_micros(now)))
            s.add(SignInTicketRow(
                key=key, user_pk=user_pk, name=name, address=address_key(source.address),
                expires=shared.to_micros(now + lifetime), name_key=name_key,
                source_address=source.address[:64], source_key=source.key[:80],
                familiar=source.familiar, known_device=source.device, sealed=sealed))
            s.flush()
        return ticket

    @contextlib.contextmanager
    def _within(self, session: Session | None) -> Iterator[Session]:
        if session is not None:
            yield session
            return
        with self._sessions.begin() as s:
            yield s

    def get(self, ticket: str, address: str, now: dt.datetime) -> PendingSignIn | None:
        """The pending sign-in of a ticket, if alive and used from the address it was given
        to (a ticket presented from elsewhere is destroyed: it leaked)."""
        key = shared.digest(ticket)
        with self._sessions() as s:
            row = s.get(SignInTicketRow, key)
            if row is None:
                return None
            device = shared.unseal(shared.box_key(ticket, _PURPOSE), row.sealed, key)
            alive = (device is not None and row.expires > shared.to_micros(now)
                     and row.address == address_key(address))
            pending = PendingSignIn(
                row.user_pk, row.name, row.address, shared.from_micros(row.expires),
                row.name_key,
                Source(row.source_address, row.source_key, row.familiar, row.known_device),
                (device or b"").decode("utf-8", "replace"))
        if not alive:
            self.cancel(ticket)
            return None
        return pending

    def cancel(self, ticket: str, session: Session | None = None) -> None:
        with self._within(session) as s:
            s.execute(delete(SignInTicketRow).where(
                SignInTicketRow.key == shared.digest(ticket)))

    def drop_name(self, name: str) -> None:
        """End every pending sign-in of a user (disabled, password reset)."""
        with self._sessions.begin() as s:
            s.execute(delete(SignInTicketRow).where(SignInTicketRow.name == name))
