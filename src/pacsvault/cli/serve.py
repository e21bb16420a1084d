"""``pacsvault serve``: run the listeners until SIGTERM/SIGINT."""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import signal
from pathlib import Path
from typing import Any

from pacsvault.audit import AuditEvent, EventCode, Outcome
from pacsvault.audit.alerts import AlertSink
from pacsvault.audit.watch import repair_at_start
from pacsvault.cli import exposure, serving, supervise, workers
from pacsvault.cli.common import (
    CommandError,
    add_data_args,
    data_dir,
    passphrase_source,
    say,
    setup_logging,
)
from pacsvault.cli.setup import init_vault
from pacsvault.crypto.keys import KeyUnavailable
from pacsvault.dicom.server import DicomService
from pacsvault.sealed import merge as sealed_merge
from pacsvault.service import bind as binding
from pacsvault.service import lock as instance_lock
from pacsvault.service.control import ControlServer
from pacsvault.service.ports import Listener, PortError, check_free
from pacsvault.storage.commit_link import CommitClient, CommitServer
from pacsvault.vault import META_NAME, Layout, Vault, VaultError, upgrade_without_asking
from pacsvault.web.app import create_app

log = logging.getLogger("pacsvault.serve")


def register(sub: Any) -> None:
    p = sub.add_parser("serve", help="run the archive (creates a vault on first run)")
    add_data_args(p)
    p.add_argument("--bind", type=binding.argument,
                   help="address to listen on, or 'private' (overrides pacsvault.toml)")
    p.add_argument("--dicom-port", type=int, help="plain DICOM port (0 = any free port)")
    p.add_argument("--dicom-tls-port", type=int, help="DICOM TLS port (0 = any free port)")
    p.add_argument("--https-port", type=int, help="HTTPS port (0 = any free port)")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    p.add_argument("--yes", action="store_true",
                   help="upgrade an older vault's index without asking (also "
                        "PACSVAULT_UPGRADE=yes; without a terminal it is not asked)")
    p.add_argument("--allow-root", action="store_true",
                   help=f"run as root anyway (development only; also ${ALLOW_ROOT_ENV}=1)")
    p.add_argument("--workers", default=os.environ.get(WORKERS_ENV) or DEFAULT_WORKERS,
                   help="worker processes sharing the listeners (a number, or 'auto' = "
                        "one on the embedded index, the machine's cores on PostgreSQL; "
                        f"default ${WORKERS_ENV}, else "
                        f"{DEFAULT_WORKERS}); a sealed start runs one")
    # Set by the parent of ``--workers N`` for each worker (cli/workers), never by hand.
    for hidden in ("--worker-index", "--ready-fd", "--passphrase-fd"):
        p.add_argument(hidden, type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--worker-fds", default=None, help=argparse.SUPPRESS)
    p.set_defaults(func=cmd_serve)


DEFAULT_WORKERS = "auto"  # cli/workers.count: 1 embedded, the cores on PostgreSQL
WORKERS_ENV = "PACSVAULT_WORKERS"  # the test harness sets 1: one process, deterministic


ALLOW_ROOT_ENV = "PACSVAULT_ALLOW_ROOT"


def _refuse_root(args: argparse.Namespace) -> None:
    """The server parses untrusted DICOM and HTTP: never as root (issue 12)."""
    if os.geteuid() != 0 or args.allow_root or os.environ.get(ALLOW_ROOT_ENV) == "1":
        return
    raise CommandError(
        "pacsvault serve refuses to run as root: it parses data from the network. Install "
        "it as a service ('pacsvault service install', then 'systemctl start pacsvault'), "
        "run scripts/serve.sh (which does that), or start it as an unprivileged user "
        "('runuser -u pacsvault -- pacsvault serve'). --allow-root is for development only."
    )


def _take_lock(root: Path) -> instance_lock.InstanceLock:
    """The vault's single-instance lock, before anything in it is read or changed.

    A non-empty directory that is not a vault is refused first, without creating the lock
    file in it; a missing directory is created (0700) for the first run's vault.
    """
    layout = Layout(root)
    if not layout.is_empty() and not layout.meta.exists():
        raise VaultError(f"no vault at {root} ({META_NAME} missing); create one with "
                         f"'pacsvault init --data {root}'")
    try:
        root.mkdir(parents=True, exist_ok=True, mode=0o700)
        return instance_lock.acquire(root)
    except OSError as exc:
        raise CommandError(f"cannot lock {layout.lock}: {exc.strerror or exc} (the data "
                           "directory must belong to the user running the server)") from None


def cmd_serve(args: argparse.Namespace) -> int:
    setup_logging(args.verbose)
    _refuse_root(args)
    if args.worker_index is not None:  # one of ``--workers N``: the parent holds the lock
        return _serve_worker(args)
    workers.count(args.workers)  # a bad value is refused before anything happens
    root = data_dir(args, announce=False)
    made = not root.exists()
    try:
        held = _take_lock(root)
    except instance_lock.AlreadyRunning as exc:
        say(f"pacsvault: error: {exc}")
        return 1
    try:
        return _serve(args, root, held)
    finally:
        held.release()
        if made and Layout(root).is_empty():  # a first run that failed: leave nothing
            shutil.rmtree(root, ignore_errors=True)


def _shared_index(root: Path) -> bool:
    """Whether the vault's index is PostgreSQL (``--workers auto``: the cores there, one
    process on the embedded index), from its settings file alone (no key needed)."""
    from pacsvault import config

    try:
        return config.load(root).index.is_postgres
    except Exception:  # an unreadable settings file is reported where it is opened
        return False


def _check_ports(bind: str, plain: int | None, tls_port: int | None,
                 https_port: int | None) -> None:
    """Every port tried before anything starts: a busy one is one line, exit 2."""
    wanted = [
        Listener("DICOM TLS", tls_port, "--dicom-tls-port", "[dicom] tls_port")
        if tls_port is not None else None,
        Listener("plain DICOM", plain, "--dicom-port", "[dicom] port")
        if plain is not None else None,
        Listener("HTTPS", https_port, "--https-port", "[web] https_port")
        if https_port is not None else None,
    ]
    try:
        check_free(bind, [item for item in wanted if item is not None])
    except PortError as exc:
        raise CommandError(str(exc)) from None


def _serve(args: argparse.Namespace, root: Path,
           lock: instance_lock.InstanceLock | None = None) -> int:
    log.info("data directory %s", root)
    if Layout(root).is_empty():
        say(f"First run: no vault in {root}, creating one.")
        init_vault(root, args.key_file, "PACSVAULT", serving=True)
    # A protected key: --passphrase-file, the systemd credential or the terminal;
    # none of them -> keys.KeyUnavailable.
    source = passphrase_source(args)
    asked: list[str] = []  # the passphrase, when one was asked: piped to the workers

    def passphrase() -> str | None:
        value = source()
        if value is not None:
            asked.append(value)
        return value

    try:
        vault = Vault.open(root, args.key_file, passphrase=passphrase,
                           confirm=upgrade_without_asking if args.yes else None)
    except KeyUnavailable as exc:
        # Key medium absent or key locked: keep receiving, sealed (sealed/serve.py), in one
        # process (the unseal hands the key to that process only).
        from pacsvault.sealed.serve import serve_sealed

        if workers.count(args.workers, shared_index=_shared_index(root)) > 1:
            log.warning("sealed start: one process instead of --workers %s; restart the "
                        "server after the unseal to use every core", args.workers)
        return serve_sealed(args, root, str(exc), _check_ports)
    # The exposure switches checked against what was last applied (issue 19): a refused
    # widening runs with the previous values, recorded and alerted (cli/exposure).
    vault.settings, bind = exposure.guard(vault, args.bind)
    settings = vault.settings
    plain, tls_port, https_port = serving.listeners(args, settings)
    try:
        _check_ports(bind, plain, tls_port, https_port)
    except CommandError:
        vault.close()
        raise
    if sealed_merge.pending(root):  # a sealed run left journals: merge before recovery
        merged = sealed_merge.merge_all(vault)
        log.warning("sealed journals merged: %d object(s), %d event(s)", merged.stored,
                    merged.events)
    recovery = vault.archive.recover()
    if recovery.published or recovery.discarded:
        log.info("interrupted run settled: %d indexed object(s) completed, %d partial "
                 "write(s) that were never acknowledged removed",
                 recovery.published, recovery.discarded)
    total = workers.count(args.workers, shared_index=settings.index.is_postgres)
    if total > 1:
        return _supervise(args, root, vault, bind, (plain, tls_port, https_port), total,
                          asked[-1] if asked else None, lock)
    return _run(vault, bind, (plain, tls_port, https_port), bind_override=args.bind)


def _supervise(args: argparse.Namespace, root: Path, vault: Vault, bind: str,
               ports: tuple[int | None, int | None, int | None], total: int,
               passphrase: str | None, lock: instance_lock.InstanceLock | None) -> int:
    """``--workers N``: the once-per-vault start here (recovery done, the trail's tail
    repaired, the sockets bound), then N workers until SIGTERM/SIGINT (``cli/workers``),
    supervised by a lean image of this process (``cli/supervise``): the server stack
    imported for the start is not kept for the rest of the run."""
    repair_at_start(vault.audit)
    layout = vault.layout
    vault.close()  # each worker opens its own; the parent keeps only the lock
    stop = serving.stop_on_signals()
    # Root on a vault owned by another user (development only): cli.common gives what was
    # created back to that owner at exit (an atexit hook), which needs this image to the end.
    lean = lock is not None and not (os.geteuid() == 0 and root.stat().st_uid != 0)
    if lean:
        signal.pthread_sigmask(signal.SIG_BLOCK, supervise.SIGNALS)
    try:
        sockets, bound = workers.bind_listeners(bind, ports)
    except OSError as exc:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, supervise.SIGNALS)
        _check_ports(bind, *ports)  # names the port when it can
        raise CommandError(f"a listening port on {bind} could not be opened "
                           f"({exc.strerror or exc}); check --dicom-port, "
                           "--dicom-tls-port and --https-port. Nothing was started.") from None
    plan = supervise.Plan(state=str(layout.state), bind=bind,
                          addresses=binding.addresses(bind), bound=bound, total=total,
                          argv=workers.worker_argv(args, root, bind, total),
                          verbose=bool(args.verbose))
    if lean and lock is not None and not stop.is_set():
        try:
            supervise.become(plan, sockets, lock.fd, passphrase)  # returns only on failure
        except OSError as exc:
            log.warning("the lean supervisor could not start (%s): this process "
                        "supervises the workers", exc.strerror or exc)
    try:
        return supervise.run(plan, sockets, passphrase, stop)
    except workers.StartFailed as exc:
        raise CommandError(str(exc)) from None


