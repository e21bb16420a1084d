"""Browser sessions: server-side, in the shared index, behind a ``__Host-`` cookie.

A session id is 256 random bits; the index keeps only its SHA-256 (the row's key), and the
session's secrets (CSRF token, sign-in ticket, recovery codes to show once) are sealed
under a key derived from the id (``index.shared_state``), so a database dump or a backup
hands out no live cookie and no token. The cookie is
``__Host-pvsession=<id>; Secure; HttpOnly; SameSite=Strict; Path=/`` with no ``Domain``
(which the ``__Host-`` prefix enforces in browsers) and no expiry (gone with the browser).

Why in the index and not in memory (issue 16, part 3): several ``serve`` instances behind
a load balancer share one index; a browser signed in through one is signed in on all, and
a sign-out, an expiry or an administrator's ``user disable`` on one ends it on all.

A session goes through three stages, and each step to the next one gets a **new id** (the
old one is dropped), so an id planted in a browser before sign-in is worthless after it:

* ``ANONYMOUS``: made by the sign-in form, holds only the CSRF token the form needs;
* ``PENDING``: the password was right; holds the ``Accounts`` ticket for the second factor;
* ``SIGNED_IN``: both factors were right; names the user.

Lifetimes: signed-in sessions end after ``idle`` without a request and in any case
``absolute`` after sign-in (``[web] session_idle_minutes`` / ``session_absolute_hours``);
anonymous and pending ones after ``PRE_AUTH_LIFETIME`` (the ticket's own lifetime). At most
``MAX_PRE_AUTH`` sessions that are not signed in are kept (the oldest go first), so loading
the sign-in page in a loop cannot fill the index. A request writes the session's
``last_seen`` only when it moved by ``TOUCH_PRECISION`` (1 s) or more: a viewer's burst of
frame requests is one write, and the idle end comes at most that much early.

Every signed-in request re-reads the account (disabled? roles? password changed since
sign-in?): ``pacsvault user disable`` or ``user reset`` in another process takes effect on
open sessions at the next request. A server restart no longer signs anybody out.

A route that changes a session in place (where the browser goes next, the recovery codes
shown once, the password-change time) calls ``SessionStore.save``.

``SessionMiddleware`` resolves the cookie on each request, puts the ``Principal`` in
``request.state.principal`` (what ``deps.require_role`` reads) and the session in
``request.state.web_session``, and enforces the CSRF rule of ``csrf``.
"""

from __future__ import annotations

import datetime as dt
import enum
import itertools
import json
import secrets
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, cast

from sqlalchemy import CursorResult, Executable, delete, func, select, update
from sqlalchemy.orm import Session, sessionmaker
from starlette.concurrency import run_in_threadpool
from starlette.requests import cookie_parser
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from pacsvault.accounts.models import User, UserPreference
from pacsvault.audit import AuditEvent, EventCode, Outcome
from pacsvault.index import shared_state as shared
from pacsvault.index.shared_state import WebSessionRow
from pacsvault.vault import Vault
from pacsvault.web import csrf
from pacsvault.web.asgi import HttpMiddleware, peer_address
from pacsvault.web.i18n import N_
from pacsvault.web.pages import error_response
from pacsvault.web.principal import Principal

COOKIE = "__Host-pvsession"
ID_BYTES = 32
PRE_AUTH_LIFETIME = dt.timedelta(minutes=10)
MAX_PRE_AUTH = 10_000
TOUCH_PRECISION = dt.timedelta(seconds=1)
_SWEEP_EVERY = 256  # signed-in sessions made by this process between sweeps
_PURPOSE = b"web-session"

Clock = Callable[[], dt.datetime]
FORM_EXPIRED = N_("This form has expired: reload the page and try again.")


class Stage(enum.Enum):
    ANONYMOUS = "anonymous"
    PENDING = "pending"
    SIGNED_IN = "signed-in"


@dataclass
class WebSession:
    key: bytes = field(repr=False)  # SHA-256 of the id
    stage: Stage
    csrf: str = field(repr=False)
    created: dt.datetime
    last_seen: dt.datetime
    address: str
    user: str = ""
    ticket: str = field(default="", repr=False)  # PENDING: the Accounts ticket
    enrolled: bool = False  # PENDING: the user already has a second factor
    password_changed: dt.datetime | None = None  # SIGNED_IN: as it was at sign-in
    # Where the browser was going when it was sent to sign in (a same-origin path, checked
    # by ``kit.safe_next``); carried from step to step, used once signed in.
    next: str = ""
    # SIGNED_IN, right after a passkey enrolment: the recovery codes to show once.
    fresh_codes: tuple[str, ...] = field(default=(), repr=False)
    # The key sealing this session's secrets in its row (derived from the id).
    box: bytes = field(default=b"", repr=False, compare=False)


