"""WebAuthn passkeys: the alternative second factor (``webauthn``, py_webauthn by Duo).

A signed-in user registers passkeys on the account page; at sign-in, after the password,
the browser is asked for an assertion by one of the user's passkeys (``allowCredentials``),
and a valid one completes the sign-in exactly like a TOTP code
(``Accounts.verify_other_factor``: same ticket, throttling, ``auth.login`` event).

Challenges are 256 random bits kept in the shared index (``webauthn_challenges``,
``index.shared_state``: the options may come from one instance and the answer reach
another), bound to what asked for them (the sign-in ticket, or the signed-in user; stored
under a SHA-256 of that binding) and to the relying party of that request, valid
``CHALLENGE_LIFETIME``, and single-use: verifying deletes the row first and goes on only if
its own delete removed it, so a replayed response, even at another instance at the same
moment, finds none.

The relying party is the host the browser used (the ``Host`` header, checked against the
names the caller allows: the server certificate's names and loopback), and the origin
``https://host[:port]``: a response made for another site or another port is refused.

The ``Passkey`` table is in ``accounts.models`` with the other account tables.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import ipaddress
import json
import secrets
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from cryptography import x509
from sqlalchemy import CursorResult, delete, select
from sqlalchemy.orm import Session

from pacsvault.accounts import totp as totp_mod
from pacsvault.accounts.models import Passkey, User
from pacsvault.accounts.service import AccountError, Accounts, AuthOutcome, AuthResult
from pacsvault.audit.events import AuditEvent, EventCode, Outcome
from pacsvault.index import shared_state as shared
from pacsvault.index.shared_state import WebAuthnChallengeRow

if TYPE_CHECKING:
    from webauthn.helpers.structs import AuthenticatorTransport

# ``webauthn`` (and what it brings: cbor2, pyOpenSSL, asn1 modules, ~5 MB per process) is
# imported by the functions of a ceremony, not with this module: every serving process
# imports this module for the web app, few ever see a passkey (issue 17, memory of each
# serving process; tests/test_deferred.py checks a started server has not imported it).

CHALLENGE_LIFETIME = dt.timedelta(minutes=5)
MAX_PASSKEYS = 10
MAX_LABEL = 64
LOOPBACK = ("localhost", "127.0.0.1", "::1")
FACTOR = "passkey"


class PasskeyError(AccountError):
    """A passkey request refused (message is user-facing and generic)."""


@dataclass(frozen=True)
class RelyingParty:
    """Who the browser thinks it talks to: ``id`` (a host name) and ``origin``."""

    id: str
    origin: str


@dataclass(frozen=True)
class PasskeyInfo:
    key_id: str  # short, url-safe: for the account page's "remove"
    label: str
    created: dt.datetime
    last_used: dt.datetime | None


@dataclass
class _Challenge:
    challenge: bytes
    rp: RelyingParty
    user_pk: int
    expires: dt.datetime = field(compare=False)


def certificate_names(cert_path: Path) -> set[str]:
    """The DNS names and IP addresses of a certificate's subjectAltName (lower case)."""
    try:
        cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
        sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except (OSError, ValueError, x509.ExtensionNotFound):
        return set()
    names = {n.lower() for n in sans.get_values_for_type(x509.DNSName)}
    names |= {str(a) for a in sans.get_values_for_type(x509.IPAddress)}
    return names


def relying_party(host_header: str, allowed: Iterable[str]) -> RelyingParty:
    """The relying party of a request from its ``Host`` header, if the host is allowed."""
    host = host_header.strip().lower()
    if not host or any(c in host for c in "/@ \t\\"):
        raise PasskeyError("unknown host")
    if host.startswith("["):  # [v6]:port
        name, _, rest = host[1:].partition("]")
        port = rest[1:] if rest.startswith(":") else ""
        if rest and not rest.startswith(":"):
            raise PasskeyError("unknown host")
    else:
        name, _, port = host.partition(":")
    if port and not (port.isdigit() and 0 < int(port) < 65536):
        raise PasskeyError("unknown host")
    try:
        name = str(ipaddress.ip_address(name))
    except ValueError:
        name = name.rstrip(".")
    if name not in {a.lower() for a in allowed} | set(LOOPBACK):
        raise PasskeyError("unknown host")
    shown = f"[{name}]" if ":" in name else name
    origin = f"https://{shown}" if port in ("", "443") else f"https://{shown}:{int(port)}"
    return RelyingParty(name, origin)


