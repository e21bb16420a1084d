"""What ``serve`` runs the same way with the key and without it (``sealed/serve.py``).

One main loop (``run_until_stopped``): it takes the vault when it becomes available (at
once for a normal start, at the unseal for a sealed one), starts the work over it once
(``Background``: audit trail check, trail watcher, background jobs) and purges expired
audit records every ``RETENTION_CHECK_SECONDS``. Also the pieces both starts share: the
listeners asked for, the HTTPS context, ``serve.json``, the signal handlers, the alert
sink's patient resolver. Kept apart from ``cli/serve`` so the sealed start does not
import the command that imports it.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import signal
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from types import FrameType
from typing import TYPE_CHECKING, Any

from sqlalchemy import select

from pacsvault.audit import AuditEvent, EventCode, Outcome
from pacsvault.audit.instances import CheckpointRunner
from pacsvault.audit.watch import TrailWatcher
from pacsvault.cli.audit import purge_expired
from pacsvault.crypto.tls import server_context
from pacsvault.index.models import Patient, Study
from pacsvault.service.jobs import JobRunner
from pacsvault.web.limits import WebLimits
from pacsvault.web.server import WebService

if TYPE_CHECKING:
    from fastapi import FastAPI

    from pacsvault.audit.alerts.findings import Alert
    from pacsvault.config import Settings, WebSettings
    from pacsvault.crypto.tls import TlsPaths
    from pacsvault.dicom.server import DicomService
    from pacsvault.vault import Layout, Vault

RETENTION_CHECK_SECONDS = 6 * 3600
TAIL_CHECK_RECORDS = 1000


def listeners(args: argparse.Namespace,
              settings: Settings) -> tuple[int | None, int | None, int | None]:
    """(plain DICOM, DICOM TLS, HTTPS) ports to open; None = that listener is off."""
    plain = args.dicom_port if args.dicom_port is not None else (
        settings.dicom.port if settings.dicom.plain_enabled else None
    )
    tls_port = args.dicom_tls_port if args.dicom_tls_port is not None else (
        settings.dicom.tls_port
    )
    https_port = None
    if settings.web.enabled:
        https_port = args.https_port if args.https_port is not None else settings.web.https_port
    return plain, tls_port, https_port


def web_tls(paths: TlsPaths, key_password: bytes, web: WebSettings) -> ssl.SSLContext:
    """The HTTPS listener's context: the vault's server certificates, and a configured
    ``[web] cert_file`` (a certificate the browsers already trust) when there is one."""
    ctx = server_context(paths, key_password)
    if web.cert_file:
        ctx.load_cert_chain(web.cert_file, web.key_file or None)
    return ctx


def start_listeners(service: DicomService, bind: str,
                    ports: tuple[int | None, int | None, int | None], *, tls: TlsPaths,
                    tls_password: Callable[[], bytes], web: WebSettings,
                    app: Callable[[], FastAPI],
                    sockets: Mapping[str, list[socket.socket]] | None = None,
                    ) -> tuple[dict[str, int], WebService | None]:
    """Open the DICOM listeners, then HTTPS when asked (``ports`` as ``listeners`` gives
    them); the ports bound and the web service. A port that cannot be opened (taken since
    the check) stops what did start and the ``OSError`` goes to the caller's message.
    ``sockets`` ("plain", "tls", "https"): listening sockets a ``serve --workers`` parent
    bound, served instead of binding (``cli/workers``)."""
    plain, tls_port, https_port = ports
    inherited = dict(sockets or {})
    web_service: WebService | None = None
    try:
        bound = service.start(bind, plain, tls_port, sockets=inherited)
        if https_port is not None:
            context = web_tls(tls, tls_password(), web)
            web_service = WebService(app(), context, WebLimits.from_settings(web),
                                     service.refusals,
                                     balancer=service.vault.settings.is_balancer)
            bound["https_port"] = web_service.start(bind, https_port, inherited.get("https"))
    except OSError:
        if web_service is not None:
            web_service.stop()
        service.stop()
        raise
    return bound, web_service


def write_state(layout: Layout, state: dict[str, Any]) -> None:
    tmp = layout.state.with_suffix(".tmp")
    tmp.write_text(json.dumps(state), "utf-8")
    os.replace(tmp, layout.state)


def patients_of(vault: Vault) -> Callable[[Iterable[str]], set[str]]:
    """Study UIDs -> their patients, so bulk access counts patients for events that name
    studies only. In the key space of the events' own ``patient_ids`` (the Patient ID),
    or a patient named both ways would be counted twice; the internal key only for a
    patient without an ID."""

    def resolve(uids: Iterable[str]) -> set[str]:
        with vault.sessions() as session:
            rows = session.execute(
                select(Patient.pk, Patient.patient_id)
                .join(Study, Study.patient_pk == Patient.pk)
                .where(Study.study_uid.in_(list(uids))))
            return {pid or f"pk:{pk}" for pk, pid in rows}

    return resolve


def alert_claim(vault: Vault) -> Callable[[Alert], bool]:
    """Instances sharing one index send each first alert notice once
    (``index.shared_state.claim_notice``, for the grouping window)."""
    from pacsvault.index.shared_state import claim_notice

    window = dt.timedelta(minutes=vault.settings.alerts.group_minutes)

    def claim(alert: Alert) -> bool:
        now = dt.datetime.now(dt.UTC)
        return claim_notice(vault.sessions, alert.rule, alert.subject, now, now + window)

    return claim


def check_audit_trail(vault: Vault) -> None:
    """Verify the trail's tail before serving; a break is a Security Alert, not a stop."""
    verdict = vault.audit.verify(tail=TAIL_CHECK_RECORDS)
    if not verdict.ok:
        vault.recorder.emit(AuditEvent(
            action="audit.verify", outcome=Outcome.MAJOR_FAILURE,
            code=EventCode.SECURITY_ALERT,
            message=f"the audit trail does not verify: {verdict.problem}. Run "
                    "'pacsvault audit verify' and keep a copy of the trail as evidence.",
        ))
    purge_expired(vault)


