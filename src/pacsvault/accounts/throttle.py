"""Slowing down and blocking sign-in attempts without handing an attacker a lockout.

The old rule (10 failures lock the *account* for 30 minutes, for everybody) let any machine
on the practice network lock out any doctor, and answered differently for real and unknown
names. The counters now follow who is guessing, not whom they guess:

* **one user name from one source** (``scope`` "source"): a source is the client address,
  or a *known device* (a browser holding a device cookie this account signed in with, see
  ``devices``). The first ``free_failures`` (5) cost nothing (people mistype); then each
  attempt waits ``base_delay × 2^(n - free)`` s after the last failure; the
  ``lock_after``-th (10th) blocks that name *from that source only* for ``lock_timeout``.
  The owner at another machine, or at the same machine with her device cookie, is not
  affected.
* **one user name from every unfamiliar source together** (``scope`` "new-sources"):
  rotating addresses would otherwise give ``lock_after`` guesses per address. More
  generous (``new_free_failures`` / ``new_lock_after``), and it never applies to *familiar*
  sources (a known device, or an address the user fully signed in from before): an attacker
  can keep the owner from signing in on a new machine for a while, never on her own.
* **one address across all names** (``scope`` "address"): stops spraying one password over
  many names. Timed (``address_lock_timeout``), never applied to a known device's
  requests, and never to a valid API token (``Accounts.verify_token`` checks the token
  first): a guessing machine cannot cut off the practice's viewers and scripts.

Names are counted by an HMAC of the typed name (``Accounts.name_key``) whether or not the
account exists, with the same thresholds, so unknown and existing names get identical
answers (and ``Accounts`` burns an Argon2 verification for unknown names: identical
timing). Every block ends by itself; ``pacsvault user unlock NAME``, ``user
unblock-address ADDR`` and the admin users page lift them sooner. Failures are forgotten
``forget`` after the last one; an address's count is not reset by a success (else one
account would let an attacker reset it between guesses at others), a (name, source) count
is.

An attempt refused because of a delay or a block is not evaluated (the password is not
even checked, so it tells nothing) and does not count, but it is recorded. This module
decides and records; it never sleeps: the web layer answers at once with the retry time
(HTTP 429 + Retry-After), so a guesser cannot tie up server threads.

IPv6 sources are counted per /64: one subscriber line usually gets a whole /64.

Events (User Authentication): ``auth.login.failed`` (each failure, each refused attempt),
``auth.account.locked`` (a block on an existing account's name), ``auth.name.locked`` (on
a name that is no account), ``auth.address.locked``, ``auth.account.unlocked`` /
``auth.address.unlocked`` / ``auth.block.lifted`` (by an admin), ``auth.login``.
``actor_user`` is set only when the account exists. No event carries a password, a code or
an unknown name.
"""

from __future__ import annotations

import datetime as dt
import enum
import ipaddress
import math
from collections.abc import Callable
from dataclasses import dataclass

from sqlalchemy import and_, delete, or_, select
from sqlalchemy.orm import Session

from pacsvault.accounts.models import LoginAttempt, SignInFailure, User
from pacsvault.audit.events import AuditEvent, EventCode, Outcome, Recorder

Clock = Callable[[], dt.datetime]
NEW_SOURCES = "new-sources"  # the source key of a name's unfamiliar-sources counter


def system_clock() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


@dataclass(frozen=True)
class ThrottlePolicy:
    # one name from one source
    free_failures: int = 5
    lock_after: int = 10
    lock_timeout: dt.timedelta = dt.timedelta(minutes=30)
    # one name from all unfamiliar sources together
    new_free_failures: int = 15  # more than one source's whole run (lock_after)
    new_lock_after: int = 40
    new_lock_timeout: dt.timedelta = dt.timedelta(minutes=30)
    # one address, all names
    address_free_failures: int = 10
    address_lock_after: int = 30
    address_lock_timeout: dt.timedelta = dt.timedelta(minutes=15)
    base_delay: float = 1.0
    max_delay: float = 300.0
    forget: dt.timedelta = dt.timedelta(hours=1)
    # a known device or address stays known this long after its last full sign-in
    known_for: dt.timedelta = dt.timedelta(days=180)

    def __post_init__(self) -> None:
        for free, lock in ((self.free_failures, self.lock_after),
                           (self.new_free_failures, self.new_lock_after),
                           (self.address_free_failures, self.address_lock_after)):
            if not 0 < free < lock:
                raise ValueError("need 0 < free_failures < lock_after")
        if self.base_delay <= 0 or self.max_delay < self.base_delay:
            raise ValueError("need 0 < base_delay <= max_delay")

    def delay_after(self, failures: int, free: int | None = None) -> float:
        """Seconds to wait after the last failure, given ``failures`` consecutive ones."""
        free = self.free_failures if free is None else free
        if failures < free:
            return 0.0
        exponent = min(failures - free, 32)
        return float(min(self.base_delay * 2**exponent, self.max_delay))


