"""The ASGI application: middlewares in a fixed order, then the routers.

Order matters: the trusted-network gate runs first (an outsider gets nothing, not even a
login page), then security headers (on every response, errors included), then sessions.
"""

from __future__ import annotations

from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import Request
from starlette.responses import Response

from pacsvault.accounts.passkeys import Passkeys, certificate_names
from pacsvault.accounts.service import Accounts
from pacsvault.audit import AuditUnavailable
from pacsvault.sealed import web as sealed_web
from pacsvault.vault import Vault
from pacsvault.web import (
    account,
    admin_api,
    admin_check,
    admin_erasure,
    admin_health,
    admin_nodes,
    admin_objects,
    admin_users,
    audit_page,
    breach_pages,
    deps,
    dicomweb,
    dicomweb_fast,
    gdpr_record,
    media_download,
    pages,
    passkey_routes,
    security,
    send_pages,
    share_pages,
    signin,
    study_actions,
    viewer,
)


def create_app(vault: Vault, accounts: Accounts) -> FastAPI:
    app = FastAPI(
        title="pacsvault",
        docs_url=None,
        redoc_url=None,
        openapi_url=None,  # served to admins only (see admin_api), never anonymously
    )
    app.state.vault = vault
    app.state.accounts = accounts
    app.state.passkeys = Passkeys(accounts)
    # The hosts a passkey may be bound to: the server certificate's names (and loopback).
    app.state.passkey_hosts = frozenset(certificate_names(vault.layout.tls.server_cert))
    app.include_router(dicomweb.router)
    # sign-in, account, user administration, admin API: one router each, in this order
    app.include_router(signin.router)
    app.include_router(account.router)
    app.include_router(admin_users.router)
    app.include_router(admin_api.router)
    app.include_router(passkey_routes.router)
    app.include_router(audit_page.router)
    app.include_router(admin_nodes.router)
    app.include_router(admin_health.router)
    app.include_router(admin_objects.router)
    # /unseal outside sealed mode: back to the sign-in page (sealed/web.py)
    app.include_router(sealed_web.normal_router)
    app.include_router(admin_erasure.router)
    app.include_router(breach_pages.router)  # the breach register (issue 18)
    app.include_router(admin_check.router)  # the security self-check (issue 18)
    app.include_router(gdpr_record.router)  # the record of processing (issue 19)
    app.include_router(share_pages.router)  # share links (issue 19)
    app.include_router(send_pages.router)  # "send to" a node (issue 20, part 5)
    app.include_router(media_download.router)  # patient CD / USB download (issue 20)
    app.include_router(study_actions.router)  # a study's actions from OHIF (issue 20)
    # Last: OHIF lives at / and answers its files through a catch-all route.
    app.include_router(viewer.router)
    # Innermost of the middlewares (added first): QIDO-RS searches without FastAPI routing.
    app.add_middleware(dicomweb_fast.SearchFastPath)
    security.install(app)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> Response:
        # Generic body: no stack trace, no version banner, nothing about the data.
        if 300 <= exc.status_code < 400:  # e.g. a page's "sign in first" redirect
            return Response(status_code=exc.status_code, headers=exc.headers)
        return pages.error_response(request.scope, exc.status_code, str(exc.detail),
                                    exc.headers)

    # Fail closed: an access whose record cannot be written is refused (503).
    app.add_exception_handler(AuditUnavailable, deps.audit_unavailable)

    @app.exception_handler(RequestValidationError)
    async def bad_request(request: Request, exc: RequestValidationError) -> Response:
        return pages.error_response(request.scope, 400, "invalid request")

    @app.exception_handler(Exception)
    async def server_error(request: Request, exc: Exception) -> Response:
        # Runs outside every middleware (Starlette's outermost layer): add the headers here.
        return pages.error_response(request.scope, 500, "internal error", security.HEADERS)

    return app
