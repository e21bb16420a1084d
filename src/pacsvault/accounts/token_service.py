"""API tokens on the service side: issuing, listing and revoking them (with their
administration events), and checking a bearer token under the address's throttling.

The token format, its storage (SHA-256 of the secret) and the constant-time lookup are in
``tokens``; this module adds the policy around them, shared by the CLI (``token``
commands) and the web layer (DICOMweb bearer tokens).

The policy (issue 19: tokens that cannot outlive their purpose) comes from the settings at
each call (``TokenPolicy.from_settings``, installed by the vault with ``use_token_policy``),
so a reload applies at once:
- lifetime: ``[tokens] default_days`` when none is asked, at most ``max_days``;
- idle expiry: unused for ``idle_days``, a token stops working;
- network: a token bound to a network (``--from``) is refused from outside it; every token
  is refused outside the trusted networks unless it was made ``--remote`` *and* internet
  mode is on (turning internet mode off cuts remote tokens too). A refusal is recorded.
  So a ``--from`` network wholly outside the trusted networks, without ``--remote``, makes
  a token no address can use: refused at creation, naming the rule;
- a use from an address the token was never used from is an audit event
  (``token.new-address``): a token copied to another machine shows in the trail.

``Accounts`` made without a vault (unit tests of this layer) have no practice-network rule:
the vault always installs one.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
from collections.abc import Callable
from dataclasses import dataclass

from sqlalchemy import Engine, select
from sqlalchemy.orm import Session

from pacsvault.accounts import token_check, tokens
from pacsvault.accounts.core import AccountError, AccountsCore, retry_on_conflict
from pacsvault.accounts.models import ApiToken, ApiTokenSource
from pacsvault.accounts.throttle import Decision, Source
from pacsvault.audit.events import AuditEvent, EventCode, Outcome
from pacsvault.config import IPNetwork, Settings, peer_ip
from pacsvault.config.tokens import TokenSettings
from pacsvault.index.rawselect import read_would_wait

NEW_ADDRESS = "token.new-address"

# last_used is a write per request otherwise; a minute's precision is enough to spot a
# token still in use.
LAST_USED_PRECISION = dt.timedelta(minutes=1)


@dataclass(frozen=True)
class TokenPolicy:
    """What the settings say about tokens. ``trusted``: the practice-network rule (None:
    none, only for ``Accounts`` made without a vault); ``trusted_networks``: the same rule
    as networks, to tell at creation whether a ``--from`` network can ever pass it (None:
    not checked); ``internet``: remote access is on."""

    default_lifetime: dt.timedelta = dt.timedelta(days=30)
    max_lifetime: dt.timedelta = dt.timedelta(days=90)
    idle: dt.timedelta = dt.timedelta(days=30)
    trusted: Callable[[str], bool] | None = None
    internet: bool = False
    trusted_networks: tuple[IPNetwork, ...] | None = None

    @classmethod
    def from_settings(cls, settings: Settings) -> TokenPolicy:
        t: TokenSettings = settings.tokens
        return cls(dt.timedelta(days=t.default_days), dt.timedelta(days=t.max_days),
                   dt.timedelta(days=t.idle_days), settings.is_trusted,
                   settings.web.remote_access == "internet",
                   tuple(settings.dicom.trusted_networks))


@dataclass(frozen=True)
class TokenInfo:
    token_id: str
    user: str
    label: str
    created: dt.datetime
    expires: dt.datetime
    revoked: dt.datetime | None
    last_used: dt.datetime | None
    last_address: str = ""
    source_network: str = ""
    remote: bool = False
    idle_expires: dt.datetime | None = None  # the idle clock's end if unused until then

    def status(self, now: dt.datetime) -> str:
        """"revoked", "expired", "idle" (unused too long) or "active"."""
        if self.revoked is not None:
            return "revoked"
        if self.expires <= now:
            return "expired"
        if self.idle_expires is not None and self.idle_expires <= now:
            return "idle"
        return "active"


def check_network(text: str) -> str:
    """``--from``: an IPv4/IPv6 network or address (a /32 or /128), normalised; else a
    user-facing ``AccountError``."""
    try:
        net = ipaddress.ip_network(text.strip(), strict=False)
    except ValueError:
        raise AccountError(f"--from {text!r} is not a network: give one like "
                           "192.168.1.0/24, or one address") from None
    return net.with_prefixlen


def unusable_network_error(network: str, policy: TokenPolicy) -> str | None:
    """Why a token bound to ``network`` and not ``--remote`` could never be used: no
    address of it is in the trusted networks, the only place a non-remote token is
    accepted from (None when some address is, or when the policy names no networks)."""
    if policy.trusted_networks is None:
        return None
    net = ipaddress.ip_network(network, strict=False)
    if any(net.version == t.version and net.overlaps(t) for t in policy.trusted_networks):
        return None
    return (f"--from {network} is outside the trusted networks ([dicom] trusted_networks): "
            "a token is accepted from outside them only if made --remote, while internet "
            "mode is on ([web] remote_access = \"internet\"), so this token could never be "
            "used; give a network inside them, or add --remote")


def _in_network(address: str, network: str) -> bool:
    ip = peer_ip(address)
    try:
        return ip is not None and ip in ipaddress.ip_network(network, strict=False)
    except ValueError:  # an unreadable stored network allows nothing
        return False


def _address_key(address: str) -> str:
    ip = peer_ip(address)
    return str(ip) if ip is not None else address[:64]


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

    _token_policy: Callable[[], TokenPolicy] | None = None

    def use_token_policy(self, source: Callable[[], TokenPolicy]) -> None:
        """Where the policy comes from (read at each call: a settings reload applies)."""
        self._token_policy = source

    def token_policy(self) -> TokenPolicy:
        return self._token_policy() if self._token_policy is not None else TokenPolicy()

    def create_token(self, name: str, expires: str | dt.timedelta | None = None, *,
                     label: str = "", by: str = "", address: str = "",
                     source_network: str = "", remote: bool = False) -> tokens.IssuedToken:
        """Issue a token. ``expires`` None: the policy's default. ``source_network``: the
        only network it may be used from. ``remote``: usable outside the trusted networks,
        which needs internet mode on now (and works only while it stays on)."""
        policy = self.token_policy()
        try:
            lifetime = (policy.default_lifetime if expires is None
                        else tokens.parse_expiry(expires) if isinstance(expires, str)
                        else expires)
        except tokens.TokenError as exc:
            raise AccountError(str(exc)) from None
        if lifetime > policy.max_lifetime:
            raise AccountError(tokens.lifetime_error(policy.max_lifetime.days))
        network = check_network(source_network) if source_network else ""
        if remote and not policy.internet:
            raise AccountError(
                "--remote needs internet mode ([web] remote_access = \"internet\"): without "
                "it no token is accepted from outside the practice network")
        unusable = unusable_network_error(network, policy) if network and not remote else None
        if unusable:
            raise AccountError(unusable)
        try:
            with self.transaction() as s:
                user = self.require_user(s, name)
                if user.disabled:
                    raise AccountError(f"user {user.name!r} is disabled")
                issued = tokens.create_token(s, user, lifetime, self._now(), label,
                                             source_network=network, remote=remote)
        except tokens.TokenError as exc:
            raise AccountError(str(exc)) from None
        detail: dict[str, str | int | bool] = {
            "user": issued.user, "token": issued.token_id,
            "expires": issued.expires.isoformat(timespec="seconds")}
        if network:
            detail["network"] = network
        if remote:
            detail["remote"] = True
        self._admin_event("token.create", by, address, detail)
        return issued

    def list_tokens(self, name: str | None = None) -> list[TokenInfo]:
        idle = self.token_policy().idle
        with self.sessions() as s:
            query = select(ApiToken).order_by(ApiToken.created)
            if name is not None:
                query = query.where(ApiToken.user_pk == self.require_user(s, name).pk)
            return [TokenInfo(t.token_id, t.user.name, t.label, t.created, t.expires,
                              t.revoked, t.last_used, t.last_address or "",
                              t.source_network or "", bool(t.remote),
                              tokens.idle_since(t) + idle)
                    for t in s.scalars(query)]

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
        The common case (valid, nothing to write or record) is settled by one read
        (``token_check``, issue 17); anything else takes the full check.
        """
        identity = self.quick_token(token, address)
        if identity is not None:
            return TokenResult(identity)
        return retry_on_conflict(lambda: self._check_token(token, address))

    def quick_token(self, token: str, address: str, *,
                    embedded_only: bool = False) -> tokens.TokenIdentity | None:
        """``verify_token``'s common case (valid, nothing to write or record) in one read
        (``token_check``); None: the caller takes the full check. ``embedded_only``: only
        on an embedded (SQLite) index, a local read of a few tens of microseconds: the web
        layer calls it on its event loop (issue 17: no thread hop per request), where a
        round trip to a database server must not wait, nor a checkout
        (``rawselect.read_would_wait``: None then, the full check runs in a worker)."""
        bind = self.sessions.kw.get("bind")
        if not isinstance(bind, Engine):
            return None
        if embedded_only and (bind.dialect.name != "sqlite" or read_would_wait(bind)):
            return None
        policy = self.token_policy()
        return token_check.quick_identity(
            bind, token, _address_key(address), self._now(), policy.idle,
            LAST_USED_PRECISION,
            lambda network, remote: self._refusal(network, remote, address, policy))

    def _check_token(self, token: str, address: str) -> TokenResult:
        """The token is looked up *before* the address's throttling: a valid token works
        from an address that someone else's guessing got blocked (160 random bits are not
        guessed, so checking one costs nothing worth protecting)."""
        now = self._now()
        source = Source.of(address)
        policy = self.token_policy()
        with self.transaction() as s:
            lookup = tokens.lookup_token(s, token, now, policy.idle)
            row = lookup.row
            owner = row.user.name if row is not None else ""
            if lookup.ok:
                assert row is not None
                refused = self._network_refusal(row, address, policy)
                if refused:
                    self.throttle.rejected(owner, address, reason=refused, factor="token")
                    return TokenResult(None, refused)
                self._record_use(s, row, address, now)
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

    @staticmethod
    def _network_refusal(row: ApiToken, address: str, policy: TokenPolicy) -> str:
        """"" when ``address`` may use the token; else the refusal's reason."""
        return TokenService._refusal(row.source_network, bool(row.remote), address, policy)

    @staticmethod
    def _refusal(source_network: str, remote: bool, address: str,
                 policy: TokenPolicy) -> str:
        if source_network and not _in_network(address, source_network):
            return "outside-token-network"
        if policy.trusted is not None and not policy.trusted(address) \
                and not (remote and policy.internet):
            return "outside-practice-network"
        return ""

    def _record_use(self, s: Session, row: ApiToken, address: str, now: dt.datetime) -> None:
        """Last use (to the minute) and its address; the idle clock restarts; an address
        never seen for this token is remembered and recorded (emitted after commit)."""
        if row.last_used is None or now - row.last_used >= LAST_USED_PRECISION:
            row.last_used = now
            row.active = now
        key = _address_key(address)
        if row.last_address == key:
            return
        row.last_address = key
        seen = s.scalar(select(ApiTokenSource.pk).where(ApiTokenSource.token_pk == row.pk,
                                                        ApiTokenSource.address == key))
        if seen is not None:
            return
        s.add(ApiTokenSource(token_pk=row.pk, address=key, first_seen=now))
        s.flush()  # a concurrent first use loses here, before any event (retried)
        self.recorder.emit(AuditEvent(
            action=NEW_ADDRESS, outcome=Outcome.SUCCESS, code=EventCode.SECURITY_ALERT,
            actor_user=row.user.name, actor_address=key, time=now,
            message=(f"API token {row.token_id} of {row.user.name} was used from {key}, an "
                     "address it had never been used from."),
            detail={"token": row.token_id, "user": row.user.name},
        ))
