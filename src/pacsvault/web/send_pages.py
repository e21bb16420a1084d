""""Send to" a registered node from the browser (issue 20, part 5), for physicians.

``/account/send`` shows the form (study, optional series, one of the nodes data may be
sent to: ``dicom/send.retrieval_nodes``) and the physician's recent transfers; a POST
(CSRF-checked by the middleware, like every form) starts the transfer in a background
thread and answers at once with a redirect to ``/account/send?job=ID``, which shows its
progress (the page refreshes itself while it runs) and result; ``/account/send/progress
?job=ID`` answers the same as JSON for a script. The transfer itself is ``dicom/send``'s:
audited (begin before anything leaves, outcome with counts) under the physician's name
and address.

Jobs live in memory (the last ``KEEP`` per server): a restart ends a transfer in flight,
whose audit record then says how far it went; it is the physician's to start again. A job
is shown to the user who started it only (an unknown or foreign job is a 404).
"""

from __future__ import annotations

import datetime as dt
import secrets
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Annotated, Any

from fastapi import APIRouter, Depends, HTTPException, Request
from starlette.responses import JSONResponse, Response

from pacsvault.dicom import send
from pacsvault.vault import Vault
from pacsvault.web.deps import client_address
from pacsvault.web.kit import FormValue, PageRole, gettext, page, redirect, vault_of
from pacsvault.web.principal import Principal

router = APIRouter()
Physician = Annotated[Principal, Depends(PageRole("physician"))]
KEEP = 50  # jobs remembered per server
MAX_RUNNING = 4  # transfers at once per server (each is one association)
NO_STORE = {"Cache-Control": "no-store"}


@dataclass
class SendJob:
    """One transfer started from the browser: what the page shows (no UID)."""

    job_id: str
    owner: str
    node: str
    total: int
    started: dt.datetime = field(default_factory=lambda: dt.datetime.now(dt.UTC))
    sent: int = 0
    warning: int = 0
    failed: int = 0
    converted: int = 0
    note: str = ""
    running: bool = True
    refused: str = ""

    @property
    def done(self) -> int:
        return self.sent + self.warning + self.failed

    def as_json(self) -> dict[str, Any]:
        return {"job": self.job_id, "node": self.node, "total": self.total,
                "sent": self.sent, "warning": self.warning, "failed": self.failed,
                "converted": self.converted, "running": self.running,
                "ok": not self.running and not self.failed and not self.note
                and not self.refused,
                "note": self.note or self.refused}


class SendJobs:
    """The server's transfers started from the browser (bounded, thread-safe)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._jobs: OrderedDict[str, SendJob] = OrderedDict()

    def running(self) -> int:
        with self._lock:
            return sum(1 for j in self._jobs.values() if j.running)

    def start(self, vault: Vault, owner: str, address: str, node: str,
              items: list[Any]) -> SendJob:
        job = SendJob(secrets.token_urlsafe(12), owner, node, len(items))
        with self._lock:
            self._jobs[job.job_id] = job
            while len(self._jobs) > KEEP:
                oldest = next(iter(self._jobs))
                if self._jobs[oldest].running:
                    break
                del self._jobs[oldest]
        threading.Thread(target=self._run, args=(vault, job, address, items),
                         name="pacsvault-send", daemon=True).start()
        return job

    def _run(self, vault: Vault, job: SendJob, address: str, items: list[Any]) -> None:
        def progress(entry: send.InstanceResult) -> None:
            with self._lock:
                if entry.outcome == send.SENT:
                    job.sent += 1
                elif entry.outcome == send.WARNING:
                    job.warning += 1
                else:
                    job.failed += 1
                job.converted += bool(entry.converted_to)

        try:
            result = send.send(vault, job.node, items, origin="web", actor_user=job.owner,
                               actor_address=address, progress=progress)
            with self._lock:
                job.note = result.note
        except send.SendRefused as exc:
            with self._lock:
                job.refused = str(exc)
        except Exception as exc:  # shown as a failed transfer; never kills the server
            with self._lock:
                job.note = type(exc).__name__
        finally:
            with self._lock:
                job.failed = max(job.failed, job.total - job.sent - job.warning)
                job.running = False

    def mine(self, owner: str) -> list[SendJob]:
        with self._lock:
            return [j for j in reversed(self._jobs.values()) if j.owner == owner]

    def get(self, job_id: str, owner: str) -> SendJob | None:
        with self._lock:
            job = self._jobs.get(job_id[:32])
        return job if job is not None and job.owner == owner else None


def jobs_of(request: Request) -> SendJobs:
    found: SendJobs | None = getattr(request.app.state, "send_jobs", None)
    if found is None:
        found = SendJobs()
        request.app.state.send_jobs = found
    return found


def send_page(request: Request, principal: Principal, status: int = 200, *,
              message: str = "", study: str = "", series: str = "",
              job: SendJob | None = None) -> Response:
    vault = vault_of(request)
    return page(request, "send.html", status, headers=NO_STORE,
                nodes=send.retrieval_nodes(vault), jobs=jobs_of(request).mine(principal.user),
                job=job, message=message, study=study, series=series, nav="account")


@router.get("/account/send")
def send_form(request: Request, principal: Physician, study: str = "", series: str = "",
              job: str = "") -> Response:
    found = jobs_of(request).get(job, principal.user) if job else None
    if job and found is None:
        raise HTTPException(404, "no such transfer")
    return send_page(request, principal, study=study[:128], series=series[:128], job=found)


@router.get("/account/send/progress")
def send_progress(request: Request, principal: Physician, job: str = "") -> Response:
    found = jobs_of(request).get(job, principal.user)
    if found is None:
        raise HTTPException(404, "no such transfer")
    return JSONResponse(found.as_json(), headers=NO_STORE)


@router.post("/account/send")
def send_start(request: Request, principal: Physician, study: FormValue = "",
               series: FormValue = "", node: FormValue = "") -> Response:
    _ = gettext(request)
    vault = vault_of(request)
    study, series, node = study.strip(), series.strip(), node.strip()
    jobs = jobs_of(request)
    if jobs.running() >= MAX_RUNNING:
        return send_page(request, principal, 429, study=study, series=series, message=_(
            "Several transfers are already running; try again when one has finished."))
    try:
        send.destination(vault, node, actor_user=principal.user,
                         actor_address=client_address(request))
    except send.SendRefused:
        return send_page(request, principal, 400, study=study, series=series, message=_(
            "This node may not receive images: choose one of the list."))
    items = send.select(vault, study, series or None) if study else []
    if not items:
        return send_page(request, principal, 400, study=study, series=series,
                         message=_("No study with this UID (or no such series in it)."))
    job = jobs.start(vault, principal.user, client_address(request), node, items)
    return redirect(f"/account/send?job={job.job_id}")