def stop_on_signals() -> threading.Event:
    """SIGTERM and SIGINT set the returned event (the main loop ends on it)."""
    stop = threading.Event()

    def _stop(signum: int, _frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    return stop


@dataclass
class Background:
    """The work over an open vault beside the listeners: the trail watcher (after the
    trail's tail is checked) and the background jobs."""

    watcher: TrailWatcher | None = None
    jobs: JobRunner | None = None
    checkpoints: CheckpointRunner | None = None

    def watch(self, vault: Vault) -> None:
        check_audit_trail(vault)
        self.watcher = TrailWatcher(vault.audit, vault.recorder,
                                    vault.settings.audit.check_seconds)
        self.watcher.start()
        # Several instances on a shared index witness each other's heads (a no-op on an
        # embedded index: one instance).
        self.checkpoints = CheckpointRunner(vault.audit, vault.settings.audit.checkpoint_seconds)
        self.checkpoints.start()

    def run_jobs(self, vault: Vault) -> None:
        self.jobs = JobRunner(vault)
        self.jobs.start()

    def stop_jobs(self) -> None:
        if self.jobs is not None:
            self.jobs.stop()

    def stop_watcher(self) -> None:
        if self.checkpoints is not None:
            self.checkpoints.stop()
        if self.watcher is not None:
            self.watcher.stop()


def run_until_stopped(stop: threading.Event, vault_of: Callable[[], Vault | None],
                      on_available: Callable[[Vault], None]) -> None:
    """The main thread until SIGTERM/SIGINT: ``on_available`` once, with the first vault
    ``vault_of`` returns, then the retention purge every ``RETENTION_CHECK_SECONDS``.

    Short waits: a signal is handled only when the main thread runs Python code, and the
    kernel may deliver it to a connection thread instead.
    """
    vault: Vault | None = None
    next_purge = 0.0
    while not stop.wait(0.5):
        if vault is None:
            vault = vault_of()
            if vault is None:
                continue
            on_available(vault)
            next_purge = time.monotonic() + RETENTION_CHECK_SECONDS
        elif time.monotonic() >= next_purge:
            purge_expired(vault)
            next_purge = time.monotonic() + RETENTION_CHECK_SECONDS
