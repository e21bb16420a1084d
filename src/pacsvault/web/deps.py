"""Route dependencies: authentication and role checks, deny by default.

Every route declares ``Depends(require_role(...))``; the route inventory test proves none
is left open. A browser session sets ``request.state.principal`` (session middleware);
a bearer token is looked up here, only where a route allows tokens.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from fastapi import HTTPException, Request
from starlette.concurrency import run_in_threadpool

from pacsvault.web.principal import Principal

BEARER = "bearer "


def client_address(request: Request) -> str:
    return request.client.host if request.client else ""


def require_role(
    role: str, *, allow_token: bool = False
) -> Callable[[Request], Awaitable[Principal]]:
    """A dependency that yields the principal or answers 401 (who?) / 403 (not allowed)."""

    async def dependency(request: Request) -> Principal:
        principal: Principal | None = getattr(request.state, "principal", None)
        header = request.headers.get("authorization", "")
        if principal is None and header.lower().startswith(BEARER):
            if not allow_token:
                raise HTTPException(401, "tokens are accepted on DICOMweb routes only")
            principal = await run_in_threadpool(
                _from_token, request, header[len(BEARER):].strip()
            )
        if principal is None:
            raise HTTPException(401, "authentication required",
                                headers={"WWW-Authenticate": "Bearer"})
        if principal.via_token and not allow_token:
            raise HTTPException(401, "tokens are accepted on DICOMweb routes only")
        if not principal.has(role):
            raise HTTPException(403, "not allowed for your role")
        request.state.principal = principal
        return principal

    return dependency


def _from_token(request: Request, token: str) -> Principal | None:
    accounts = request.app.state.accounts
    address = client_address(request)
    result = accounts.verify_token(token, address)
    if not result.ok or result.identity is None:
        return None
    identity = result.identity
    return Principal(user=identity.user, roles=frozenset(identity.roles), via_token=True,
                     address=address)
