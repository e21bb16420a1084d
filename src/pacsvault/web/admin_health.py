"""The health panel: ``/admin/health``, what ``pacsvault status`` says and a bit more.

The report is gathered by ``pacsvault.status`` (the same one ``pacsvault status`` prints);
this module only renders it, with the parts a page view asks for:

* listeners: the DICOM plain and TLS ports and the HTTPS port of the running server
  (``serve.json``), each checked for a listening socket (``/proc/net/tcp*``, no connection
  is made: a probe would be an association attempt in the logs);
* contents: patients, studies, series, instances (index counts, nothing decrypted);
* storage: received bytes, the disk's free space and the ``min_free_mb`` reserve below which
  images are refused;
* certificates: the server's and the CA's expiry (and a configured ``[web] cert_file``),
  with a warning under ``EXPIRY_WARNING_DAYS``;
* the last security events of the audit trail (exposures, refused associations, locked
  accounts...): time, action, outcome, source, never the message or references, so no
  patient data;
* DICOM TLS downgrades: every node opted in to the retired AES TLS profile
  (``tls_profile = "legacy-aes"``), as a warning line: an exception granted to one old
  modality stays visible until it is withdrawn;
* the audit chain: ``AuditTrail.verify`` with signatures checked on the last
  ``VERIFY_TAIL`` records;
* backups (``backup/health.py``): per target the last good backup (time, age), the last
  restore drill (time, result) and the next run, red when failing, stale, never made or
  when the drill failed; no target at all is a warning that a disk failure loses everything;
* the deployment (issue 16, ``status.deployment``): the index (embedded SQLCipher or
  PostgreSQL ``host:port/db`` with its TLS mode, reachable or not, schema revision), the
  object store (local files or an S3 bucket at its endpoint, reachable or not), the last
  scrub and orphan sweep, the instances sharing the index with their last checkpoint; on
  a PostgreSQL index, what protects the data instead of ``pacsvault backup``;
* the security check (issue 18): one line from the last complete run (``check-state.json``:
  no check runs here), counts by severity and a link to the Security check page;
* the exposure banner (issue 19, ``alert_notices.exposure_banner``): red at the top for as
  long as the archive is open beyond the practice network, a switch was refused, or the
  settings file was edited behind the running server's back;
* the active sign-in blocks with their "lift" buttons: the same fragment and endpoint as the
  Users page (``blocks_section.html``, ``/admin/users/blocks/lift``: CSRF, admin, audited),
  so an administrator looking at the health of the archive sees a locked-out practice too.
"""

from __future__ import annotations

import datetime as dt
from typing import Annotated

from fastapi import APIRouter, Depends, Request
from starlette.responses import Response

from pacsvault.check.record import load_kept
from pacsvault.status import EXPIRY_WARNING_DAYS, gather
from pacsvault.status.text import size
from pacsvault.web.alert_notices import exposure_banner
from pacsvault.web.kit import PageRole
from pacsvault.web.kit import accounts_of as _accounts
from pacsvault.web.kit import page as _page
from pacsvault.web.kit import vault_of as _vault
from pacsvault.web.principal import Principal
from pacsvault.web.share_pages import active_shares

router = APIRouter()

AdminPage = Annotated[Principal, Depends(PageRole("admin"))]


@router.get("/admin/health")
def health_page(request: Request, principal: AdminPage) -> Response:
    vault = _vault(request)
    report = gather(vault, now=dt.datetime.now(dt.UTC), probe=True,
                    listeners_for=request.url.port, check_audit=True)
    return _page(request, "admin_health.html", nav="admin", admin_nav="health",
                 listeners=report.listeners, bind=str(report.server.get("bind", "")),
                 ae_title=report.ae_title, counts=report.counts, storage=report.storage,
                 size=size, certificates=report.certificates,
                 warning_days=EXPIRY_WARNING_DAYS, events=report.security_events,
                 verdict=report.audit, nodes=len(report.nodes),
                 legacy_tls=report.legacy_tls_nodes, key=report.key,
                 blocks=_accounts(request).blocks(), blocks_back="/admin/health",
                 shares=active_shares(request),  # share links (issue 19)
                 backup=report.backup, deployment=report.deployment,
                 check=load_kept(vault.layout.root),
                 exposure=exposure_banner(vault.layout.root))
