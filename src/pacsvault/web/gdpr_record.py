"""The record of processing (GDPR art. 30) page: administrators (Administration, from the
practice network) and auditors (next to the audit trail) see this archive's entry as it is
configured now, and download it as PDF or Markdown, in French or English.

Two paths, one per role, rather than one page for "admin or auditor": every route declares
exactly one role (the route inventory test), and each role reaches it from its own menu.
Showing or downloading the entry is recorded (``gdpr.record.export``, ``via`` web).
"""

from __future__ import annotations

import datetime as dt
from typing import Annotated

from fastapi import APIRouter, Depends, Query, Request
from starlette.responses import Response

from pacsvault import gdpr
from pacsvault.documents import Fields, Heading, Paragraph, Table
from pacsvault.web import i18n
from pacsvault.web.deps import client_address
from pacsvault.web.kit import AdminPage, PageRole, page, vault_of
from pacsvault.web.principal import Principal

router = APIRouter()

AuditorPage = Annotated[Principal, Depends(PageRole("auditor"))]
ADMIN_PATH = "/admin/record-of-processing"
AUDITOR_PATH = "/audit/record-of-processing"
_MEDIA = {"md": "text/markdown; charset=utf-8", "pdf": "application/pdf"}


def _show(request: Request, principal: Principal, base: str, lang: str,
          fmt: str) -> Response:
    lang = lang if lang in gdpr.LANGUAGES else i18n.locale_for(request)
    lang = lang if lang in gdpr.LANGUAGES else "en"
    vault = vault_of(request)
    address = client_address(request)
    if fmt in gdpr.FORMATS:
        data = gdpr.export(vault, lang=lang, fmt=fmt, by=principal.user, address=address,
                           via="web")
        day = dt.datetime.now(dt.UTC).strftime("%Y%m%d")
        name = f"record-of-processing-{lang}-{day}.{fmt}"
        return Response(data, media_type=_MEDIA[fmt], headers={
            "content-disposition": f'attachment; filename="{name}"',
            "cache-control": "no-store"})
    doc = gdpr.build(vault, lang)
    gdpr.record(vault, lang=lang, fmt="html", by=principal.user, address=address, via="web")
    blocks = [(type(b).__name__.lower(), b) for b in doc.blocks
              if isinstance(b, Heading | Paragraph | Fields | Table)]
    admin = base == ADMIN_PATH
    return page(request, "gdpr_record.html", doc=doc, blocks=blocks, lang=lang, base=base,
                layout="admin_base.html" if admin else "base.html",
                admin_nav="record" if admin else None, nav="admin" if admin else "audit")


@router.get(ADMIN_PATH)
def admin_record(request: Request, principal: AdminPage,
                 lang: Annotated[str, Query(max_length=8)] = "",
                 format: Annotated[str, Query(max_length=8)] = "") -> Response:
    return _show(request, principal, ADMIN_PATH, lang, format)


@router.get(AUDITOR_PATH)
def auditor_record(request: Request, principal: AuditorPage,
                   lang: Annotated[str, Query(max_length=8)] = "",
                   format: Annotated[str, Query(max_length=8)] = "") -> Response:
    return _show(request, principal, AUDITOR_PATH, lang, format)
