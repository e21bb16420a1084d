"""Route dependencies: authentication and role checks, deny by default.

Every route declares ``Depends(require_role(...))``; the route inventory test proves none
is left open (it finds the ``RoleRequirement`` in each route's dependencies). A browser
session sets ``request.state.principal`` (``sessions.SessionMiddleware``); a bearer token
is looked up here, only where a route allows tokens.

Administration (``require_role("admin")``) answers 403 to any source outside the trusted
networks, whatever the credentials: with ``remote_access = "internet"`` the sign-in page
and DICOMweb may be reached from outside, administration never is.
"""

from __future__ import annotations

import secrets
from typing import TYPE_CHECKING

from fastapi import HTTPException, Request
from starlette.concurrency import run_in_threadpool
from starlette.responses import Response

from pacsvault.audit import AuditEvent, EventCode, Outcome
from pacsvault.web.i18n import N_
from pacsvault.web.principal import Principal
from pacsvault.web.share_scope import share_principal

if TYPE_CHECKING:
    from pacsvault.accounts.tokens import TokenIdentity

BEARER = "bearer "
ADMIN = "admin"
TOKENS_DICOMWEB_ONLY = N_("API tokens are accepted on DICOMweb routes only.")
AUDIT_UNAVAILABLE = N_("The archive cannot record this access right now, so it is refused. "
                       "Please try again later or call your IT provider.")


def client_address(request: Request) -> str:
    return request.client.host if request.client else ""


class RoleRequirement:
    """The dependency ``require_role`` returns: yields the principal, or answers 401
    (who are you?) / 403 (not allowed). ``role`` None = any signed-in user."""

    def __init__(self, role: str | None, *, allow_token: bool = False,
                 allow_share: bool = False) -> None:
        self.role = role
        self.allow_token = allow_token
        # A share session (``share_scope``) is admitted only here, whatever ``role``,
        # and then only for its own study (``_scoped``); everywhere else it is no one.
        self.allow_share = allow_share

    def __repr__(self) -> str:
        return (f"RoleRequirement({self.role!r}, allow_token={self.allow_token}"
                f"{', allow_share=True' if self.allow_share else ''})")

    async def __call__(self, request: Request) -> Principal:
        address = client_address(request)
        if self.role == ADMIN and not request.app.state.vault.settings.is_trusted(address):
            await run_in_threadpool(_emit_outside, request, address)
            raise HTTPException(403, N_("Administration is only available from the "
                                   "practice network."))
        principal: Principal | None = getattr(request.state, "principal", None)
        header = request.headers.get("authorization", "")
        if principal is None and header.lower().startswith(BEARER):
            if not self.allow_token:
                raise HTTPException(401, TOKENS_DICOMWEB_ONLY)
            token = header[len(BEARER):].strip()
            # The common case settled on the event loop (one local read, nothing written:
            # ``quick_principal``); anything else, the full check in a worker thread.
            principal = quick_principal(request, token)
            if principal is None:
                principal = await run_in_threadpool(_from_token, request, token)
        if principal is None and self.allow_share:
            principal = await run_in_threadpool(share_principal, request)
            if principal is not None:
                request.state.principal = _scoped(request, principal)
                return principal
        if principal is None:
            raise HTTPException(401, N_("Please sign in."),
                                headers={"WWW-Authenticate": "Bearer"})
        if principal.via_token and not self.allow_token:
            raise HTTPException(401, TOKENS_DICOMWEB_ONLY)
        if self.role is not None and not principal.has(self.role):
            raise HTTPException(403, N_("Your role does not allow this."))
        request.state.principal = principal
        return principal


def require_role(role: str | None, *, allow_token: bool = False,
                 allow_share: bool = False) -> RoleRequirement:
    """A dependency that yields the principal or answers 401 / 403 (see ``RoleRequirement``)."""
    return RoleRequirement(role, allow_token=allow_token, allow_share=allow_share)


def _scoped(request: Request, principal: Principal) -> Principal:
    """A share session reaches its one study: a route naming another in its path is 404
    (as for a study that does not exist: nothing is confirmed). Routes without a study in
    their path confine their answer themselves (QIDO: ``dicomweb._search``)."""
    study = request.path_params.get("study")
    if study is not None and not secrets.compare_digest(
            str(study).encode("utf-8", "replace"), principal.study.encode("utf-8")):
        raise HTTPException(404, N_("Not found."))
    return principal


def quick_principal(request: Request, token: str) -> Principal | None:
    """The token's principal when ``Accounts.quick_token`` settles it on an embedded index:
    valid, used from this address less than a minute ago, nothing to write or record. One
    indexed read of the local SQLite index, on the event loop: a worker-thread hop costs
    more than the read (issue 17). The rules are the full check's, read at this very
    request (nothing cached: a revoked, expired, idle or disabled token, a changed role,
    a wrong address is seen at once). None: ``_from_token`` decides, in a worker thread;
    so does a request arriving while a read could wait (the index being re-keyed, no idle
    pooled connection: ``rawselect.read_would_wait``)."""
    address = client_address(request)
    identity = request.app.state.accounts.quick_token(token, address, embedded_only=True)
    return None if identity is None else _token_principal(identity, address)


def _from_token(request: Request, token: str) -> Principal | None:
    accounts = request.app.state.accounts
    address = client_address(request)
    result = accounts.verify_token(token, address)
    if not result.ok or result.identity is None:
        return None
    return _token_principal(result.identity, address)


def _token_principal(identity: TokenIdentity, address: str) -> Principal:
    return Principal(user=identity.user, roles=frozenset(identity.roles), via_token=True,
                     address=address, token_id=identity.token_id)


def _emit_outside(request: Request, address: str) -> None:
    principal: Principal | None = getattr(request.state, "principal", None)
    request.app.state.vault.recorder.emit(AuditEvent(
        action="web.admin.refused", outcome=Outcome.MINOR_FAILURE,
        code=EventCode.SECURITY_ALERT, actor_address=address,
        actor_user=principal.user if principal is not None else "",
        message=(f"An administration page was requested from {address}, outside the trusted "
                 "networks; administration is only available from the practice network."),
        detail={"reason": "outside-trusted-networks"},
    ))


async def audit_unavailable(request: Request, exc: Exception) -> Response:
    """503 for a request whose access record could not be made durable (``AuditUnavailable``
    from ``Recorder.emit``): every route records the access before its answer leaves, so
    refusing here means nothing was disclosed. The recorder has logged and alerted."""
    from pacsvault.web import pages  # pages imports this module

    return pages.error_response(request.scope, 503, AUDIT_UNAVAILABLE, {"Retry-After": "60"})