class Verdict(enum.Enum):
    ALLOW = "allow"
    DELAY = "delay"  # try again after retry_after seconds
    LOCKED = "locked"  # blocked until locked_until


@dataclass(frozen=True)
class Decision:
    """What the web layer must do with the next attempt.

    ``scope`` says which counter decided: "source" (this name from this source),
    "new-sources" (this name from any unfamiliar source) or "address" (this address, any
    name). Telling the user which one is safe: unknown names get exactly the same ones.
    """

    verdict: Verdict
    retry_after: float = 0.0
    locked_until: dt.datetime | None = None
    scope: str = ""
    address: str = ""  # the address key, for the "address" scope's message

    @property
    def allowed(self) -> bool:
        return self.verdict is Verdict.ALLOW


ALLOW = Decision(Verdict.ALLOW)


def address_key(address: str) -> str:
    """The throttling key of a source: the IPv4 address, or the IPv6 /64 containing it."""
    try:
        ip = ipaddress.ip_address(address.strip("[]").split("%", 1)[0])
    except ValueError:
        return address[:64]
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.IPv6Network((ip, 64), strict=False))
    return str(ip)


@dataclass(frozen=True)
class Source:
    """Where an attempt comes from, as the counters see it.

    ``key`` is ``addr:<address key>`` or ``device:<pk>``; ``familiar``: a known device or
    address of the account named (exempt from the unfamiliar-sources counter); ``device``:
    a known device of that account (exempt from the address counter too).
    """

    address: str
    key: str
    familiar: bool = False
    device: bool = False

    @classmethod
    def of(cls, address: str) -> Source:
        return cls(address, f"addr:{address_key(address)}")


@dataclass(frozen=True)
class Block:
    """An active block, for ``user blocks`` and the admin page."""

    block_id: str  # "n<pk>" (a name's counter) or "a<pk>" (an address's)
    scope: str  # "source", "new-sources", "address"
    name_key: str  # "" for an address block
    source: str  # "addr:...", "device:<pk>", "" (new-sources) or the address key
    failures: int
    until: dt.datetime


def _seconds(delta: dt.timedelta) -> float:
    return max(delta.total_seconds(), 0.0)


Row = SignInFailure | LoginAttempt