def _serve_worker(args: argparse.Namespace) -> int:
    """One worker of ``--workers N``: the vault opened again (the parent's recovery is
    done), the inherited sockets served until SIGTERM/SIGINT or the parent's end."""
    root = Path(args.data)
    # Only a child of the process holding the vault's lock is a worker: the hidden options
    # typed by hand would otherwise serve a vault without its lock.
    try:
        instance_lock.acquire(root).release()
        holder: int | None = -1  # the lock was free: no parent serve
    except instance_lock.AlreadyRunning as exc:
        holder = exc.pid
    if holder not in (None, os.getppid()):
        raise CommandError("--worker-index is set by 'pacsvault serve --workers N' for its "
                           "own workers; run 'pacsvault serve'")
    role = workers.role_of(args)
    workers.log_as_worker(role.index)
    vault = Vault.open(root, args.key_file,
                       passphrase=workers.passphrase_from(args) or passphrase_source(args))
    plain, tls_port, https_port = (int(role.sockets[kind][0].getsockname()[1])
                                   if kind in role.sockets else None
                                   for kind in workers.KINDS)
    exposure.apply_decision(vault, args.bind)  # the parent's guard (issue 19)
    return _run(vault, args.bind, (plain, tls_port, https_port), role=role,
                bind_override=args.bind)