def _key(session_id: str) -> bytes:
    return shared.digest(session_id)


def _micros(when: dt.datetime | None) -> int | None:
    return None if when is None else shared.to_micros(when)


def _sealed(session: WebSession) -> bytes:
    secrets_json = json.dumps({"csrf": session.csrf, "ticket": session.ticket,
                               "codes": list(session.fresh_codes)}).encode()
    return shared.seal(session.box, secrets_json, session.key)


def _session_of(row: WebSessionRow, box: bytes) -> WebSession | None:
    """The session a row holds, None when its secrets do not open with ``box`` (a row
    that was altered, or a digest collision: neither is a session)."""
    plain = shared.unseal(box, row.sealed, row.key)
    if plain is None:
        return None
    try:
        value = json.loads(plain)
        stage = Stage(row.stage)
    except ValueError:
        return None
    return WebSession(
        key=row.key, stage=stage, csrf=str(value.get("csrf", "")),
        created=shared.from_micros(row.created), last_seen=shared.from_micros(row.last_seen),
        address=row.address, user=row.user, ticket=str(value.get("ticket", "")),
        enrolled=bool(row.enrolled),
        password_changed=(None if row.password_changed is None
                          else shared.from_micros(row.password_changed)),
        next=row.next, fresh_codes=tuple(str(c) for c in value.get("codes", ())), box=box)


def _changed(s: Session, statement: Executable) -> int:
    """Run a DELETE/UPDATE; how many rows it changed."""
    result = cast(CursorResult[Any], s.execute(statement))
    return int(result.rowcount or 0)