class Throttle:
    """Counters in ``sign_in_failures`` and ``login_attempts``, decisions, events.

    Methods take the caller's session and run in its transaction, so a failure count and
    the sign-in outcome commit together.
    """

    def __init__(self, recorder: Recorder, policy: ThrottlePolicy | None = None,
                 clock: Clock = system_clock) -> None:
        self.policy = policy or ThrottlePolicy()
        self._recorder = recorder
        self._clock = clock

    def now(self) -> dt.datetime:
        return self._clock()

    # --- state --------------------------------------------------------------------------

    @staticmethod
    def _name_row(session: Session, name_key: str, source: str, *,
                  create: bool) -> SignInFailure | None:
        row = session.scalar(select(SignInFailure).where(
            SignInFailure.name_key == name_key, SignInFailure.source == source))
        if row is None and create:
            row = SignInFailure(name_key=name_key, source=source, failed_count=0)
            session.add(row)
        return row

    @staticmethod
    def _address_row(session: Session, address: str, *, create: bool) -> LoginAttempt | None:
        key = address_key(address)
        if not key:
            return None
        row = session.scalar(select(LoginAttempt).where(LoginAttempt.address == key))
        if row is None and create:
            row = LoginAttempt(address=key, failed_count=0)
            session.add(row)
        return row

    def _expire(self, row: Row, now: dt.datetime) -> None:
        """Apply time: an ended block and old failures are forgotten."""
        if row.locked_at is not None and (row.locked_until is None or row.locked_until <= now):
            row.locked_at = row.locked_until = None
            row.failed_count = 0
        if (row.locked_at is None and row.last_failed is not None
                and now - row.last_failed >= self.policy.forget):
            row.failed_count = 0

    def _decide(self, row: Row | None, free: int, scope: str, now: dt.datetime,
                address: str = "") -> Decision:
        if row is None:
            return ALLOW
        self._expire(row, now)
        if row.locked_at is not None and row.locked_until is not None:
            return Decision(Verdict.LOCKED, _seconds(row.locked_until - now), row.locked_until,
                            scope, address)
        delay = self.policy.delay_after(row.failed_count or 0, free)
        if delay and row.last_failed is not None:
            wait = _seconds(row.last_failed + dt.timedelta(seconds=delay) - now)
            if wait > 0:
                return Decision(Verdict.DELAY, wait, None, scope, address)
        return ALLOW

    @staticmethod
    def _worst(*decisions: Decision) -> Decision:
        locks = [d for d in decisions if d.verdict is Verdict.LOCKED]
        if locks:
            return max(locks, key=lambda d: d.retry_after)
        delays = [d for d in decisions if d.verdict is Verdict.DELAY]
        return max(delays, key=lambda d: d.retry_after) if delays else ALLOW

    def _count(self, row: Row, now: dt.datetime, lock_after: int,
               lock_for: dt.timedelta) -> dt.datetime | None:
        """One more failure on ``row``; the block's end if this one started a block."""
        self._expire(row, now)
        row.failed_count = (row.failed_count or 0) + 1
        row.last_failed = now
        if row.locked_at is None and row.failed_count >= lock_after:
            row.locked_at = now
            row.locked_until = now + lock_for
            return row.locked_until
        return None

    def _cleanup(self, session: Session, now: dt.datetime) -> None:
        """Drop counters that are neither blocking nor recent: sprayed names and rotating
        addresses must not pile up."""
        stale = now - self.policy.forget
        for model in (SignInFailure, LoginAttempt):
            session.execute(delete(model).where(
                model.last_failed < stale,
                or_(model.locked_until.is_(None), model.locked_until <= now)))

    # --- API ----------------------------------------------------------------------------

    def check(self, session: Session, name_key: str | None, source: Source) -> Decision:
        """May an attempt for the name ``name_key`` (None: no name, e.g. a second step
        without a pending sign-in) from ``source`` be evaluated now?"""
        now = self.now()
        p = self.policy
        decisions = []
        if name_key:
            decisions.append(self._decide(
                self._name_row(session, name_key, source.key, create=False),
                p.free_failures, "source", now))
            if not source.familiar:
                decisions.append(self._decide(
                    self._name_row(session, name_key, NEW_SOURCES, create=False),
                    p.new_free_failures, NEW_SOURCES, now))
        if not source.device:
            decisions.append(self._decide(
                self._address_row(session, source.address, create=False),
                p.address_free_failures, "address", now, address_key(source.address)))
        return self._worst(*decisions)

    def refused(self, user_name: str, source: Source, decision: Decision, *,
                factor: str) -> None:
        """Record an attempt refused unevaluated because of ``decision`` (not counted)."""
        reason = "locked" if decision.verdict is Verdict.LOCKED else "throttled"
        self._emit("auth.login.failed", Outcome.MINOR_FAILURE, user_name, source.address,
                   {"reason": reason, "factor": factor, "scope": decision.scope,
                    "retry_after": math.ceil(decision.retry_after)})

    def rejected(self, user_name: str, address: str, *, reason: str, factor: str) -> None:
        """Record a refusal that is not a guess, so not counted: e.g. a real but expired or
        revoked API token, which a forgotten script may present every minute (counting it
        would block the practice's own address)."""
        self._emit("auth.login.failed", Outcome.MINOR_FAILURE, user_name, address,
                   {"reason": reason, "factor": factor})

    def failure(self, session: Session, name_key: str | None, user_name: str,
                source: Source, *, reason: str, factor: str) -> Decision:
        """Count a failed attempt on every counter it concerns, block when a limit is
        reached, record it all. ``user_name`` is the account's name when it exists, else
        "" (events only)."""
        now = self.now()
        p = self.policy
        detail: dict[str, str | int | bool] = {"reason": reason, "factor": factor}
        if source.device:
            detail["known_device"] = True
        elif source.familiar:
            detail["known_address"] = True
        locks: list[tuple[str, dt.datetime]] = []
        if name_key:
            row = self._name_row(session, name_key, source.key, create=True)
            assert row is not None
            until = self._count(row, now, p.lock_after, p.lock_timeout)
            detail["failures"] = row.failed_count
            if until is not None:
                locks.append(("source", until))
            if not source.familiar:
                new = self._name_row(session, name_key, NEW_SOURCES, create=True)
                assert new is not None
                until = self._count(new, now, p.new_lock_after, p.new_lock_timeout)
                detail["new_source_failures"] = new.failed_count
                if until is not None:
                    locks.append((NEW_SOURCES, until))
        if not source.device:
            addr = self._address_row(session, source.address, create=True)
            if addr is not None:
                until = self._count(addr, now, p.address_lock_after, p.address_lock_timeout)
                detail["address_failures"] = addr.failed_count
                if until is not None:
                    locks.append(("address", until))
        session.flush()
        self._cleanup(session, now)
        self._emit("auth.login.failed", Outcome.MINOR_FAILURE, user_name, source.address,
                   detail)
        for scope, until in locks:
            action = ("auth.address.locked" if scope == "address" else
                      "auth.account.locked" if user_name else "auth.name.locked")
            self._emit(action, Outcome.SERIOUS_FAILURE, user_name, source.address, {
                "scope": scope, "source": source.key if scope == "source" else "",
                "until": until.isoformat(timespec="seconds"),
            })
        return self.check(session, name_key, source)

    def success(self, session: Session, user: User, name_key: str, source: Source, *,
                factor: str) -> None:
        """A full sign-in: this (name, source) count restarts; recorded."""
        now = self.now()
        session.execute(delete(SignInFailure).where(SignInFailure.name_key == name_key,
                                                    SignInFailure.source == source.key))
        user.last_login = now
        session.flush()
        self._emit("auth.login", Outcome.SUCCESS, user.name, source.address,
                   {"factor": factor})

    # --- blocks -------------------------------------------------------------------------

    def blocks(self, session: Session) -> list[Block]:
        now = self.now()
        found: list[Block] = []
        for row in session.scalars(select(SignInFailure).where(
                SignInFailure.locked_until > now).order_by(SignInFailure.locked_until)):
            assert row.locked_until is not None
            scope = NEW_SOURCES if row.source == NEW_SOURCES else "source"
            found.append(Block(f"n{row.pk}", scope, row.name_key,
                               "" if scope == NEW_SOURCES else row.source,
                               row.failed_count, row.locked_until))
        for arow in session.scalars(select(LoginAttempt).where(
                LoginAttempt.locked_until > now).order_by(LoginAttempt.locked_until)):
            assert arow.locked_until is not None
            found.append(Block(f"a{arow.pk}", "address", "", arow.address,
                               arow.failed_count, arow.locked_until))
        return found

    def lift_name(self, session: Session, name_key: str) -> int:
        """Forget every counter of a name; returns how many were blocking. The counters of
        the addresses it was blocked from go too: after an admin's unlock the user signs in
        from there at once, not after the address's own delay."""
        now = self.now()
        rows = list(session.scalars(select(SignInFailure).where(
            SignInFailure.name_key == name_key)))
        active = [r for r in rows if r.locked_until is not None and r.locked_until > now]
        addresses = [r.source.removeprefix("addr:") for r in active
                     if r.source.startswith("addr:")]
        if addresses:
            session.execute(delete(LoginAttempt).where(LoginAttempt.address.in_(addresses)))
        for row in rows:
            session.delete(row)
        session.flush()
        return len(active)

    def lift_address(self, session: Session, address: str) -> int:
        """Forget an address's own counter and every name's counter from it."""
        now = self.now()
        key = address_key(address)
        active = 0
        rows: list[Row] = [*session.scalars(select(LoginAttempt).where(
            LoginAttempt.address == key)), *session.scalars(select(SignInFailure).where(
                SignInFailure.source == f"addr:{key}"))]
        for row in rows:
            if row.locked_until is not None and row.locked_until > now:
                active += 1
            session.delete(row)
        session.flush()
        return active

    def lift(self, session: Session, block_id: str) -> Block | None:
        """Lift a block by its id (from ``blocks``): a name's block lifts all of that name's
        counters (``lift_name``), an address's all of that address's (``lift_address``), so
        the person waiting can sign in at once. None when there is no such active block."""
        for block in self.blocks(session):
            if block.block_id == block_id:
                if block.scope == "address":
                    self.lift_address(session, block.source)
                else:
                    self.lift_name(session, block.name_key)
                return block
        return None

    def active_name_blocks(self, session: Session, name_key: str) -> int:
        now = self.now()
        return len(list(session.scalars(select(SignInFailure.pk).where(and_(
            SignInFailure.name_key == name_key, SignInFailure.locked_until > now)))))

    def emit_admin(self, action: str, by: str, address: str,
                   detail: dict[str, str | int | bool]) -> None:
        self._recorder.emit(AuditEvent(
            action=action, outcome=Outcome.SUCCESS, code=EventCode.USER_AUTHENTICATION,
            actor_user=by, actor_address=address, detail=detail, time=self.now(),
        ))

    def _emit(self, action: str, outcome: Outcome, user_name: str, address: str,
              detail: dict[str, str | int | bool]) -> None:
        self._recorder.emit(AuditEvent(
            action=action, outcome=outcome, code=EventCode.USER_AUTHENTICATION,
            actor_user=user_name, actor_address=address, detail=detail, time=self.now(),
        ))
