"""What every part of ``Accounts`` shares: the database, the recorder, the keys, the clock,
the throttle and the pending sign-ins; user names; the errors shown to people.

``service.Accounts`` is assembled from ``users.UserAdmin`` (administration),
``signin.SignIn`` (the sign-in state machine) and ``token_service.TokenService`` (API
tokens), each a subclass of ``AccountsCore`` below. The pending sign-ins (tickets) live
here rather than in ``signin`` because administration ends them too: disabling a user or
resetting a password must stop a sign-in half done.

All times come from the injected clock, so tests replay lock timeouts and TOTP steps
without waiting.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import hmac
import re
import threading
from collections.abc import Callable, Iterable, Iterator
from typing import TypeVar

from argon2 import PasswordHasher
from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from pacsvault.accounts import passwords
from pacsvault.accounts import totp as totp_mod
from pacsvault.accounts.models import ROLES, Passkey, User, ensure_tables
from pacsvault.accounts.throttle import (
    Clock,
    Source,
    Throttle,
    ThrottlePolicy,
    system_clock,
)
from pacsvault.accounts.tickets import PendingSignIn as PendingSignIn
from pacsvault.accounts.tickets import TicketStore
from pacsvault.audit.events import AuditEvent, EventCode, Outcome, Recorder, Sink

_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9._@-]{0,63}$")
TICKET_LIFETIME = dt.timedelta(minutes=10)

T = TypeVar("T")


def retry_on_conflict(step: Callable[[], T]) -> T:
    """Run a sign-in step again once if it lost a race creating a throttling row.

    Two first failures from one new address at the same moment both insert its
    ``login_attempts`` row; the loser's unique-constraint error comes at the flush, before
    any event was emitted, and its transaction is rolled back whole, so running the step
    again (which now finds the row) records everything once.
    """
    try:
        return step()
    except IntegrityError:
        return step()


class AccountError(Exception):
    """A request on accounts that cannot be honoured (message is user-facing)."""


class PasswordRejected(AccountError):
    """The password does not meet the policy; ``problems`` lists why (user-facing)."""

    def __init__(self, problems: Iterable[str]) -> None:
        self.problems = tuple(problems)
        super().__init__("password refused: " + "; ".join(self.problems))


def normalise_name(name: str) -> str:
    """User names are case-insensitive: stored and compared in lower case."""
    return name.strip().lower()


def check_name(name: str) -> str:
    norm = normalise_name(name)
    if not _NAME_RE.match(norm):
        raise AccountError(
            f"invalid user name {name!r}: 1 to 64 characters among a-z, 0-9, '.', '_', '-', "
            "'@', starting with a letter or digit"
        )
    return norm


def check_roles(roles: Iterable[str]) -> list[str]:
    wanted = sorted({r.strip().lower() for r in roles if r.strip()})
    unknown = [r for r in wanted if r not in ROLES]
    if unknown or not wanted:
        raise AccountError(f"roles must be one or more of {', '.join(ROLES)}"
                           + (f" (not {', '.join(unknown)})" if unknown else ""))
    return wanted


def passkey_count(session: Session, user: User) -> int:
    return session.scalar(select(func.count(Passkey.pk))
                          .where(Passkey.user_pk == user.pk)) or 0


class _HeldRecorder(Recorder):
    """A recorder that, inside ``holding()``, queues this thread's events and emits them
    when the block ends normally (dropped if it raises)."""

    def __init__(self, inner: Recorder) -> None:
        super().__init__()
        self._inner = inner
        self._local = threading.local()

    def add_sink(self, sink: Sink) -> None:
        self._inner.add_sink(sink)

    def emit(self, event: AuditEvent, *, required: bool | None = None) -> None:
        held: list[tuple[AuditEvent, bool | None]] | None = getattr(self._local, "held", None)
        if held is not None:
            held.append((event, required))
        else:
            self._inner.emit(event, required=required)

    @contextlib.contextmanager
    def holding(self) -> Iterator[None]:
        outer: list[tuple[AuditEvent, bool | None]] | None = getattr(self._local, "held",
                                                                      None)
        if outer is not None:  # nested: the outermost block emits
            yield
            return
        held: list[tuple[AuditEvent, bool | None]] = []
        self._local.held = held
        try:
            yield
        finally:
            self._local.held = None
        for event, required in held:
            self._inner.emit(event, required=required)


class AccountsCore:
    """The shared state and helpers of ``Accounts`` (see the module docstring).

    ``secret_key``: 32 bytes sealing TOTP secrets, derived from the master key with
    ``totp.PURPOSE_ACCOUNTS``. ``throttled`` is what the password policy may assume (it is,
    unless a deployment removes ``Throttle``). ``hasher`` and ``recovery_hasher`` exist for
    tests, which use cheap parameters.
    """

    def __init__(
        self,
        sessions: sessionmaker[Session],
        recorder: Recorder,
        *,
        secret_key: bytes,
        issuer: str = "pacsvault",
        throttle_policy: ThrottlePolicy | None = None,
        clock: Clock = system_clock,
        hasher: PasswordHasher | None = None,
        recovery_hasher: PasswordHasher | None = None,
        ticket_lifetime: dt.timedelta = TICKET_LIFETIME,
    ) -> None:
        if len(secret_key) != 32:
            raise ValueError("the account secret key must be 32 bytes")
        self.sessions = sessions
        self.recorder = _HeldRecorder(recorder)
        self._key = secret_key
        self.issuer = issuer
        self._clock = clock
        self.throttle = Throttle(self.recorder, throttle_policy, clock)
        self.hasher = hasher or passwords.default_hasher()
        self.recovery_hasher = recovery_hasher or totp_mod.recovery_hasher()
        self._ticket_lifetime = ticket_lifetime
        # Pending sign-ins live in the shared index: the second step may reach another
        # instance than the password step (issue 16).
        self.tickets = TicketStore(sessions)
        # Sign-in counters are keyed by an HMAC of the typed name (see throttle).
        self._name_hmac = hmac.new(secret_key, b"pacsvault/v1/sign-in-name-key",
                                   hashlib.sha256).digest()
        bind = sessions.kw.get("bind")
        if bind is not None:
            ensure_tables(bind)

    def rekey(self, secret_key: bytes) -> None:
        """Master key rotation (``crypto.rotation``): TOTP rows were re-sealed under
        ``secret_key``. Sign-in name counters are keyed by the old HMAC and restart."""
        if len(secret_key) != 32:
            raise ValueError("the account secret key must be 32 bytes")
        self._key = secret_key
        self._name_hmac = hmac.new(secret_key, b"pacsvault/v1/sign-in-name-key",
                                   hashlib.sha256).digest()

    # --- helpers ------------------------------------------------------------------------
    # Public (``sessions``, ``recorder``, ``transaction``, ``find_user``, ``require_user``)
    # because the parts and ``passkeys`` share them: no module reaches into private names.

    @contextlib.contextmanager
    def transaction(self) -> Iterator[Session]:
        """A database transaction whose events are emitted once it has committed.

        The audit trail's sink writes its head anchor into the same SQLite database: an
        event emitted while this transaction holds the write lock would wait for it (the
        busy timeout, 30 s) and then fail. Events of a transaction that rolls back are
        dropped, as what they describe did not happen.
        """
        with self.recorder.holding(), self.sessions.begin() as session:
            yield session

    def _now(self) -> dt.datetime:
        return self._clock()

    def name_key(self, name: str) -> str:
        """The sign-in counters' key for a typed name (existing or not)."""
        norm = normalise_name(name)[:256]
        return hmac.new(self._name_hmac, norm.encode("utf-8", "replace"),
                        hashlib.sha256).hexdigest()

    @staticmethod
    def find_user(session: Session, name: str) -> User | None:
        try:
            norm = check_name(name)
        except AccountError:
            return None
        return session.scalar(select(User).where(User.name == norm))

    def require_user(self, session: Session, name: str) -> User:
        user = self.find_user(session, name)
        if user is None:
            raise AccountError(f"no user named {normalise_name(name)!r}")
        return user

    def _admin_event(self, action: str, by: str, address: str,
                     detail: dict[str, str | int | bool]) -> None:
        """Account administration is a security-relevant change (PS3.15 Security Alert)."""
        self.recorder.emit(AuditEvent(
            action=action, outcome=Outcome.SUCCESS, code=EventCode.SECURITY_ALERT,
            actor_user=by, actor_address=address, detail=detail, time=self._now(),
        ))

    # --- pending sign-ins (tickets) -----------------------------------------------------

    def _new_ticket(self, user: User, source: Source, name_key: str, device: str,
                    session: Session | None = None) -> str:
        return self.tickets.new(user.pk, user.name, source, name_key, device, self._now(),
                                self._ticket_lifetime, session=session)

    def _ticket(self, ticket: str, address: str) -> PendingSignIn | None:
        """The pending sign-in of a ticket, if alive and used from the address it was given
        to (a ticket presented from elsewhere is destroyed: it leaked)."""
        return self.tickets.get(ticket, address, self._now())

    def _drop_pending(self, name: str) -> None:
        self.tickets.drop_name(name)

    def cancel(self, ticket: str, session: Session | None = None) -> None:
        """Forget a pending sign-in (the user went back to the login form); in
        ``session``'s transaction when the caller holds one."""
        self.tickets.cancel(ticket, session)
