"""API tokens on the service side: issuing, listing and revoking them (with their
administration events), and checking a bearer token under the address's throttling.

The token format, its storage (SHA-256 of the secret) and the constant-time lookup are in
``tokens``; this module adds the policy around them, shared by the CLI (``token``
commands) and the web layer (DICOMweb bearer tokens).
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

from sqlalchemy import select

from pacsvault.accounts import tokens
from pacsvault.accounts.core import AccountError, AccountsCore, retry_on_conflict
from pacsvault.accounts.models import ApiToken
from pacsvault.accounts.throttle import Decision, Source

# last_used is a write per request otherwise; a minute's precision is enough to spot a
# token still in use.
LAST_USED_PRECISION = dt.timedelta(minutes=1)


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


class TokenService(AccountsCore):
    """API tokens: ``create_token``, ``list_tokens``, ``revoke_token``, ``verify_token``."""

    def create_token(self, name: str, expires: str | dt.timedelta = tokens.DEFAULT_EXPIRY, *,
                     label: str = "", by: str = "", address: str = "") -> tokens.IssuedToken:
        lifetime = tokens.parse_expiry(expires) if isinstance(expires, str) else expires
        try:
            with self.transaction() as s:
                user = self.require_user(s, name)
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
        with self.sessions() as s:
            query = select(ApiToken).order_by(ApiToken.created)
            if name is not None:
                query = query.where(ApiToken.user_pk == self.require_user(s, name).pk)
            return [TokenInfo(t.token_id, t.user.name, t.label, t.created, t.expires,
                              t.revoked, t.last_used) for t in s.scalars(query)]

    def revoke_token(self, token_id: str, *, by: str = "", address: str = "") -> bool:
        """Revoke by id (or full token). False when no such token; True if now revoked."""
        with self.transaction() as s:
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
        return retry_on_conflict(lambda: self._check_token(token, address))

    def _check_token(self, token: str, address: str) -> TokenResult:
        """The token is looked up *before* the address's throttling: a valid token works
        from an address that someone else's guessing got blocked (160 random bits are not
        guessed, so checking one costs nothing worth protecting)."""
        now = self._now()
        source = Source.of(address)
        with self.transaction() as s:
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
