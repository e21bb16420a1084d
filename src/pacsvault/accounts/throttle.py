"""Slowing down and locking sign-in attempts, per account and per source address.

Why both: per-account counters stop guessing one user's password; per-address counters
stop one machine from trying a few passwords on every account ("spraying"), which never
trips a per-account limit. Together they are the "access restriction" that lets the CNIL's
case n° 2 accept 50-bit passwords (see ``passwords``).

Rules (``ThrottlePolicy``; the same thresholds for an account and an address):

* the first ``free_failures`` (5) consecutive failures cost nothing: people mistype;
* from then on, each attempt must wait ``base_delay × 2^(failures - free_failures)`` seconds
  after the last failure (1, 2, 4, 8, 16 s ... capped at ``max_delay``);
* the ``lock_after``-th (10th) consecutive failure locks: an account until an admin unlocks
  it or ``lock_timeout`` (30 min; ``None`` = only an admin) has passed; an address always
  for ``address_lock_timeout``, because locking a shared address (a practice behind one
  router) for good would let any one guesser shut everybody out.
* an account's count restarts at a full sign-in (password and second factor), an admin
  unlock or the end of a timed lock. An address's count is *not* reset by a success (else an
  attacker with one account could reset it between guesses at others); it is forgotten
  ``address_forget`` after its last failure.

An attempt refused because of a delay or a lock is not evaluated (the password is not even
checked, so it tells nothing) and does not count, but it is recorded.

IPv6 sources are counted per /64: one subscriber line usually gets a whole /64, and
counting single addresses would give an attacker 2^64 fresh counters.

This module decides and records; it never sleeps. The web layer applies a decision by
answering at once with the retry time (HTTP 429 + Retry-After, or the login page's
message), so a guesser cannot tie up server threads.

Every outcome goes to the ``Recorder`` as a User Authentication event: ``auth.login.failed``
(each failure, each refused attempt), ``auth.account.locked`` / ``auth.address.locked``,
``auth.account.unlocked`` / ``auth.address.unlocked``, ``auth.login`` (a full sign-in).
``actor_user`` is the account's name only when that account exists: an unknown name is
often a password typed in the wrong field, and must not be written to logs. No event ever
carries a password or a code.
"""

from __future__ import annotations

import datetime as dt
import enum
import ipaddress
import math
from collections.abc import Callable
from dataclasses import dataclass

from sqlalchemy import select
from sqlalchemy.orm import Session

from pacsvault.accounts.models import LoginAttempt, User
from pacsvault.audit.events import AuditEvent, EventCode, Outcome, Recorder

Clock = Callable[[], dt.datetime]


def system_clock() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


@dataclass(frozen=True)
class ThrottlePolicy:
    free_failures: int = 5
    base_delay: float = 1.0
    max_delay: float = 300.0
    lock_after: int = 10
    lock_timeout: dt.timedelta | None = dt.timedelta(minutes=30)
    address_lock_timeout: dt.timedelta = dt.timedelta(minutes=30)
    address_forget: dt.timedelta = dt.timedelta(hours=1)

    def __post_init__(self) -> None:
        if not 0 < self.free_failures < self.lock_after:
            raise ValueError("need 0 < free_failures < lock_after")
        if self.base_delay <= 0 or self.max_delay < self.base_delay:
            raise ValueError("need 0 < base_delay <= max_delay")

    def delay_after(self, failures: int) -> float:
        """Seconds to wait after the last failure, given ``failures`` consecutive ones."""
        if failures < self.free_failures:
            return 0.0
        exponent = min(failures - self.free_failures, 32)
        return float(min(self.base_delay * 2**exponent, self.max_delay))


class Verdict(enum.Enum):
    ALLOW = "allow"
    DELAY = "delay"  # try again after retry_after seconds
    LOCKED = "locked"  # locked until locked_until (None: until an admin unlocks)


@dataclass(frozen=True)
class Decision:
    """What the web layer must do with the next attempt.

    ``scope`` says which counter decided ("account" or "address"); the page shown to the
    user must not say which (that would confirm the account exists). ``retry_after`` is in
    seconds; a LOCKED decision with ``locked_until`` None lasts until an admin unlocks
    (``retry_after`` 0 then).
    """

    verdict: Verdict
    retry_after: float = 0.0
    locked_until: dt.datetime | None = None
    scope: str = ""

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


def _seconds(delta: dt.timedelta) -> float:
    return max(delta.total_seconds(), 0.0)