def _run(vault: Vault, bind: str, ports: tuple[int | None, int | None, int | None], *,
         role: workers.Role | None = None, bind_override: str | None = None) -> int:
    """Serve the open vault until SIGTERM/SIGINT: one process, or a worker (``role``):
    every worker serves the inherited sockets, worker 0 alone runs the background work."""
    settings = vault.settings
    plain, tls_port, https_port = ports
    primary = role is None or role.primary
    alerts = AlertSink(settings.alerts, vault.recorder, disk_path=vault.layout.objects,
                       patients_of=serving.patients_of(vault),
                       claim=serving.alert_claim(vault))  # one notice for all instances
    vault.recorder.add_sink(alerts)
    watch: exposure.Watch | None = None
    if primary:  # the guard's decision recorded and alerted, the settings file watched
        exposure.announce(vault)
        watch = exposure.Watch(vault, bind_override)
        watch.start()
    background = serving.Background()
    if role is None:
        repair_at_start(vault.audit)  # (the parent of --workers did it)
    if primary:
        background.watch(vault)  # the trail's tail checked, then watched
    service = DicomService(vault)
    stop = serving.stop_on_signals()
    if role is not None:
        service.worker = role.index
        role.watch_parent(stop)
    try:
        bound, web = serving.start_listeners(
            service, bind, (plain, tls_port, https_port), tls=vault.layout.tls,
            tls_password=vault.tls_password, web=settings.web,
            app=lambda: create_app(vault, vault.accounts),
            sockets=role.sockets if role is not None else None)
    except OSError as exc:
        # Taken between the check and now: what did start is stopped, leave as one line.
        if watch is not None:
            watch.stop()
        background.stop_watcher()
        alerts.close()
        vault.close()
        _check_ports(bind, plain, tls_port, https_port)  # names the port when it can
        raise CommandError(f"a listening port on {bind} could not be opened "
                           f"({exc.strerror or exc}); check --dicom-port, "
                           "--dicom-tls-port and --https-port. Nothing was started.") from None
    worker = {} if role is None else {"worker": role.index, "pid": os.getpid()}
    vault.recorder.emit(
        AuditEvent(action="application.start", outcome=Outcome.SUCCESS,
                   code=EventCode.APPLICATION_ACTIVITY, detail={**bound, **worker})
    )
    log.info("AE title %s; DICOM TLS on %s:%s", settings.server.ae_title, bind,
             bound.get("dicom_tls_port"))
    notice = exposure.addresses_notice(bind)  # where a wildcard bind listens (issue 19)
    if notice is not None and primary:
        log.warning("%s", notice)
    if "dicom_port" in bound:
        log.warning("plain DICOM on %s:%s is not encrypted: use it only for legacy "
                    "modalities on the practice network", bind, bound["dicom_port"])
    if not vault.nodes.all() and primary:
        log.warning("no node is registered yet, so every association will be refused; "
                    "register your modality with 'pacsvault node add'")
    # One committer for every worker on the embedded index (``storage.commit_link``):
    # worker 0 serves it, the others hand it their stores' rows.
    linked = role is not None and role.total > 1 and not settings.index.is_postgres
    committer: CommitServer | None = None
    if linked and primary:
        archive = vault.archive
        committer = CommitServer(vault.layout.root, archive.commit_pending,
                                 archive.removal_generation)
        committer.start()
    elif linked:
        vault.archive.link = CommitClient(vault.layout.root)
    control: ControlServer | None = None
    if role is None:
        serving.write_state(vault.layout, {"pid": os.getpid(), "bind": bind,
                                           "addresses": binding.addresses(bind), **bound})
    if primary:
        background.run_jobs(vault)
        # CLI -> this server (unseal, online key rotation): features register commands.
        control = ControlServer(vault.layout.root)
        control.register("unseal", lambda _args: {"already": True})  # not sealed
        from pacsvault.crypto.rotation import control_handler  # online key rotation

        rotate = control_handler(vault)
        if role is not None and role.total > 1:  # the others stopped for it, then back
            rotate = workers.rotation_alone(role, vault.layout.state, rotate)
        control.register("rotate", rotate)
        from pacsvault.storage.erasure import FORGET_COMMAND, forget_handler  # CLI erasures

        control.register(FORGET_COMMAND, forget_handler(vault))
        control.start()
    if role is not None:
        role.ready()
    try:
        if primary:
            # the vault is there from the start: nothing more to begin once it is taken
            serving.run_until_stopped(stop, lambda: vault, lambda _vault: None)
        else:
            while not stop.wait(0.5):  # short waits: see run_until_stopped
                pass
    finally:
        if watch is not None:
            watch.stop()
        if control is not None:
            control.stop()
        background.stop_jobs()
        if role is None:
            vault.layout.state.unlink(missing_ok=True)
        if web is not None:
            web.stop()
        service.stop()
        if committer is not None:  # after this worker's own stores; others fall back
            committer.stop()
        vault.recorder.emit(
            AuditEvent(action="application.stop", outcome=Outcome.SUCCESS,
                       code=EventCode.APPLICATION_ACTIVITY)
        )
        background.stop_watcher()
        alerts.close()
        vault.close()
    return 0
