"""``serve`` when the master key is unavailable: start sealed, keep receiving, unseal live.

Same listeners, same ports, same association policy and TLS as a normal start (the policy
reads the signed node snapshot, TLS uses the listener keys' boot copy); C-ECHO and C-STORE
work, C-FIND/C-MOVE/C-GET get the sealed status, HTTPS serves only ``/unseal``. The alert
sink (mail/webhook) and the plain log work as usual: an exposure is alerted while sealed.
``pacsvault unseal`` (control socket) or the page switches everything to normal service;
the trail watcher, background jobs and retention purge start then.
"""

from __future__ import annotations

import argparse
import logging
import os
import ssl
import threading
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, cast

from fastapi import FastAPI

from pacsvault import config
from pacsvault.audit import AuditEvent, EventCode, Outcome
from pacsvault.audit.alerts import AlertSink
from pacsvault.cli import exposure, serving
from pacsvault.cli.common import CommandError
from pacsvault.crypto.tls import server_context
from pacsvault.dicom.server import DicomService
from pacsvault.sealed import material
from pacsvault.sealed.runtime import SealedRuntime, UnsealError
from pacsvault.sealed.web import SwitchApp, create_sealed_app
from pacsvault.service.bind import addresses
from pacsvault.service.control import ControlError, ControlServer
from pacsvault.vault import Layout, Vault, resolve_key_path

log = logging.getLogger("pacsvault.serve")

# the `serve` command's port check: (bind, plain, DICOM TLS, HTTPS); raises CommandError
PortCheck = Callable[[str, int | None, int | None, int | None], None]


def serve_sealed(args: argparse.Namespace, root: Path, reason: str,
                 check_ports: PortCheck) -> int:
    """Serve sealed until SIGTERM/SIGINT. ``check_ports``: the ``serve`` command's check
    of every port before anything starts (one line naming a busy one)."""
    layout = Layout(root)
    # No widening of the exposure while sealed (issue 19, cli/exposure.sealed_start).
    settings, bind, refused = exposure.sealed_start(root, config.load(root), args.bind)
    key_path = resolve_key_path(layout, settings, args.key_file)
    try:
        runtime = SealedRuntime(root, settings, key_path)
    except material.SealedUnavailable as exc:
        raise CommandError(f"{reason} ({exc})") from None
    plain, tls_port, https_port = serving.listeners(args, settings)
    check_ports(bind, plain, tls_port, https_port)
    if (tls_port is not None or https_port is not None) and not _tls_usable(runtime):
        log.critical("SEALED: the listener TLS keys' boot copy cannot be used (boot secret "
                     "%s missing or not the one of DATA/sealed/tls): the DICOM TLS and HTTPS "
                     "ports stay closed until the archive is unsealed and restarted",
                     material.boot_secret_path(key_path))
        tls_port = https_port = None
    recorder = runtime.recorder

    def patients_of(uids: Iterable[str]) -> set[str]:
        vault = runtime.vault
        return serving.patients_of(vault)(uids) if vault is not None else set()

    alerts = AlertSink(settings.alerts, recorder, disk_path=layout.objects,
                       patients_of=patients_of)
    recorder.add_sink(alerts)
    if refused is not None:
        recorder.emit(refused, required=False)
    if runtime.snapshot_problem:
        recorder.emit(AuditEvent(
            action="sealed.snapshot", outcome=Outcome.MAJOR_FAILURE,
            code=EventCode.SECURITY_ALERT,
            message=f"{runtime.snapshot_problem}; every association is refused until the "
            "archive is unsealed"), required=False)
    service = DicomService(cast(Vault, runtime.view))
    service.sealed = True
    stop = serving.stop_on_signals()
    switch = SwitchApp(create_sealed_app(runtime))
    try:
        bound, web = serving.start_listeners(
            service, bind, (plain, tls_port, https_port), tls=runtime.view.layout.tls,
            tls_password=runtime.view.tls_password, web=settings.web,
            app=lambda: cast(FastAPI, switch))
    except OSError as exc:
        alerts.close()
        raise CommandError(f"a listening port on {bind} could not be opened "
                           f"({exc.strerror or exc}); nothing was started") from None
    unsealed = threading.Event()
    control = ControlServer(root)

    def on_unsealed(vault: Vault) -> None:
        from pacsvault.crypto.rotation import control_handler
        from pacsvault.web.app import create_app

        service.unseal(vault)
        if web is not None:
            switch.app = create_app(vault, vault.accounts)
        control.register("rotate", control_handler(vault))  # as a normal start does
        unsealed.set()

    runtime.on_unsealed.append(on_unsealed)
    recorder.emit(AuditEvent(
        action="application.start", outcome=Outcome.SUCCESS,
        code=EventCode.APPLICATION_ACTIVITY, message="started sealed: the master key is "
        "unavailable; receiving only", detail={"sealed": True, **bound}), required=False)
    log.critical("ARCHIVE SEALED: %s. Images from registered devices are still received "
                 "and kept encrypted; queries, retrievals and the web pages are refused "
                 "until an administrator runs 'pacsvault unseal' or opens https://<this "
                 "server>:%s/unseal", reason, bound.get("https_port", "-"))
    state: dict[str, Any] = {"pid": os.getpid(), "bind": bind,
                             "addresses": addresses(bind), **bound}
    serving.write_state(layout, {**state, "sealed": True})

    def unseal_command(request: dict[str, Any]) -> dict[str, Any]:
        passphrase = request.get("passphrase")
        try:
            return runtime.unseal(passphrase if isinstance(passphrase, str) and passphrase
                                  else None, actor_user=str(request.get("user", ""))[:64],
                                  channel="cli")
        except UnsealError as exc:
            raise ControlError(str(exc)) from None

    control.register("unseal", unseal_command)
    control.start()
    background = serving.Background()

    def begin(vault: Vault) -> None:
        """Unsealed: what a normal start runs over the vault, and the state without
        ``sealed``."""
        background.watch(vault)
        background.run_jobs(vault)
        serving.write_state(layout, state)

    try:
        serving.run_until_stopped(
            stop, lambda: runtime.vault if unsealed.is_set() else None, begin)
    finally:
        control.stop()
        background.stop_jobs()
        layout.state.unlink(missing_ok=True)
        if web is not None:
            web.stop()
        service.stop()
        recorder.emit(AuditEvent(action="application.stop", outcome=Outcome.SUCCESS,
                                 code=EventCode.APPLICATION_ACTIVITY), required=False)
        background.stop_watcher()
        alerts.close()
        if runtime.vault is not None:
            runtime.vault.close()
        runtime.close()
    return 0


def _tls_usable(runtime: SealedRuntime) -> bool:
    try:
        server_context(runtime.view.layout.tls, runtime.view.tls_password())
    except (material.SealedUnavailable, ssl.SSLError, OSError, ValueError):
        return False
    return True