def _key_id(credential_id: bytes) -> str:
    return hashlib.sha256(credential_id).hexdigest()[:16]


def _transports(value: str) -> list[AuthenticatorTransport]:
    from webauthn.helpers.structs import AuthenticatorTransport

    known = {t.value: t for t in AuthenticatorTransport}
    return [known[t] for t in value.split(",") if t in known]


class Passkeys:
    """Registration and sign-in with passkeys over ``Accounts``."""

    def __init__(self, accounts: Accounts, *, rp_name: str = "pacsvault",
                 lifetime: dt.timedelta = CHALLENGE_LIFETIME) -> None:
        self.accounts = accounts
        self.rp_name = rp_name
        self._lifetime = lifetime

    # --- challenges -----------------------------------------------------------------------

    def _now(self) -> dt.datetime:
        return self.accounts.throttle.now()

    def _put(self, key: bytes, user_pk: int, rp: RelyingParty) -> bytes:
        challenge = secrets.token_bytes(32)
        now = self._now()
        row_key = hashlib.sha256(key).digest()
        with self.accounts.sessions.begin() as s:
            s.execute(delete(WebAuthnChallengeRow).where(
                (WebAuthnChallengeRow.expires <= shared.to_micros(now))
                | (WebAuthnChallengeRow.key == row_key)))
            s.add(WebAuthnChallengeRow(key=row_key, challenge=challenge, rp_id=rp.id,
                                       rp_origin=rp.origin, user_pk=user_pk,
                                       expires=shared.to_micros(now + self._lifetime)))
        return challenge

    def _take(self, key: bytes, rp: RelyingParty) -> _Challenge | None:
        """The challenge stored under ``key``, removed (single use), if alive and issued
        for the same relying party. Of two takers (two instances) only the one whose delete
        removed the row gets it."""
        row_key = hashlib.sha256(key).digest()
        with self.accounts.sessions() as s:
            row = s.get(WebAuthnChallengeRow, row_key)
            if row is None:
                return None
            found = _Challenge(bytes(row.challenge), RelyingParty(row.rp_id, row.rp_origin),
                               row.user_pk, shared.from_micros(row.expires))
        # The delete in a transaction of its own (a read first would make SQLite refuse
        # the upgrade to a write when another instance deleted meanwhile).
        with self.accounts.sessions.begin() as s:
            gone = cast(CursorResult[Any], s.execute(
                delete(WebAuthnChallengeRow).where(WebAuthnChallengeRow.key == row_key)
                .execution_options(synchronize_session=False)))
            if gone.rowcount != 1:
                return None
        if found.expires <= self._now() or found.rp != rp:
            return None
        return found

    @staticmethod
    def _login_key(ticket: str) -> bytes:
        return b"login:" + hashlib.sha256(ticket.encode()).digest()

    @staticmethod
    def _register_key(user: str) -> bytes:
        return b"register:" + user.encode()

    @staticmethod
    def _enrol_key(ticket: str) -> bytes:
        return b"enrol:" + hashlib.sha256(ticket.encode()).digest()

    # --- registration (a signed-in user) ------------------------------------------------

    def registration_options(self, user_name: str, rp: RelyingParty, *,
                             ticket: str = "") -> str:
        """``PublicKeyCredentialCreationOptions`` (JSON) for ``navigator.credentials.create``.

        With ``ticket``: the challenge belongs to that pending sign-in (first-sign-in
        enrolment, see ``verify_enrolment``) rather than to the signed-in user.
        """
        with self.accounts.sessions() as s:
            user = self.accounts.require_user(s, user_name)
            existing = list(s.scalars(select(Passkey).where(Passkey.user_pk == user.pk)))
            if len(existing) >= MAX_PASSKEYS:
                raise PasskeyError(f"at most {MAX_PASSKEYS} passkeys per account")
            user_pk, name = user.pk, user.name
        from webauthn import generate_registration_options, options_to_json
        from webauthn.helpers.structs import (
            AuthenticatorSelectionCriteria,
            PublicKeyCredentialDescriptor,
            ResidentKeyRequirement,
            UserVerificationRequirement,
        )

        key = self._enrol_key(ticket) if ticket else self._register_key(name)
        challenge = self._put(key, user_pk, rp)
        options = generate_registration_options(
            rp_id=rp.id, rp_name=self.rp_name, user_name=name, user_display_name=name,
            user_id=hashlib.sha256(b"pacsvault-user:%d" % user_pk).digest(),
            challenge=challenge,
            authenticator_selection=AuthenticatorSelectionCriteria(
                resident_key=ResidentKeyRequirement.PREFERRED,
                user_verification=UserVerificationRequirement.PREFERRED),
            exclude_credentials=[
                PublicKeyCredentialDescriptor(id=p.credential_id,
                                              transports=_transports(p.transports))
                for p in existing],
        )
        return options_to_json(options)

    def verify_registration(self, user_name: str, rp: RelyingParty, credential: str,
                            label: str = "", *, address: str = "") -> PasskeyInfo:
        """Check the browser's answer to ``registration_options`` and store the passkey."""
        from webauthn import verify_registration_response
        from webauthn.helpers.exceptions import WebAuthnException

        norm = user_name.strip().lower()
        found = self._take(self._register_key(norm), rp)
        if found is None:
            raise PasskeyError("the passkey request has expired; try again")
        try:
            verified = verify_registration_response(
                credential=credential, expected_challenge=found.challenge,
                expected_rp_id=rp.id, expected_origin=rp.origin)
        except (WebAuthnException, ValueError, KeyError, TypeError):
            raise PasskeyError("the passkey could not be verified") from None
        transports = _registration_transports(credential)
        label = " ".join(label.split())[:MAX_LABEL] or "passkey"
        now = self._now()
        with self.accounts.transaction() as s:
            user = s.get(User, found.user_pk)
            if user is None or user.disabled or user.name != norm:
                raise PasskeyError("the passkey request has expired; try again")
            if s.scalar(select(Passkey).where(
                    Passkey.credential_id == verified.credential_id)) is not None:
                raise PasskeyError("this passkey is already registered")
            row = Passkey(user_pk=user.pk, credential_id=verified.credential_id,
                          public_key=verified.credential_public_key,
                          sign_count=verified.sign_count, transports=transports,
                          label=label, created=now)
            s.add(row)
            s.flush()
            info = PasskeyInfo(_key_id(row.credential_id), row.label, row.created, None)
            self._event("auth.passkey.added", norm, address, info.key_id)
        return info

    # --- enrolment (first sign-in: a passkey instead of the authenticator app) ----------

    def enrolment_options(self, ticket: str, address: str, rp: RelyingParty) -> str:
        """Registration options for the user of a pending sign-in who has no second factor
        yet (refused otherwise: a password alone never adds a factor to an enrolled
        account)."""
        name = self.accounts.pending_user(ticket, address)
        if not name:
            raise PasskeyError("the sign-in has expired; sign in again")
        with self.accounts.sessions() as s:
            user = self.accounts.require_user(s, name)
            if _has_second_factor(s, user):
                raise PasskeyError("a second factor is already enrolled for this account")
        return self.registration_options(name, rp, ticket=ticket)

    def verify_enrolment(self, ticket: str, address: str, rp: RelyingParty, credential: str,
                         label: str = "") -> AuthResult:
        """Check the browser's answer to ``enrolment_options``: the passkey becomes the
        account's second factor, recovery codes are issued (``recovery_codes``, shown once)
        and the sign-in completes (``auth.login`` with factor ``passkey``), exactly as a
        first TOTP code does. Failures count like a wrong code (same ticket, throttling)."""
        from webauthn import verify_registration_response
        from webauthn.helpers.exceptions import WebAuthnException

        found = self._take(self._enrol_key(ticket), rp)
        verified = None
        if found is not None:
            try:
                verified = verify_registration_response(
                    credential=credential, expected_challenge=found.challenge,
                    expected_rp_id=rp.id, expected_origin=rp.origin)
            except (WebAuthnException, ValueError, KeyError, TypeError):
                verified = None
        transports = _registration_transports(credential)
        label = " ".join(label.split())[:MAX_LABEL] or "passkey"
        now = self._now()
        issued: list[str] = []
        added: list[str] = []

        def check(s: Session, user: User) -> str:
            issued.clear()
            added.clear()
            if found is None or found.user_pk != user.pk:
                return "no-passkey-challenge"
            if verified is None:
                return "bad-passkey-registration"
            if _has_second_factor(s, user):
                return "already-enrolled"
            if s.scalar(select(Passkey).where(
                    Passkey.credential_id == verified.credential_id)) is not None:
                return "passkey-already-registered"
            row = Passkey(user_pk=user.pk, credential_id=verified.credential_id,
                          public_key=verified.credential_public_key,
                          sign_count=verified.sign_count, transports=transports,
                          label=label, created=now, last_used=now)
            s.add(row)
            if user.totp is not None:  # the QR code shown but never confirmed
                s.delete(user.totp)
            s.flush()
            added.append(_key_id(row.credential_id))
            issued.extend(totp_mod.issue_recovery_codes(
                s, user, self.accounts.recovery_hasher, now))
            return ""

        result = self.accounts.verify_other_factor(ticket, address, FACTOR, check)
        if result.outcome is not AuthOutcome.SUCCESS:
            return result
        self._event("auth.passkey.added", result.user, address, added[0])
        self.accounts.recorder.emit(AuditEvent(
            action="auth.second_factor.enrolled", outcome=Outcome.SUCCESS,
            code=EventCode.USER_AUTHENTICATION, actor_user=result.user, actor_address=address,
            detail={"factor": FACTOR, "recovery_codes": len(issued)}, time=self._now(),
        ))
        return replace(result, recovery_codes=tuple(issued), passkey_enrolled=True)

    def list_passkeys(self, user_name: str) -> list[PasskeyInfo]:
        with self.accounts.sessions() as s:
            user = self.accounts.require_user(s, user_name)
            rows = s.scalars(select(Passkey).where(Passkey.user_pk == user.pk)
                             .order_by(Passkey.created))
            return [PasskeyInfo(_key_id(p.credential_id), p.label, p.created, p.last_used)
                    for p in rows]

    def remove(self, user_name: str, key_id: str, *, address: str = "") -> bool:
        with self.accounts.transaction() as s:
            user = self.accounts.require_user(s, user_name)
            for row in s.scalars(select(Passkey).where(Passkey.user_pk == user.pk)):
                if _key_id(row.credential_id) == key_id:
                    s.delete(row)
                    self._event("auth.passkey.removed", user.name, address, key_id)
                    return True
        return False

    def _event(self, action: str, user: str, address: str, key_id: str) -> None:
        # Emitted through Accounts' recorder: inside a transaction, held until it commits.
        self.accounts.recorder.emit(AuditEvent(
            action=action, outcome=Outcome.SUCCESS, code=EventCode.SECURITY_ALERT,
            actor_user=user, actor_address=address, detail={"user": user, "passkey": key_id},
            time=self._now(),
        ))

    # --- sign-in (second factor, with a ticket) -------------------------------------------

    def authentication_options(self, ticket: str, address: str, rp: RelyingParty) -> str:
        """``PublicKeyCredentialRequestOptions`` (JSON) for ``navigator.credentials.get``,
        listing the ticket's user's passkeys; refused when the user has none."""
        from webauthn import generate_authentication_options, options_to_json
        from webauthn.helpers.structs import (
            PublicKeyCredentialDescriptor,
            UserVerificationRequirement,
        )

        name = self.accounts.pending_user(ticket, address)
        if not name:
            raise PasskeyError("the sign-in has expired; sign in again")
        with self.accounts.sessions() as s:
            user = self.accounts.find_user(s, name)
            rows = list(s.scalars(select(Passkey).where(Passkey.user_pk == user.pk))
                        ) if user is not None else []
            if user is None or not rows:
                raise PasskeyError("no passkey is registered for this account")
            allowed = [PublicKeyCredentialDescriptor(id=p.credential_id,
                                                     transports=_transports(p.transports))
                       for p in rows]
            user_pk = user.pk
        challenge = self._put(self._login_key(ticket), user_pk, rp)
        options = generate_authentication_options(
            rp_id=rp.id, challenge=challenge, allow_credentials=allowed,
            user_verification=UserVerificationRequirement.PREFERRED)
        return options_to_json(options)

    def verify_authentication(self, ticket: str, address: str, rp: RelyingParty,
                              credential: str) -> AuthResult:
        """Check an assertion; a valid one completes the sign-in (``auth.login``)."""
        from webauthn import verify_authentication_response
        from webauthn.helpers import parse_authentication_credential_json
        from webauthn.helpers.exceptions import InvalidJSONStructure, WebAuthnException

        found = self._take(self._login_key(ticket), rp)
        try:
            parsed = parse_authentication_credential_json(credential)
        except (InvalidJSONStructure, ValueError, KeyError, TypeError):
            parsed = None
        now = self._now()

        def check(s: Session, user: User) -> str:
            if found is None or found.user_pk != user.pk:
                return "no-passkey-challenge"
            if parsed is None:
                return "bad-passkey-response"
            row = s.scalar(select(Passkey).where(Passkey.user_pk == user.pk,
                                                 Passkey.credential_id == parsed.raw_id))
            if row is None:
                return "unknown-passkey"
            try:
                verified = verify_authentication_response(
                    credential=parsed, expected_challenge=found.challenge,
                    expected_rp_id=rp.id, expected_origin=rp.origin,
                    credential_public_key=row.public_key,
                    # the counter is checked below, so the trail can tell it apart
                    credential_current_sign_count=0)
            except (WebAuthnException, ValueError, KeyError, TypeError):
                return "bad-passkey-assertion"
            # A counter must increase, unless the authenticator keeps none (always 0): one
            # that does not is what a cloned authenticator looks like.
            if (verified.new_sign_count or row.sign_count) and \
                    verified.new_sign_count <= row.sign_count:
                return "passkey-sign-count"
            row.sign_count = verified.new_sign_count
            row.last_used = now
            return ""

        return self.accounts.verify_other_factor(ticket, address, FACTOR, check)


def _has_second_factor(s: Session, user: User) -> bool:
    if user.totp is not None and user.totp.confirmed:
        return True
    return s.scalar(select(Passkey.pk).where(Passkey.user_pk == user.pk).limit(1)) is not None


def _registration_transports(credential: str) -> str:
    """The transports the browser reported (``response.transports``), known ones only."""
    try:
        body = json.loads(credential)
        given = body.get("response", {}).get("transports", [])
    except (ValueError, AttributeError):
        return ""
    from webauthn.helpers.structs import AuthenticatorTransport

    known = {t.value for t in AuthenticatorTransport}
    if not isinstance(given, list):
        return ""
    return ",".join(t for t in given if isinstance(t, str) and t in known)[:128]
