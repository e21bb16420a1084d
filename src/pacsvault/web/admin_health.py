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
  so an administrator looking at the health of the archive sees a locked-out practice too;
* issue 20, item 7 (shows rather than lists): the active problems at the top in plain
  words with what to do (``status.problems``, ``web/health_problems``), charts drawn as SVG
  (``web/health_charts``: images per day and device, storage held with the day the disk
  fills at the last 30 days' pace, sign-ins and failures per day), each registered
  device's last contact and a "test connection" button (``POST /admin/health/echo``: CSRF,
  admin, a C-ECHO from ``dicom/echo``, audited as ``dicom.echo``), and the security events
  named in the reader's language (``web/audit_names``).
"""

from __future__ import annotations

import datetime as dt
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request
from starlette.responses import Response

from pacsvault.audit import AuditEvent, EventCode, Outcome
from pacsvault.check.record import load_kept
from pacsvault.dicom.echo import EchoResult, echo
from pacsvault.status import EXPIRY_WARNING_DAYS, gather
from pacsvault.status.problems import active_problems
from pacsvault.web.alert_notices import exposure_banner, reason_text
from pacsvault.web.audit_names import outcome_name
from pacsvault.web.deps import client_address
from pacsvault.web.formats import size_text
from pacsvault.web.health_charts import received_chart, series_of, sign_in_chart, storage_chart
from pacsvault.web.health_names import event_name
from pacsvault.web.health_problems import word
from pacsvault.web.i18n import locale_for
from pacsvault.web.kit import FormValue, PageRole, gettext, redirect
from pacsvault.web.kit import accounts_of as _accounts
from pacsvault.web.kit import page as _page
from pacsvault.web.kit import vault_of as _vault
from pacsvault.web.principal import Principal
from pacsvault.web.share_pages import active_shares

router = APIRouter()

AdminPage = Annotated[Principal, Depends(PageRole("admin"))]
# the last "test connection" of each device, per vault: (time, result), shown in its row
_echoes: dict[tuple[str, str], tuple[dt.datetime, EchoResult]] = {}


@router.get("/admin/health")
def health_page(request: Request, principal: AdminPage) -> Response:
    vault = _vault(request)
    now = dt.datetime.now(dt.UTC)
    report = gather(vault, now=now, probe=True,
                    listeners_for=request.url.port, check_audit=True)
    _ = gettext(request)
    lang = locale_for(request)
    check = load_kept(vault.layout.root)
    exposure = exposure_banner(vault.layout.root)
    if exposure:
        exposure["reasons"] = [reason_text(r, _) for r in exposure["reasons"]]
    problems = [word(p, _, lang) for p in active_problems(report, exposure, check, now)]
    figures = series_of(vault, report.counts.instances, report.counts.received_bytes, now)
    received, legend = received_chart(figures, _)
    full_on = figures.full_on(report.storage.free, report.storage.reserve)
    root = str(vault.layout.root)
    devices = [(n, figures.last_seen.get(n.ae_title), _echoes.get((root, n.ae_title)))
               for n in report.nodes]
    return _page(request, "admin_health.html", nav="admin", admin_nav="health",
                 listeners=report.listeners, bind=_bind_text(report.server),
                 ae_title=report.ae_title, counts=report.counts, storage=report.storage,
                 size=lambda value: size_text(value, lang),  # "10,5 Mo" in French
                 certificates=report.certificates,
                 warning_days=EXPIRY_WARNING_DAYS, events=report.security_events,
                 verdict=report.audit, nodes=len(report.nodes),
                 legacy_tls=report.legacy_tls_nodes, key=report.key,
                 blocks=_accounts(request).blocks(), blocks_back="/admin/health",
                 shares=active_shares(request),  # share links (issue 19)
                 backup=report.backup, deployment=report.deployment,
                 check=check, exposure=exposure,
                 problems=problems, chart_received=received, chart_legend=legend,
                 chart_storage=storage_chart(figures, _,
                                             size_text(max(figures.held, default=0), lang)),
                 chart_sign_ins=sign_in_chart(figures, _), figures=figures,
                 growth=figures.growth_per_day(), full_on=full_on, devices=devices,
                 event_name=lambda a: event_name(a, _),
                 outcome_name=lambda o: outcome_name(o, _))


@router.post("/admin/health/echo")
def health_echo(request: Request, principal: AdminPage, node: FormValue) -> Response:
    """C-ECHO to a registered device (CSRF-checked by the middleware), audited, then
    back to the page, whose device row shows the result."""
    vault = _vault(request)
    info = vault.nodes.get(node)
    if info is None:
        return redirect("/admin/health#devices")
    result = echo(vault, info)
    vault.recorder.emit(AuditEvent(
        action="dicom.echo", outcome=Outcome.SUCCESS if result.ok else Outcome.MINOR_FAILURE,
        code=EventCode.APPLICATION_ACTIVITY, actor_user=principal.user,
        actor_address=client_address(request),
        detail={"node": info.ae_title, "result": result.reason or "ok", "via": "web"}))
    _echoes[(str(vault.layout.root), info.ae_title)] = (dt.datetime.now(dt.UTC), result)
    return redirect("/admin/health#devices")


def _bind_text(server: dict[str, Any]) -> str:
    """The bind setting, and for ``private`` the addresses it listens on (issue 19)."""
    bind = str(server.get("bind", ""))
    listening = server.get("addresses")
    if isinstance(listening, list) and listening and [bind] != listening:
        return f"{bind}: {', '.join(str(a) for a in listening)}"
    return bind
