"""The admin API besides DICOMweb: a JSON health probe and the OpenAPI document.

Both are for tools, not browsers (``kit.AdminApi``: a 401, never a sign-in redirect); the
app itself serves no anonymous ``/openapi.json`` or ``/docs`` (``app.create_app``).
"""

from __future__ import annotations

import copy

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from pacsvault import __version__
from pacsvault.web import pages
from pacsvault.web.kit import AdminApi, accounts_of, store_of

router = APIRouter()


@router.get("/health")
def health(request: Request, principal: AdminApi) -> JSONResponse:
    return JSONResponse({
        "status": "ok",
        "users": len(accounts_of(request).list_users()),
        "signed_in_sessions": store_of(request).signed_in_count(),
    })


@router.get("/admin/openapi.json")
def openapi(request: Request, principal: AdminApi) -> JSONResponse:
    """The OpenAPI document of every route but DICOMweb (PS3.18 documents those), for
    fuzzing; admins only (the app serves no anonymous /openapi.json or /docs)."""
    schema = copy.deepcopy(request.app.openapi())
    schema["info"]["version"] = __version__
    schema["paths"] = {path: item for path, item in schema.get("paths", {}).items()
                       if not path.startswith(pages.DICOMWEB_PREFIX)}
    return JSONResponse(schema)
