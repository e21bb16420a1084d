"""Sign-in with a mandatory second factor: the state machine behind the login form.

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
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass

from sqlalchemy.orm import Session

from pacsvault.accounts import devices, passwords
from pacsvault.accounts import totp as totp_mod
from pacsvault.accounts.core import (
    AccountError,
    AccountsCore,
    PendingSignIn,
    passkey_count,
    retry_on_conflict,
)
from pacsvault.accounts.models import TotpSecret, User
from pacsvault.accounts.throttle import Decision, Source, Verdict
from pacsvault.audit.events import AuditEvent, EventCode, Outcome


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


def _outcome_of(decision: Decision) -> AuthOutcome:
    return AuthOutcome.LOCKED if decision.verdict is Verdict.LOCKED else AuthOutcome.DELAY


class SignIn(AccountsCore):
    """The two sign-in steps (see the module docstring) and TOTP enrolment."""

    def authenticate(self, name: str, password: str, address: str,
                     device: str = "") -> AuthResult:
        """First factor. See the module docstring for the whole flow. ``device`` is the
        browser's known-device cookie, if any (``devices``).

        An unknown name goes through exactly the same counters and an Argon2 verification
        against a dummy hash: same answers, same delays, same time as a wrong password.
        """
        name_key = self.name_key(name)
        with self.transaction() as s:
            user = self.find_user(s, name)
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
        return retry_on_conflict(lambda: self._first_factor_outcome(
            user_pk, right, password, name_key, source, device))

    def _first_factor_outcome(self, user_pk: int | None, right: bool, password: str,
                              name_key: str, source: Source, device: str) -> AuthResult:
        with self.transaction() as s:
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
            passkey = passkey_count(s, user) > 0
            ticket = self._new_ticket(user, source, name_key, device, s)
        return AuthResult(AuthOutcome.NEEDS_SECOND_FACTOR, ticket=ticket,
                          totp_enrolled=enrolled, passkey_enrolled=passkey)

    def _signed_in(self, s: Session, user: User, pending: PendingSignIn, factor: str) -> str:
        """A full sign-in from ``pending``'s source: counters, known device and address,
        ``auth.login``. Returns the device cookie to set."""
        source = pending.source or Source.of(pending.address)
        self.throttle.success(s, user, pending.name_key or self.name_key(user.name), source,
                              factor=factor)
        return devices.remember(s, user, pending.device, source.address, self._now())

    def enroll_totp(self, ticket: str, address: str, *, renew: bool = False) -> TotpEnrolment:
        """The QR code for a user who passed the password step and has no confirmed TOTP.

        The same pending secret is shown again on reload (``renew`` makes a new one), so a
        code from an app that already scanned it still works.
        """
        pending = self._ticket(ticket, address)
        if pending is None:
            raise AccountError("the sign-in has expired; sign in again")
        with self.transaction() as s:
            user = s.get(User, pending.user_pk)
            if user is None or user.disabled:
                raise AccountError("the sign-in has expired; sign in again")
            row = user.totp
            if (row is not None and row.confirmed) or passkey_count(s, user) > 0:
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
        return retry_on_conflict(lambda: self._second_factor(pending, ticket, code, address))

    def _second_factor(self, pending: PendingSignIn | None, ticket: str, code: str,
                       address: str) -> AuthResult:
        with self.transaction() as s:
            user = s.get(User, pending.user_pk) if pending is not None else None
            if pending is None or user is None:
                return self._no_pending(s, address, "second")
            source = pending.source or Source.of(address)
            refused = self._refused(s, pending, user, source, ticket, "second")
            if refused is not None:
                return refused
            row = user.totp
            now = self._now()
            factor, reason, left = "totp", "", None
            # Recovery codes stand in for whichever second factor is enrolled (TOTP or a
            # passkey chosen at enrolment instead).
            enrolled = bool(row is not None and row.confirmed) or passkey_count(s, user) > 0
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
                return self._failed(s, pending, user, source, ticket, reason, factor)
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
            self.recorder.emit(AuditEvent(
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
        return retry_on_conflict(
            lambda: self._other_factor(pending, ticket, address, factor, check))

    def _other_factor(self, pending: PendingSignIn | None, ticket: str, address: str,
                      factor: str, check: Callable[[Session, User], str]) -> AuthResult:
        with self.transaction() as s:
            user = s.get(User, pending.user_pk) if pending is not None else None
            if pending is None or user is None:
                return self._no_pending(s, address, factor)
            source = pending.source or Source.of(address)
            refused = self._refused(s, pending, user, source, ticket, factor)
            if refused is not None:
                return refused
            reason = "disabled" if user.disabled else check(s, user)
            if reason:
                return self._failed(s, pending, user, source, ticket, reason, factor)
            device = self._signed_in(s, user, pending, factor)
            result = AuthResult(AuthOutcome.SUCCESS, user=user.name, roles=user.role_set,
                                totp_enrolled=bool(user.totp and user.totp.confirmed),
                                device_token=device)
        self.cancel(ticket)
        return result

    def _refused(self, s: Session, pending: PendingSignIn, user: User, source: Source,
                 ticket: str, factor: str) -> AuthResult | None:
        """The throttle's word before a second step is evaluated: None to go on, else the
        refusal (recorded; a lock also ends this sign-in, so the ticket is cancelled)."""
        decision = self.throttle.check(s, pending.name_key, source)
        if decision.allowed:
            return None
        self.throttle.refused(user.name, source, decision, factor=factor)
        if decision.verdict is Verdict.LOCKED:
            self.cancel(ticket, s)
        return AuthResult(_outcome_of(decision), decision.retry_after, decision=decision)

    def _failed(self, s: Session, pending: PendingSignIn, user: User, source: Source,
                ticket: str, reason: str, factor: str) -> AuthResult:
        """A wrong second factor counts like a wrong password (else someone who knows the
        password could try every TOTP code); a lock ends this sign-in."""
        decision = self.throttle.failure(s, pending.name_key, user.name, source,
                                         reason=reason, factor=factor)
        if decision.verdict is Verdict.LOCKED:
            self.cancel(ticket, s)
        return AuthResult(AuthOutcome.FAILED, decision.retry_after, decision=decision)

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
