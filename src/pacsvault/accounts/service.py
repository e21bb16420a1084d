"""``Accounts``: users, sign-in with a mandatory second factor, API tokens.

One object ties the pieces together for the CLI (``user``/``token`` commands, ``init``'s
first admin) and the web layer (login form, enrolment page, bearer tokens), so that both
apply the same policy and record the same events.

Sign-in is two calls, and the second cannot be made without the first:

1. ``authenticate(name, password, address)`` checks throttling, then the password. On
   success it returns ``NEEDS_SECOND_FACTOR`` with a *ticket*: 256 random bits, kept in this
   object's memory, bound to the user and the source address, valid ``ticket_lifetime``
   (10 min). Nothing else (no session, no ``auth.login`` event) happens yet.
2. ``verify_second_factor(ticket, code, address)`` takes a TOTP code or a recovery code.
   A user without a confirmed TOTP first calls ``enroll_totp(ticket, address)`` to get the
   QR code; the first valid code confirms the enrolment and returns the recovery codes to
   show once. Only then is the sign-in complete: ``SUCCESS``, ``auth.login`` recorded, the
   failure count of this name from this source reset, the address and the browser (device
   cookie, ``device_token``) remembered as known (``devices``). The web layer then creates
   its session.

Wrong passwords and wrong codes both count towards throttling: otherwise someone who knows a
password could try all million TOTP codes. The slow password hash runs outside any database
transaction, so concurrent sign-ins never hold the database for 0.4 s each.

Enrolment at first sign-in means that whoever first signs in with a new account's password
enrols the second factor: an admin hands out passwords (``add_user``, ``reset``) directly to
the person, as the first admin's password is shown only once at ``init``.

All times come from the injected clock, so tests replay lock timeouts and TOTP steps
without waiting.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import enum
import hashlib
import hmac
import re
import secrets
import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import TypeVar

from argon2 import PasswordHasher
from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from pacsvault.accounts import devices, passwords, tokens
from pacsvault.accounts import totp as totp_mod
from pacsvault.accounts.models import (
    ROLES,
    ApiToken,
    Passkey,
    RecoveryCode,
    TotpSecret,
    User,
    ensure_tables,
)
from pacsvault.accounts.throttle import (
    Clock,
    Decision,
    Source,
    Throttle,
    ThrottlePolicy,
    Verdict,
    address_key,
    system_clock,
)
from pacsvault.audit.events import AuditEvent, EventCode, Outcome, Recorder, Sink

_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9._@-]{0,63}$")
TICKET_LIFETIME = dt.timedelta(minutes=10)
# last_used is a write per request otherwise; a minute's precision is enough to spot a
# token still in use.
LAST_USED_PRECISION = dt.timedelta(minutes=1)

T = TypeVar("T")


def _retry_on_conflict(step: Callable[[], T]) -> T:
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


class AuthOutcome(enum.Enum):
    NEEDS_SECOND_FACTOR = "needs-second-factor"  # password right: ask for the code
    SUCCESS = "success"  # both factors right: open a session
    FAILED = "failed"  # wrong name, password, code or ticket (never say which)
    DELAY = "delay"  # not evaluated: too soon after failures, retry after retry_after s
    LOCKED = "locked"  # not evaluated: account or address locked


@dataclass(frozen=True)
class AuthResult:
    """What a sign-in step gave. The page shown must stay generic ("wrong name, password or
    code"; "too many attempts, try again in N s"): the outcome details are for the trail."""

    outcome: AuthOutcome
    retry_after: float = 0.0
    ticket: str = ""
    totp_enrolled: bool = False
    passkey_enrolled: bool = False  # a passkey is registered (the other second factor)
    user: str = ""
    roles: frozenset[str] = frozenset()
    recovery_codes: tuple[str, ...] = ()  # after enrolment: show once
    recovery_codes_left: int | None = None  # after signing in with a recovery code
    decision: Decision | None = None
    device_token: str = ""  # after a full sign-in: the known-device cookie to set


@dataclass(frozen=True)
class TotpEnrolment:
    secret: str  # base32, for typing into an app that cannot scan
    uri: str
    qr_svg: str


@dataclass(frozen=True)
class UserInfo:
    name: str
    roles: tuple[str, ...]
    disabled: bool
    locked: bool
    totp_enrolled: bool
    recovery_codes_left: int
    created: dt.datetime
    password_changed: dt.datetime
    last_login: dt.datetime | None
    passkeys: int = 0

    @property
    def second_factor_enrolled(self) -> bool:
        return self.totp_enrolled or self.passkeys > 0


def _passkey_count(session: Session, user: User) -> int:
    return session.scalar(select(func.count(Passkey.pk))
                          .where(Passkey.user_pk == user.pk)) or 0


@dataclass(frozen=True)
class TokenInfo:
    token_id: str
    user: str
    label: str
    created: dt.datetime
    expires: dt.datetime
    revoked: dt.datetime | None
    last_used: dt.datetime | None


@dataclass(frozen=True)
class TokenResult:
    """``identity`` when the token is valid; otherwise ``reason`` (for the trail only: the
    web layer answers 401 whatever it is) and, when throttled, ``decision``."""

    identity: tokens.TokenIdentity | None
    reason: str = ""
    decision: Decision | None = None

    @property
    def ok(self) -> bool:
        return self.identity is not None


@dataclass(frozen=True)
class BlockInfo:
    """An active sign-in block, as ``user blocks`` and the admin page show it."""

    block_id: str
    scope: str  # "source": a name from one source; "new-sources"; "address": any name
    user: str  # the account's name; "" for an address block or a name that is no account
    source: str  # readable: an address, "known device (...)", "" for new-sources
    failures: int
    until: dt.datetime


@dataclass
class _Pending:
    user_pk: int
    name: str
    address: str
    expires: dt.datetime = field(compare=False)
    name_key: str = ""
    source: Source | None = None
    device: str = field(default="", repr=False)  # the device cookie presented


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


ADMIN_NAME_ALPHABET = "abcdefghjkmnpqrstuvwxyz23456789"


def generate_admin_name() -> str:
    """``admin-`` and 6 random characters (~30 bits): the first administrator's name
    when nobody chose one, so that no vault has a guessable administrator account."""
    return "admin-" + "".join(secrets.choice(ADMIN_NAME_ALPHABET) for _ in range(6))


def _outcome_of(decision: Decision) -> AuthOutcome:
    return AuthOutcome.LOCKED if decision.verdict is Verdict.LOCKED else AuthOutcome.DELAY


class Accounts:
    """Account management and sign-in over the index database.

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
        self._sessions = sessions
        self._recorder = _HeldRecorder(recorder)
        self._key = secret_key
        self.issuer = issuer
        self._clock = clock
        self.throttle = Throttle(self._recorder, throttle_policy, clock)
        self.hasher = hasher or passwords.default_hasher()
        self.recovery_hasher = recovery_hasher or totp_mod.recovery_hasher()
        self._ticket_lifetime = ticket_lifetime
        self._pending: dict[bytes, _Pending] = {}
        self._lock = threading.Lock()
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

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[Session]:
        """A database transaction whose events are emitted once it has committed.

        The audit trail's sink writes its head anchor into the same SQLite database: an
        event emitted while this transaction holds the write lock would wait for it (the
        busy timeout, 30 s) and then fail. Events of a transaction that rolls back are
        dropped, as what they describe did not happen.
        """
        with self._recorder.holding(), self._sessions.begin() as session:
            yield session

    def _now(self) -> dt.datetime:
        return self._clock()

    def name_key(self, name: str) -> str:
        """The sign-in counters' key for a typed name (existing or not)."""
        norm = normalise_name(name)[:256]
        return hmac.new(self._name_hmac, norm.encode("utf-8", "replace"),
                        hashlib.sha256).hexdigest()

    @staticmethod
    def _user(session: Session, name: str) -> User | None:
        try:
            norm = check_name(name)
        except AccountError:
            return None
        return session.scalar(select(User).where(User.name == norm))

    def _require(self, session: Session, name: str) -> User:
        user = self._user(session, name)
        if user is None:
            raise AccountError(f"no user named {normalise_name(name)!r}")
        return user

    def _admin_event(self, action: str, by: str, address: str,
                     detail: dict[str, str | int | bool]) -> None:
        """Account administration is a security-relevant change (PS3.15 Security Alert)."""
        self._recorder.emit(AuditEvent(
            action=action, outcome=Outcome.SUCCESS, code=EventCode.SECURITY_ALERT,
            actor_user=by, actor_address=address, detail=detail, time=self._now(),
        ))

    def check_password(self, password: str, user_name: str = "") -> passwords.PasswordCheck:
        return passwords.check_password(password, user_name=user_name, throttled=True)

    def _accept_password(self, password: str, user_name: str) -> str:
        verdict = self.check_password(password, user_name)
        if not verdict.ok:
            raise PasswordRejected(verdict.problems)
        return passwords.hash_password(self.hasher, password)

    def _info(self, session: Session, user: User) -> UserInfo:
        locked = self.throttle.active_name_blocks(session, self.name_key(user.name)) > 0
        left = session.scalar(select(func.count(RecoveryCode.pk)).where(
            RecoveryCode.user_pk == user.pk, RecoveryCode.used_at.is_(None))) or 0
        return UserInfo(
            name=user.name, roles=tuple(sorted(user.role_set)), disabled=user.disabled,
            locked=locked, totp_enrolled=bool(user.totp and user.totp.confirmed),
            recovery_codes_left=left, created=user.created,
            password_changed=user.password_changed, last_login=user.last_login,
            passkeys=_passkey_count(session, user),
        )

    # --- administration -----------------------------------------------------------------

    def add_user(self, name: str, roles: Iterable[str], password: str, *, by: str = "",
                 address: str = "") -> UserInfo:
        norm = check_name(name)
        role_list = check_roles(roles)
        encoded = self._accept_password(password, norm)
        now = self._now()
        with self._transaction() as s:
            if self._user(s, norm) is not None:
                raise AccountError(f"a user named {norm!r} already exists")
            user = User(name=norm, roles=",".join(role_list), password_hash=encoded,
                        disabled=False, created=now, password_changed=now, failed_count=0)
            s.add(user)
            s.flush()
            info = self._info(s, user)
        self._admin_event("user.add", by, address, {"user": norm, "roles": ",".join(role_list)})
        return info

    def first_admin(self, name: str = "", *, by: str = "") -> tuple[UserInfo, str]:
        """The account ``init`` creates: admin role, a random password to show once; an
        unpredictable name (``generate_admin_name``) unless one was chosen."""
        name = name or generate_admin_name()
        password = passwords.generate_password()
        return self.add_user(name, ["admin"], password, by=by), password

    def list_users(self) -> list[UserInfo]:
        with self._sessions() as s:
            return [self._info(s, u) for u in s.scalars(select(User).order_by(User.name))]

    def get_user(self, name: str) -> UserInfo:
        with self._sessions() as s:
            return self._info(s, self._require(s, name))

    def set_roles(self, name: str, roles: Iterable[str], *, by: str = "",
                  address: str = "") -> UserInfo:
        role_list = check_roles(roles)
        with self._transaction() as s:
            user = self._require(s, name)
            user.roles = ",".join(role_list)
            info = self._info(s, user)
        self._admin_event("user.roles", by, address,
                          {"user": info.name, "roles": ",".join(role_list)})
        return info

    def disable(self, name: str, *, by: str = "", address: str = "") -> None:
        """Sign-in and the user's tokens stop working at once (the web layer must also drop
        the user's open sessions)."""
        self._set_disabled(name, True, by, address)

    def enable(self, name: str, *, by: str = "", address: str = "") -> None:
        self._set_disabled(name, False, by, address)

    def _set_disabled(self, name: str, disabled: bool, by: str, address: str) -> None:
        with self._transaction() as s:
            user = self._require(s, name)
            user.disabled = disabled
            norm = user.name
        self._drop_pending(norm)
        self._admin_event("user.disable" if disabled else "user.enable", by, address,
                          {"user": norm})

    def reset(self, name: str, password: str | None = None, *, second_factor: bool = False,
              by: str = "", address: str = "") -> str:
        """Set a new password (a generated one when ``password`` is None, to show once),
        unlock the account, and with ``second_factor`` remove the TOTP secret and recovery
        codes so the user enrols again at next sign-in (a lost phone)."""
        norm = check_name(name)
        generated = password is None
        new_password = passwords.generate_password() if password is None else password
        encoded = self._accept_password(new_password, norm)
        with self._transaction() as s:
            user = self._require(s, norm)
            user.password_hash = encoded
            user.password_changed = self._now()
            user.failed_count = 0
            user.last_failed = user.locked_at = user.locked_until = None
            self.throttle.lift_name(s, self.name_key(norm))
            if second_factor:
                devices.forget(s, user.pk)  # a lost or stolen device is no longer known
                if user.totp is not None:
                    s.delete(user.totp)
                for code in list(user.recovery_codes):
                    s.delete(code)
                for key in s.scalars(select(Passkey).where(Passkey.user_pk == user.pk)):
                    s.delete(key)
        # A sign-in half done with the old password must not complete after the reset.
        self._drop_pending(norm)
        self._admin_event("user.reset", by, address, {
            "user": norm, "generated": generated, "second_factor": second_factor})
        return new_password

    def unlock(self, name: str, *, by: str = "", address: str = "") -> bool:
        """Lift every block on a user name (from any source) and clear its counters.
        Returns whether a block was active. A name that is no account can be unlocked too
        (its counters exist, see throttle), but only if it has some."""
        norm = normalise_name(name)
        with self._transaction() as s:
            user = self._user(s, norm)
            key = self.name_key(norm)
            if user is None and not self.throttle.active_name_blocks(s, key):
                raise AccountError(f"no user named {norm!r}")
            lifted = self.throttle.lift_name(s, key)
            if user is not None:
                user.failed_count = 0
                user.last_failed = user.locked_at = user.locked_until = None
            self.throttle.emit_admin("auth.account.unlocked", by, address, {
                "user": user.name if user is not None else "", "was_locked": lifted > 0,
                "blocks": lifted})
        return lifted > 0

    def unlock_address(self, source: str, *, by: str = "", address: str = "") -> bool:
        """Lift the block on an address (any name) and the blocks of names from it."""
        with self._transaction() as s:
            lifted = self.throttle.lift_address(s, source)
            self.throttle.emit_admin("auth.address.unlocked", by, address, {
                "address": address_key(source), "was_locked": lifted > 0, "blocks": lifted})
        return lifted > 0

    def blocks(self) -> list[BlockInfo]:
        """The active blocks, with readable names and sources."""
        with self._sessions() as s:
            names = {self.name_key(u): u for u in s.scalars(select(User.name))}
            return [BlockInfo(b.block_id, b.scope, names.get(b.name_key, ""),
                              devices.describe(s, b.source) if b.scope == "source"
                              else b.source, b.failures, b.until)
                    for b in self.throttle.blocks(s)]

    def lift_block(self, block_id: str, *, by: str = "", address: str = "") -> bool:
        """Lift one block (an id from ``blocks``); False when it is not active."""
        with self._transaction() as s:
            names = {self.name_key(u): u for u in s.scalars(select(User.name))}
            block = self.throttle.lift(s, block_id)
            if block is None:
                return False
            self.throttle.emit_admin("auth.block.lifted", by, address, {
                "scope": block.scope, "user": names.get(block.name_key, ""),
                "source": block.source})
        return True

    # --- sign-in ------------------------------------------------------------------------

    def authenticate(self, name: str, password: str, address: str,
                     device: str = "") -> AuthResult:
        """First factor. See the module docstring for the whole flow. ``device`` is the
        browser's known-device cookie, if any (``devices``).

        An unknown name goes through exactly the same counters and an Argon2 verification
        against a dummy hash: same answers, same delays, same time as a wrong password.
        """
        name_key = self.name_key(name)
        with self._transaction() as s:
            user = self._user(s, name)
            source = devices.recognise(s, user.pk if user is not None else None, device,
                                       address, self._now(), self.throttle.policy.known_for)
            decision = self.throttle.check(s, name_key, source)
            if not decision.allowed:
                self.throttle.refused(user.name if user is not None else "", source,
                                      decision, factor="password")
                return AuthResult(_outcome_of(decision), decision.retry_after,
                                  decision=decision)
            user_pk = user.pk if user is not None else None
            encoded = user.password_hash if user is not None else ""
        # The slow part, outside any transaction.
        if user_pk is None:
            passwords.burn_verification(self.hasher, password)
            right = False
        else:
            right = passwords.verify_password(self.hasher, encoded, password)
        return _retry_on_conflict(lambda: self._first_factor_outcome(
            user_pk, right, password, name_key, source, device))

    def _first_factor_outcome(self, user_pk: int | None, right: bool, password: str,
                              name_key: str, source: Source, device: str) -> AuthResult:
        with self._transaction() as s:
            user = s.get(User, user_pk) if user_pk is not None else None
            if user is None or not right or user.disabled:
                reason = ("unknown-user" if user is None else
                          "bad-password" if not right else "disabled")
                decision = self.throttle.failure(
                    s, name_key, user.name if user is not None else "", source,
                    reason=reason, factor="password")
                return AuthResult(AuthOutcome.FAILED, decision.retry_after, decision=decision)
            if passwords.needs_rehash(self.hasher, user.password_hash):
                user.password_hash = passwords.hash_password(self.hasher, password)
            enrolled = bool(user.totp and user.totp.confirmed)
            passkey = _passkey_count(s, user) > 0
            ticket = self._new_ticket(user, source, name_key, device)
        return AuthResult(AuthOutcome.NEEDS_SECOND_FACTOR, ticket=ticket,
                          totp_enrolled=enrolled, passkey_enrolled=passkey)

    def _new_ticket(self, user: User, source: Source, name_key: str, device: str) -> str:
        ticket = secrets.token_urlsafe(32)
        now = self._now()
        with self._lock:
            for key in [k for k, p in self._pending.items() if p.expires <= now]:
                del self._pending[key]
            self._pending[hashlib.sha256(ticket.encode()).digest()] = _Pending(
                user.pk, user.name, address_key(source.address), now + self._ticket_lifetime,
                name_key, source, device)
        return ticket

    def _signed_in(self, s: Session, user: User, pending: _Pending, factor: str) -> str:
        """A full sign-in from ``pending``'s source: counters, known device and address,
        ``auth.login``. Returns the device cookie to set."""
        source = pending.source or Source.of(pending.address)
        self.throttle.success(s, user, pending.name_key or self.name_key(user.name), source,
                              factor=factor)
        return devices.remember(s, user, pending.device, source.address, self._now())

    def _ticket(self, ticket: str, address: str) -> _Pending | None:
        """The pending sign-in of a ticket, if alive and used from the address it was given
        to (a ticket presented from elsewhere is destroyed: it leaked)."""
        key = hashlib.sha256(ticket.encode()).digest()
        with self._lock:
            pending = self._pending.get(key)
            if pending is None:
                return None
            if pending.expires <= self._now() or pending.address != address_key(address):
                del self._pending[key]
                return None
            return pending

    def _drop_pending(self, name: str) -> None:
        with self._lock:
            for key in [k for k, p in self._pending.items() if p.name == name]:
                del self._pending[key]

    def cancel(self, ticket: str) -> None:
        """Forget a pending sign-in (the user went back to the login form)."""
        with self._lock:
            self._pending.pop(hashlib.sha256(ticket.encode()).digest(), None)

    def enroll_totp(self, ticket: str, address: str, *, renew: bool = False) -> TotpEnrolment:
        """The QR code for a user who passed the password step and has no confirmed TOTP.

        The same pending secret is shown again on reload (``renew`` makes a new one), so a
        code from an app that already scanned it still works.
        """
        pending = self._ticket(ticket, address)
        if pending is None:
            raise AccountError("the sign-in has expired; sign in again")
        with self._transaction() as s:
            user = s.get(User, pending.user_pk)
            if user is None or user.disabled:
                raise AccountError("the sign-in has expired; sign in again")
            row = user.totp
            if (row is not None and row.confirmed) or _passkey_count(s, user) > 0:
                raise AccountError("a second factor is already enrolled for this account")
            if row is None or renew:
                secret = totp_mod.new_secret()
                sealed = totp_mod.seal_secret(self._key, secret, user.pk)
                if row is None:
                    s.add(TotpSecret(user_pk=user.pk, sealed=sealed, confirmed=False,
                                     created=self._now()))
                else:
                    row.sealed, row.last_step = sealed, None
            else:
                secret = totp_mod.open_secret(self._key, row.sealed, user.pk)
            uri = totp_mod.provisioning_uri(secret, user.name, self.issuer)
        return TotpEnrolment(secret=totp_mod.secret_base32(secret), uri=uri,
                             qr_svg=totp_mod.qr_svg(uri))

    def verify_second_factor(self, ticket: str, code: str, address: str) -> AuthResult:
        """Second factor: a TOTP code (6 digits) or a recovery code; completes sign-in."""
        pending = self._ticket(ticket, address)
        return _retry_on_conflict(lambda: self._second_factor(pending, ticket, code, address))

    def _second_factor(self, pending: _Pending | None, ticket: str, code: str,
                       address: str) -> AuthResult:
        with self._transaction() as s:
            user = s.get(User, pending.user_pk) if pending is not None else None
            if pending is None or user is None:
                return self._no_pending(s, address, "second")
            source = pending.source or Source.of(address)
            decision = self.throttle.check(s, pending.name_key, source)
            if not decision.allowed:
                self.throttle.refused(user.name, source, decision, factor="second")
                if decision.verdict is Verdict.LOCKED:
                    self.cancel(ticket)
                return AuthResult(_outcome_of(decision), decision.retry_after,
                                  decision=decision)
            row = user.totp
            now = self._now()
            factor, reason, left = "totp", "", None
            # Recovery codes stand in for whichever second factor is enrolled (TOTP or a
            # passkey chosen at enrolment instead).
            enrolled = bool(row is not None and row.confirmed) or _passkey_count(s, user) > 0
            if user.disabled:
                reason = "disabled"
            elif totp_mod.looks_like_totp(code):
                if row is None or (not row.confirmed and enrolled):
                    # a pending QR code never becomes a factor once a passkey is enrolled
                    reason = "not-enrolled"
                else:
                    check = totp_mod.verify_totp(s, row, self._key, code, now)
                    reason = check.reason
            elif enrolled:
                factor = "recovery"
                if totp_mod.use_recovery_code(s, user, self.recovery_hasher, code, now):
                    left = totp_mod.remaining_recovery_codes(s, user)
                else:
                    reason = "bad-recovery-code"
            else:
                reason = "bad-code"
            if reason:
                decision = self.throttle.failure(s, pending.name_key, user.name, source,
                                                 reason=reason, factor=factor)
                if decision.verdict is Verdict.LOCKED:
                    self.cancel(ticket)
                return AuthResult(AuthOutcome.FAILED, decision.retry_after, decision=decision)
            codes: tuple[str, ...] = ()
            enrolled_now = factor == "totp" and row is not None and not row.confirmed
            if enrolled_now:
                assert row is not None
                row.confirmed = True
                codes = tuple(totp_mod.issue_recovery_codes(s, user, self.recovery_hasher, now))
            device = self._signed_in(s, user, pending, factor)
            result = AuthResult(AuthOutcome.SUCCESS, user=user.name, roles=user.role_set,
                                totp_enrolled=True, recovery_codes=codes,
                                recovery_codes_left=left, device_token=device)
            name = user.name
        self.cancel(ticket)
        if enrolled_now:
            self._recorder.emit(AuditEvent(
                action="auth.second_factor.enrolled", outcome=Outcome.SUCCESS,
                code=EventCode.USER_AUTHENTICATION, actor_user=name, actor_address=address,
                detail={"factor": "totp", "recovery_codes": len(codes)}, time=self._now(),
            ))
        return result

    def verify_other_factor(self, ticket: str, address: str, factor: str,
                            check: Callable[[Session, User], str]) -> AuthResult:
        """Complete a sign-in with a second factor checked by ``check`` (a passkey, see
        ``accounts.passkeys``): the same ticket, throttling and ``auth.login`` event as
        ``verify_second_factor``. ``check`` runs inside the transaction, returns "" when
        the factor is right or the failure reason (for the trail); it may run twice (a
        transaction lost a race and is retried whole), so it must only touch ``session``.
        """
        pending = self._ticket(ticket, address)
        return _retry_on_conflict(
            lambda: self._other_factor(pending, ticket, address, factor, check))

    def _other_factor(self, pending: _Pending | None, ticket: str, address: str, factor: str,
                      check: Callable[[Session, User], str]) -> AuthResult:
        with self._transaction() as s:
            user = s.get(User, pending.user_pk) if pending is not None else None
            if pending is None or user is None:
                return self._no_pending(s, address, factor)
            source = pending.source or Source.of(address)
            decision = self.throttle.check(s, pending.name_key, source)
            if not decision.allowed:
                self.throttle.refused(user.name, source, decision, factor=factor)
                if decision.verdict is Verdict.LOCKED:
                    self.cancel(ticket)
                return AuthResult(_outcome_of(decision), decision.retry_after,
                                  decision=decision)
            reason = "disabled" if user.disabled else check(s, user)
            if reason:
                decision = self.throttle.failure(s, pending.name_key, user.name, source,
                                                 reason=reason, factor=factor)
                if decision.verdict is Verdict.LOCKED:
                    self.cancel(ticket)
                return AuthResult(AuthOutcome.FAILED, decision.retry_after, decision=decision)
            device = self._signed_in(s, user, pending, factor)
            result = AuthResult(AuthOutcome.SUCCESS, user=user.name, roles=user.role_set,
                                totp_enrolled=bool(user.totp and user.totp.confirmed),
                                device_token=device)
        self.cancel(ticket)
        return result

    def _no_pending(self, s: Session, address: str, factor: str) -> AuthResult:
        """A second step without a live sign-in (forged or expired ticket): counted
        against the address only (no name was proved)."""
        source = Source.of(address)
        decision = self.throttle.check(s, None, source)
        if not decision.allowed:
            self.throttle.refused("", source, decision, factor=factor)
            return AuthResult(_outcome_of(decision), decision.retry_after, decision=decision)
        decision = self.throttle.failure(s, None, "", source, reason="no-pending-login",
                                         factor=factor)
        return AuthResult(AuthOutcome.FAILED, decision.retry_after, decision=decision)

    def pending_user(self, ticket: str, address: str) -> str:
        """The user name of a live ticket used from its address, or "" (no side effect
        beyond ``_ticket``'s: a ticket from another address is destroyed)."""
        pending = self._ticket(ticket, address)
        return pending.name if pending is not None else ""

    def new_recovery_codes(self, name: str, *, by: str = "", address: str = "") -> list[str]:
        """Replace a user's recovery codes (the old ones stop working); show them once."""
        with self._transaction() as s:
            user = self._require(s, name)
            if not (user.totp is not None and user.totp.confirmed) and \
                    _passkey_count(s, user) == 0:
                raise AccountError("this user has no second factor enrolled yet")
            codes = totp_mod.issue_recovery_codes(s, user, self.recovery_hasher, self._now())
            norm = user.name
        self._admin_event("user.recovery_codes", by or norm, address,
                          {"user": norm, "count": len(codes)})
        return codes

    # --- API tokens ---------------------------------------------------------------------

    def create_token(self, name: str, expires: str | dt.timedelta = tokens.DEFAULT_EXPIRY, *,
                     label: str = "", by: str = "", address: str = "") -> tokens.IssuedToken:
        lifetime = tokens.parse_expiry(expires) if isinstance(expires, str) else expires
        try:
            with self._transaction() as s:
                user = self._require(s, name)
                if user.disabled:
                    raise AccountError(f"user {user.name!r} is disabled")
                issued = tokens.create_token(s, user, lifetime, self._now(), label)
        except tokens.TokenError as exc:
            raise AccountError(str(exc)) from None
        self._admin_event("token.create", by, address, {
            "user": issued.user, "token": issued.token_id,
            "expires": issued.expires.isoformat(timespec="seconds")})
        return issued

    def list_tokens(self, name: str | None = None) -> list[TokenInfo]:
        with self._sessions() as s:
            query = select(ApiToken).order_by(ApiToken.created)
            if name is not None:
                query = query.where(ApiToken.user_pk == self._require(s, name).pk)
            return [TokenInfo(t.token_id, t.user.name, t.label, t.created, t.expires,
                              t.revoked, t.last_used) for t in s.scalars(query)]

    def revoke_token(self, token_id: str, *, by: str = "", address: str = "") -> bool:
        """Revoke by id (or full token). False when no such token; True if now revoked."""
        with self._transaction() as s:
            row = tokens.revoke_token(s, token_id, self._now())
            if row is None:
                return False
            detail: dict[str, str | int | bool] = {"user": row.user.name,
                                                   "token": row.token_id}
        self._admin_event("token.revoke", by, address, detail)
        return True

    def verify_token(self, token: str, address: str) -> TokenResult:
        """Check a bearer token from ``address``.

        A valid token records nothing here (the request itself is recorded with the user by
        the web layer; an event per request here would double the trail). Every refusal is
        recorded; wrong or unknown tokens count against the address, never the account.
        """
        return _retry_on_conflict(lambda: self._check_token(token, address))

    def _check_token(self, token: str, address: str) -> TokenResult:
        """The token is looked up *before* the address's throttling: a valid token works
        from an address that someone else's guessing got blocked (160 random bits are not
        guessed, so checking one costs nothing worth protecting)."""
        now = self._now()
        source = Source.of(address)
        with self._transaction() as s:
            lookup = tokens.lookup_token(s, token, now)
            row = lookup.row
            owner = row.user.name if row is not None else ""
            if lookup.ok:
                assert row is not None
                if row.last_used is None or now - row.last_used >= LAST_USED_PRECISION:
                    row.last_used = now
                return TokenResult(lookup.identity)
            if lookup.secret_matched:
                self.throttle.rejected(owner, address, reason=lookup.reason, factor="token")
                return TokenResult(None, lookup.reason)
            decision = self.throttle.check(s, None, source)
            if not decision.allowed:
                self.throttle.refused("", source, decision, factor="token")
                return TokenResult(None, "throttled", decision)
            decision = self.throttle.failure(s, None, owner, source, reason=lookup.reason,
                                             factor="token")
            return TokenResult(None, lookup.reason, decision)
