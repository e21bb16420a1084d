"""``pacsvault serve``: run the listeners until SIGTERM/SIGINT."""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import ssl
import threading
import time
from collections.abc import Callable, Iterable
from types import FrameType
from typing import Any

from sqlalchemy import select

from pacsvault.audit import AuditEvent, EventCode, Outcome
from pacsvault.audit.alerts import AlertSink
from pacsvault.audit.watch import TrailWatcher, repair_at_start
from pacsvault.cli.audit import purge_expired
from pacsvault.cli.common import add_data_args, data_dir, open_vault, say, setup_logging
from pacsvault.cli.setup import init_vault
from pacsvault.crypto.tls import server_context
from pacsvault.dicom.server import DicomService
from pacsvault.index.models import Study
from pacsvault.vault import Layout, Vault
from pacsvault.web.app import create_app
from pacsvault.web.limits import WebLimits
from pacsvault.web.server import WebService

log = logging.getLogger("pacsvault.serve")

RETENTION_CHECK_SECONDS = 6 * 3600
TAIL_CHECK_RECORDS = 1000


def register(sub: Any) -> None:
    p = sub.add_parser("serve", help="run the archive (creates a vault on first run)")
    add_data_args(p)
    p.add_argument("--bind", help="address to listen on (overrides pacsvault.toml)")
    p.add_argument("--dicom-port", type=int, help="plain DICOM port (0 = any free port)")
    p.add_argument("--dicom-tls-port", type=int, help="DICOM TLS port (0 = any free port)")
    p.add_argument("--https-port", type=int, help="HTTPS port (0 = any free port)")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    p.set_defaults(func=cmd_serve)


def _write_state(layout: Layout, state: dict[str, Any]) -> None:
    tmp = layout.state.with_suffix(".tmp")
    tmp.write_text(json.dumps(state), "utf-8")
    os.replace(tmp, layout.state)


def _web_tls(vault: Vault) -> ssl.SSLContext:
    web = vault.settings.web
    ctx = server_context(vault.layout.tls, vault.tls_password())
    if web.cert_file:
        ctx.load_cert_chain(web.cert_file, web.key_file or None)
    return ctx


def _patients_of(vault: Vault) -> Callable[[Iterable[str]], set[str]]:
    """Study UIDs -> internal patient keys, so bulk-access counts patients without IDs."""

    def resolve(uids: Iterable[str]) -> set[str]:
        with vault.sessions() as session:
            return {str(pk) for pk in session.scalars(
                select(Study.patient_pk).where(Study.study_uid.in_(list(uids))))}

    return resolve


def _check_audit_trail(vault: Vault) -> None:
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


def cmd_serve(args: argparse.Namespace) -> int:
    setup_logging(args.verbose)
    root = data_dir(args)
    if Layout(root).is_empty():
        say(f"First run: no vault in {root}, creating one.")
        init_vault(root, args.key_file, "PACSVAULT", serving=True)
    vault = open_vault(args)
    settings = vault.settings
    recovery = vault.archive.recover()
    if recovery.published or recovery.discarded:
        log.info("interrupted run settled: %d indexed object(s) completed, %d partial "
                 "write(s) that were never acknowledged removed",
                 recovery.published, recovery.discarded)
    bind = args.bind or settings.server.bind
    plain = args.dicom_port if args.dicom_port is not None else (
        settings.dicom.port if settings.dicom.plain_enabled else None
    )
    tls_port = args.dicom_tls_port if args.dicom_tls_port is not None else (
        settings.dicom.tls_port
    )
    alerts = AlertSink(settings.alerts, vault.recorder, disk_path=vault.layout.objects,
                       patients_of=_patients_of(vault))
    vault.recorder.add_sink(alerts)
    repair_at_start(vault.audit)
    _check_audit_trail(vault)
    watcher = TrailWatcher(vault.audit, vault.recorder, settings.audit.check_seconds)
    watcher.start()
    service = DicomService(vault)
    stop = threading.Event()

    def _stop(signum: int, _frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    bound = service.start(bind, plain, tls_port)
    web: WebService | None = None
    if settings.web.enabled:
        web = WebService(create_app(vault, vault.accounts), _web_tls(vault),
                         WebLimits.from_settings(settings.web), service.refusals)
        https_port = args.https_port if args.https_port is not None else settings.web.https_port
        bound["https_port"] = web.start(bind, https_port)
    vault.recorder.emit(
        AuditEvent(action="application.start", outcome=Outcome.SUCCESS,
                   code=EventCode.APPLICATION_ACTIVITY, detail=dict(bound))
    )
    log.info("AE title %s; DICOM TLS on %s:%s", settings.server.ae_title, bind,
             bound.get("dicom_tls_port"))
    if "dicom_port" in bound:
        log.warning("plain DICOM on %s:%s is not encrypted: use it only for legacy "
                    "modalities on the practice network", bind, bound["dicom_port"])
    if not vault.nodes.all():
        log.warning("no node is registered yet, so every association will be refused; "
                    "register your modality with 'pacsvault node add'")
    _write_state(vault.layout, {"pid": os.getpid(), "bind": bind, **bound})
    try:
        # Short waits: a signal is handled only when the main thread runs Python code,
        # and the kernel may deliver it to a connection thread instead.
        next_purge = time.monotonic() + RETENTION_CHECK_SECONDS
        while not stop.wait(0.5):
            if time.monotonic() >= next_purge:
                purge_expired(vault)
                next_purge = time.monotonic() + RETENTION_CHECK_SECONDS
    finally:
        vault.layout.state.unlink(missing_ok=True)
        if web is not None:
            web.stop()
        service.stop()
        vault.recorder.emit(
            AuditEvent(action="application.stop", outcome=Outcome.SUCCESS,
                       code=EventCode.APPLICATION_ACTIVITY)
        )
        watcher.stop()
        alerts.close()
        vault.close()
    return 0