class SessionStore:
    """Sessions in the index's ``web_sessions`` table (``index.shared_state``): every
    instance sharing the index sees the same ones. Thread-safe: each call is its own short
    transaction."""

    def __init__(self, idle: dt.timedelta, absolute: dt.timedelta, clock: Clock, *,
                 sessions: sessionmaker[Session],
                 pre_auth_lifetime: dt.timedelta = PRE_AUTH_LIFETIME,
                 max_pre_auth: int = MAX_PRE_AUTH) -> None:
        self.idle = idle
        self.absolute = absolute
        self.clock = clock
        self._sessions = sessions
        self._pre_auth_lifetime = pre_auth_lifetime
        self._max_pre_auth = max_pre_auth
        self._made = itertools.count(1)

    def _expired(self, session: WebSession, now: dt.datetime) -> str:
        """"" when alive, else "idle" or "absolute"."""
        if session.stage is Stage.SIGNED_IN:
            if now - session.created >= self.absolute:
                return "absolute"
            if now - session.last_seen >= self.idle:
                return "idle"
            return ""
        return "absolute" if now - session.created >= self._pre_auth_lifetime else ""

    def create(self, stage: Stage, address: str, *, user: str = "", ticket: str = "",
               enrolled: bool = False, password_changed: dt.datetime | None = None,
               next: str = "") -> tuple[str, WebSession]:
        """A new session with a fresh id and CSRF token; returns (cookie value, session)."""
        session_id = secrets.token_urlsafe(ID_BYTES)
        now = self.clock()
        session = WebSession(key=_key(session_id), stage=stage, csrf=csrf.new_token(),
                             created=now, last_seen=now, address=address, user=user,
                             ticket=ticket, enrolled=enrolled,
                             password_changed=password_changed, next=next,
                             box=shared.box_key(session_id, _PURPOSE))
        with self._sessions.begin() as s:
            s.add(WebSessionRow(
                key=session.key, stage=stage.value, user=user, address=address[:64],
                created=shared.to_micros(now), last_seen=shared.to_micros(now),
                enrolled=enrolled, password_changed=_micros(password_changed), next=next,
                sealed=_sealed(session)))
            s.flush()
            if stage is Stage.SIGNED_IN:
                if self._made.__next__() % _SWEEP_EVERY == 0:  # (``next`` is a parameter)
                    self._sweep(s, now)
            else:
                self._cap_pre_auth(s, now)
        return session_id, session

    def _cap_pre_auth(self, s: Session, now: dt.datetime) -> None:
        """Forget pre-auth sessions past their lifetime, then the oldest beyond the cap."""
        signed = Stage.SIGNED_IN.value
        s.execute(delete(WebSessionRow).where(
            WebSessionRow.stage != signed,
            WebSessionRow.created <= shared.to_micros(now - self._pre_auth_lifetime)))
        count = s.scalar(select(func.count()).select_from(WebSessionRow)
                         .where(WebSessionRow.stage != signed)) or 0
        if count > self._max_pre_auth:
            oldest = list(s.scalars(select(WebSessionRow.key)
                                    .where(WebSessionRow.stage != signed)
                                    .order_by(WebSessionRow.created)
                                    .limit(count - self._max_pre_auth)))
            s.execute(delete(WebSessionRow).where(WebSessionRow.key.in_(oldest)))

    def _sweep(self, s: Session, now: dt.datetime) -> None:
        s.execute(delete(WebSessionRow).where(
            WebSessionRow.stage == Stage.SIGNED_IN.value,
            (WebSessionRow.created <= shared.to_micros(now - self.absolute))
            | (WebSessionRow.last_seen <= shared.to_micros(now - self.idle))))

    def lookup(self, session_id: str) -> tuple[WebSession | None, WebSession | None]:
        """(live session, or None; the signed-in session that just expired, or None).

        A live signed-in session's idle timer restarts here. Of several instances finding
        the same session expired, one reports it (the one whose delete removed the row).
        """
        key = _key(session_id)
        now = self.clock()
        with self._sessions() as s:
            row = s.get(WebSessionRow, key)
            session = (_session_of(row, shared.box_key(session_id, _PURPOSE))
                       if row is not None else None)
        if session is None:
            return None, None
        if self._expired(session, now):
            if not self._remove(session) or session.stage is not Stage.SIGNED_IN:
                return None, None
            return None, session
        if session.stage is Stage.SIGNED_IN and now - session.last_seen >= TOUCH_PRECISION:
            with self._sessions.begin() as s:
                s.execute(update(WebSessionRow).where(
                    WebSessionRow.key == key,
                    WebSessionRow.last_seen < shared.to_micros(now),
                ).values(last_seen=shared.to_micros(now)))
            session.last_seen = now
        return session, None

    def expiry_reason(self, session: WebSession) -> str:
        return self._expired(session, self.clock()) or "idle"

    def _remove(self, session: WebSession) -> bool:
        """Delete the session's row; False when it was gone already."""
        with self._sessions.begin() as s:
            gone = _changed(s, delete(WebSessionRow).where(WebSessionRow.key == session.key))
        return bool(gone)

    def drop(self, session: WebSession) -> None:
        self._remove(session)

    def save(self, session: WebSession) -> None:
        """Write what a route changed in ``session`` (its stage, user, next path, codes to
        show once, password-change time), so the next request finds it on any instance.
        A session dropped meanwhile (signed out elsewhere) stays dropped."""
        with self._sessions.begin() as s:
            s.execute(update(WebSessionRow).where(WebSessionRow.key == session.key).values(
                stage=session.stage.value, user=session.user, enrolled=session.enrolled,
                password_changed=_micros(session.password_changed), next=session.next,
                sealed=_sealed(session)))

    def rotate(self, old: WebSession | None, stage: Stage, address: str, *, user: str = "",
               ticket: str = "", enrolled: bool = False,
               password_changed: dt.datetime | None = None) -> tuple[str, WebSession]:
        """Replace ``old`` (if any) by a new session under a new id (keeping where the
        browser was going)."""
        if old is not None:
            self.drop(old)
        return self.create(stage, address, user=user, ticket=ticket, enrolled=enrolled,
                           password_changed=password_changed,
                           next=old.next if old is not None else "")

    def drop_user(self, user: str, *, keep: WebSession | None = None) -> int:
        """End every signed-in session of ``user`` (except ``keep``); returns how many."""
        query = delete(WebSessionRow).where(WebSessionRow.user == user,
                                            WebSessionRow.stage == Stage.SIGNED_IN.value)
        if keep is not None:
            query = query.where(WebSessionRow.key != keep.key)
        with self._sessions.begin() as s:
            return _changed(s, query)

    def signed_in_count(self) -> int:
        now = self.clock()
        with self._sessions() as s:
            return int(s.scalar(select(func.count()).select_from(WebSessionRow).where(
                WebSessionRow.stage == Stage.SIGNED_IN.value,
                WebSessionRow.created > shared.to_micros(now - self.absolute),
                WebSessionRow.last_seen > shared.to_micros(now - self.idle))) or 0)


def cookie_header(session_id: str) -> str:
    """The Set-Cookie value for a session id (no expiry: a browser-session cookie)."""
    return f"{COOKIE}={session_id}; Path=/; Secure; HttpOnly; SameSite=Strict"


def clear_cookie_header() -> str:
    return f"{COOKIE}=; Path=/; Max-Age=0; Secure; HttpOnly; SameSite=Strict"


# The known-device cookie (``accounts.devices``): set after a full sign-in, kept across
# sign-outs, so the owner's browser is never blocked by someone else's guessing.
DEVICE_COOKIE = "__Host-pvdevice"
DEVICE_COOKIE_MAX_AGE = 180 * 24 * 3600


def device_cookie_header(value: str) -> str:
    return (f"{DEVICE_COOKIE}={value}; Path=/; Max-Age={DEVICE_COOKIE_MAX_AGE}; Secure; "
            "HttpOnly; SameSite=Strict")