class Throttle:
    """Counters in the ``users`` and ``login_attempts`` rows, decisions, events.

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

    def _attempts(self, session: Session, address: str, *,
                  create: bool) -> LoginAttempt | None:
        key = address_key(address)
        if not key:
            return None
        row = session.scalar(select(LoginAttempt).where(LoginAttempt.address == key))
        if row is None and create:
            row = LoginAttempt(address=key, failed_count=0)
            session.add(row)
        return row

    def _expire(self, row: User | LoginAttempt, now: dt.datetime) -> None:
        """Apply time: an ended lock and (for addresses) old failures are forgotten."""
        if row.locked_at is not None and row.locked_until is not None and row.locked_until <= now:
            row.locked_at = row.locked_until = None
            row.failed_count = 0
        if (isinstance(row, LoginAttempt) and row.locked_at is None
                and row.last_failed is not None
                and now - row.last_failed >= self.policy.address_forget):
            row.failed_count = 0

    def _decide(self, row: User | LoginAttempt | None, scope: str,
                now: dt.datetime) -> Decision:
        if row is None:
            return ALLOW
        self._expire(row, now)
        if row.locked_at is not None:
            wait = _seconds(row.locked_until - now) if row.locked_until else 0.0
            return Decision(Verdict.LOCKED, wait, row.locked_until, scope)
        delay = self.policy.delay_after(row.failed_count or 0)
        if delay and row.last_failed is not None:
            wait = _seconds(row.last_failed + dt.timedelta(seconds=delay) - now)
            if wait > 0:
                return Decision(Verdict.DELAY, wait, None, scope)
        return ALLOW

    @staticmethod
    def _worst(*decisions: Decision) -> Decision:
        locks = [d for d in decisions if d.verdict is Verdict.LOCKED]
        if locks:  # an admin-only lock (no end) beats a timed one, then the longest
            return max(locks, key=lambda d: (d.locked_until is None, d.retry_after))
        delays = [d for d in decisions if d.verdict is Verdict.DELAY]
        return max(delays, key=lambda d: d.retry_after) if delays else ALLOW

    # --- API ----------------------------------------------------------------------------

    def check(self, session: Session, user: User | None, address: str) -> Decision:
        """May an attempt for ``user`` (None: unknown or no account) from ``address`` be
        evaluated now?"""
        now = self.now()
        return self._worst(
            self._decide(user, "account", now),
            self._decide(self._attempts(session, address, create=False), "address", now),
        )

    def refused(self, user: User | None, address: str, decision: Decision, *,
                factor: str) -> None:
        """Record an attempt refused unevaluated because of ``decision`` (not counted)."""
        reason = "locked" if decision.verdict is Verdict.LOCKED else "throttled"
        self._emit("auth.login.failed", Outcome.MINOR_FAILURE, user, address,
                   {"reason": reason, "factor": factor, "scope": decision.scope,
                    "retry_after": math.ceil(decision.retry_after)})

    def rejected(self, user: User | None, address: str, *, reason: str, factor: str) -> None:
        """Record a refusal that is not a guess, so not counted: e.g. a real but expired or
        revoked API token, which a forgotten script may present every minute (counting it
        would lock the practice's own address)."""
        self._emit("auth.login.failed", Outcome.MINOR_FAILURE, user, address,
                   {"reason": reason, "factor": factor})

    def failure(self, session: Session, user: User | None, address: str, *, reason: str,
                factor: str, count_account: bool = True) -> Decision:
        """Count a failed attempt, lock when the limit is reached, record it all.

        ``count_account=False`` counts only against the address (an API token guess names
        an account that the guesser did not prove anything about).
        """
        now = self.now()
        detail: dict[str, str | int | bool] = {"reason": reason, "factor": factor}
        locks: list[tuple[str, dt.datetime | None]] = []
        if user is not None and count_account:
            self._expire(user, now)
            user.failed_count = (user.failed_count or 0) + 1
            user.last_failed = now
            detail["failures"] = user.failed_count
            if user.locked_at is None and user.failed_count >= self.policy.lock_after:
                user.locked_at = now
                timeout = self.policy.lock_timeout
                user.locked_until = now + timeout if timeout is not None else None
                locks.append(("account", user.locked_until))
        row = self._attempts(session, address, create=True)
        if row is not None:
            self._expire(row, now)
            row.failed_count = (row.failed_count or 0) + 1
            row.last_failed = now
            detail["address_failures"] = row.failed_count
            if row.locked_at is None and row.failed_count >= self.policy.lock_after:
                row.locked_at = now
                row.locked_until = now + self.policy.address_lock_timeout
                locks.append(("address", row.locked_until))
        session.flush()
        self._emit("auth.login.failed", Outcome.MINOR_FAILURE, user, address, detail)
        for scope, until in locks:
            self._emit(f"auth.{scope}.locked", Outcome.SERIOUS_FAILURE, user, address, {
                "scope": scope,
                "until": until.isoformat(timespec="seconds") if until else "admin unlock",
                "failures": self.policy.lock_after,
            })
        return self.check(session, user if count_account else None, address)

    def success(self, session: Session, user: User, address: str, *, factor: str) -> None:
        """A full sign-in: the account's count restarts, the sign-in is recorded."""
        now = self.now()
        user.failed_count = 0
        user.last_failed = None
        user.locked_at = user.locked_until = None
        user.last_login = now
        session.flush()
        self._emit("auth.login", Outcome.SUCCESS, user, address, {"factor": factor})

    def unlock_account(self, user: User, *, by: str = "", address: str = "") -> bool:
        """Admin unlock (also clears the failure count). Returns whether it was locked."""
        was_locked = user.locked_at is not None
        user.failed_count = 0
        user.last_failed = None
        user.locked_at = user.locked_until = None
        self._recorder.emit(AuditEvent(
            action="auth.account.unlocked", outcome=Outcome.SUCCESS,
            code=EventCode.USER_AUTHENTICATION, actor_user=by, actor_address=address,
            detail={"user": user.name, "was_locked": was_locked}, time=self.now(),
        ))
        return was_locked

    def unlock_address(self, session: Session, address: str, *, by: str = "") -> bool:
        row = self._attempts(session, address, create=False)
        if row is None:
            return False
        was_locked = row.locked_at is not None
        session.delete(row)
        session.flush()
        self._recorder.emit(AuditEvent(
            action="auth.address.unlocked", outcome=Outcome.SUCCESS,
            code=EventCode.USER_AUTHENTICATION, actor_user=by,
            detail={"address": address_key(address), "was_locked": was_locked},
            time=self.now(),
        ))
        return was_locked

    def _emit(self, action: str, outcome: Outcome, user: User | None, address: str,
              detail: dict[str, str | int | bool]) -> None:
        self._recorder.emit(AuditEvent(
            action=action, outcome=outcome, code=EventCode.USER_AUTHENTICATION,
            actor_user=user.name if user is not None else "",
            actor_address=address, detail=detail, time=self.now(),
        ))