def _cookie(scope: Scope) -> str:
    for key, value in scope.get("headers", []):
        if key.lower() == b"cookie":
            found = cookie_parser(bytes(value).decode("latin-1")).get(COOKIE, "")
            if found:
                return found
    return ""


@dataclass(frozen=True)
class AccountState:
    disabled: bool
    roles: frozenset[str]
    password_changed: dt.datetime
    language: str = ""  # the user's choice on the account page ("" = the browser's)


def account_state(vault: Vault, user: str) -> AccountState | None:
    """The parts of a user's row that decide whether a session may go on, and the user's
    language (one query per request)."""
    with vault.sessions() as s:
        row = s.execute(select(User.disabled, User.roles, User.password_changed,
                               UserPreference.language)
                        .outerjoin(UserPreference, UserPreference.user_pk == User.pk)
                        .where(User.name == user)).one_or_none()
    if row is None:
        return None
    return AccountState(bool(row[0]), frozenset(r for r in str(row[1]).split(",") if r),
                        row[2], str(row[3] or ""))


class SessionMiddleware(HttpMiddleware):
    """Resolve the session cookie; enforce CSRF on state-changing requests with a session.

    Pure ASGI (not ``BaseHTTPMiddleware``) so that it can read a form body and hand it on.
    """

    async def handle(self, scope: Scope, receive: Receive, send: Send) -> None:
        application = scope["app"]
        store: SessionStore = application.state.web_sessions
        vault = application.state.vault
        address = peer_address(scope)
        state = scope.setdefault("state", {})
        session: WebSession | None = None
        account: AccountState | None = None
        session_id = _cookie(scope)
        if session_id:
            session, expired, account = await run_in_threadpool(_resolve, store, vault,
                                                                session_id)
            if expired is not None:
                await run_in_threadpool(_emit_end, vault, expired, address,
                                        store.expiry_reason(expired))
        if session is not None and session.stage is Stage.SIGNED_IN:
            if (account is None or account.disabled
                    or account.password_changed != session.password_changed):
                await run_in_threadpool(_end_changed, store, vault, session, address)
                session = None
            else:
                state["principal"] = Principal(user=session.user, roles=account.roles,
                                               via_token=False, address=address)
                state["language"] = account.language
        if session is not None:
            state["web_session"] = session
            if csrf.is_unsafe(scope):
                try:
                    token, receive = await csrf.submitted_token(scope, receive)
                except csrf.FormTooLarge:
                    await _refuse(scope, receive, send, 413)
                    return
                if not csrf.matches(session.csrf, token):
                    await run_in_threadpool(_emit_csrf, vault, session, address,
                                            str(scope.get("path", "")), bool(token))
                    await _refuse(scope, receive, send, 403, FORM_EXPIRED)
                    return
        await self.app(scope, receive, send)


def _resolve(store: SessionStore, vault: Vault, session_id: str,
             ) -> tuple[WebSession | None, WebSession | None, AccountState | None]:
    """The cookie's session (``SessionStore.lookup``) and, when signed in, its account's
    state (``account_state``), both read at this request as before, in one worker-thread
    hop instead of two (issue 17: a viewer makes one request per frame)."""
    session, expired = store.lookup(session_id)
    signed_in = session is not None and session.stage is Stage.SIGNED_IN
    account = account_state(vault, session.user) if signed_in and session else None
    return session, expired, account


def _end_changed(store: SessionStore, vault: Vault, session: WebSession,
                 address: str) -> None:
    """A session whose account was disabled, removed or given a new password: gone, and
    recorded (its row deleted here, off the event loop)."""
    store.drop(session)
    _emit_end(vault, session, address, "account-changed")


async def _refuse(scope: Scope, receive: Receive, send: Send, status: int,
                  message: str = "") -> None:
    response: Response = error_response(scope, status, message)
    await response(scope, receive, send)


def _emit_end(vault: Vault, session: WebSession, address: str, reason: str) -> None:
    vault.recorder.emit(AuditEvent(
        action="auth.session.ended", outcome=Outcome.SUCCESS,
        code=EventCode.USER_AUTHENTICATION, actor_user=session.user, actor_address=address,
        detail={"reason": reason},
    ))


def _emit_csrf(vault: Vault, session: WebSession, address: str, path: str,
               present: bool) -> None:
    # Only the first path segment: DICOMweb paths carry UIDs, which logs must not.
    area = path.strip("/").split("/", 1)[0][:40] or "/"
    vault.recorder.emit(AuditEvent(
        action="web.csrf.refused", outcome=Outcome.MINOR_FAILURE,
        code=EventCode.SECURITY_ALERT, actor_user=session.user, actor_address=address,
        detail={"area": area, "token": "wrong" if present else "missing"},
    ))
