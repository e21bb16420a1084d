"""Gather the status report: one typed structure for ``pacsvault status`` and the Health page.

The two used to be separate implementations of the same report (issue 15): each read the
server's ``serve.json``, the index counts, the node registry, the certificates, the key's
protection and the backup state its own way. Both now render what ``gather`` returns;
the page only asks for the parts that cost more (listener probes, the audit chain's
check, the latest security events) and the command for the size of the encrypted objects
on disk (a walk of ``objects/`` the page must not pay at every view).

Nothing here decrypts an image or writes anything: counts come from the index, the backup
verdict from the state file (``backup.health``), the key's protection from the key file's
header (``crypto.protection.describe``), certificates are parsed, listening sockets are
read from ``/proc/net/tcp*`` (no connection, which would be an association attempt in the
logs). Security events are the readable fields of the trail's last records (time, action,
outcome, actor, address): never the message, the details or references, so no patient
data.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import shutil
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pacsvault.audit.events import EventCode
from pacsvault.backup.health import BackupHealth, backup_health
from pacsvault.crypto.protection import describe
from pacsvault.crypto.tls import ca_is_name_constrained, certificate_expiry
from pacsvault.index import stats
from pacsvault.status.deployment import Deployment, deployment

if TYPE_CHECKING:
    from pacsvault.audit.trail import Verdict
    from pacsvault.index.nodes import NodeInfo
    from pacsvault.vault import Layout, Vault

EXPIRY_WARNING_DAYS = 30
VERIFY_TAIL = 1000
SECURITY_EVENTS = 20
LISTEN = "0A"  # TCP state "listen" in /proc/net/tcp


@dataclass(frozen=True)
class Listener:
    kind: str  # "dicom", "dicom_tls", "https"
    port: int | None
    up: bool


@dataclass(frozen=True)
class Certificate:
    kind: str  # "server", "ca", "web"
    expires: dt.datetime | None
    days_left: int | None

    @property
    def warning(self) -> bool:
        return self.days_left is None or self.days_left < EXPIRY_WARNING_DAYS


@dataclass(frozen=True)
class Configured:
    """The listeners ``pacsvault.toml`` asks for (None = that listener is off)."""

    bind: str
    dicom_port: int | None
    dicom_tls_port: int | None
    https_port: int | None


@dataclass(frozen=True)
class Counts:
    patients: int
    studies: int
    series: int
    instances: int
    received_bytes: int


@dataclass(frozen=True)
class Storage:
    received: int
    encrypted: int | None  # bytes of ``*.pvo`` on disk; None when not measured
    total: int
    free: int
    reserve: int  # ``min_free_mb``: images are refused below it
    path: str

    @property
    def low(self) -> bool:
        return self.free < self.reserve * 2

    @property
    def below(self) -> bool:
        return self.free < self.reserve


@dataclass(frozen=True)
class KeySummary:
    """How the master key is held and where (issue 14, key protection)."""

    protection: str
    key_file: str
    same_filesystem: bool
    in_data_backup: bool
    warnings: tuple[str, ...]


@dataclass(frozen=True)
class SecurityEvent:
    time: str
    action: str
    outcome: str
    who: str
    address: str


@dataclass(frozen=True)
class StatusReport:
    """Everything ``status`` and the Health page show, gathered once: a fact added here
    reaches both renderers (``status.text``, the page's template)."""

    data: Path
    ae_title: str
    server: dict[str, Any]  # ``serve.json`` as the server wrote it ({} when absent)
    server_alive: bool  # its pid answers
    configured: Configured
    nodes: tuple[NodeInfo, ...]  # the registry's own records (roles, TLS, profile)
    counts: Counts
    storage: Storage
    certificates: tuple[Certificate, ...]
    ca_name_constraints: bool | None  # None: the CA certificate cannot be read
    key: KeySummary
    backup: BackupHealth
    # asked for by the page only
    listeners: tuple[Listener, ...] = ()
    audit: Verdict | None = None
    security_events: tuple[SecurityEvent, ...] = ()
    # index and object backends, instances (issue 16); None only for reports made by hand
    deployment: Deployment | None = None

    @property
    def legacy_tls_nodes(self) -> tuple[NodeInfo, ...]:
        return tuple(n for n in self.nodes if n.legacy_tls)

    @property
    def sealed(self) -> bool:
        """The running server has no master key yet (``pacsvault unseal`` pending)."""
        return self.server_alive and bool(self.server.get("sealed"))

    def certificate(self, kind: str) -> Certificate | None:
        return next((c for c in self.certificates if c.kind == kind), None)


def read_server_state(layout: Layout) -> dict[str, Any]:
    """``serve.json`` of the server (ports it bound, pid, sealed), {} when unreadable."""
    try:
        state = json.loads(layout.state.read_text("utf-8"))
    except (OSError, ValueError):
        return {}
    return state if isinstance(state, dict) else {}


def server_alive(state: dict[str, Any]) -> bool:
    """The state's process still exists (a crash leaves ``serve.json`` behind)."""
    try:
        os.kill(int(state["pid"]), 0)
    except (OSError, ValueError, KeyError, TypeError):
        return False
    return True


def running_state(layout: Layout) -> dict[str, Any] | None:
    """The state of a running server, None when none runs."""
    state = read_server_state(layout)
    return state if state and server_alive(state) else None


def listening_ports() -> set[int] | None:
    """TCP ports with a listening socket on this machine, or None when unknown."""
    found: set[int] = set()
    seen = False
    for name in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(name).read_text().splitlines()[1:]
        except OSError:
            continue
        seen = True
        for line in lines:
            fields = line.split()
            if len(fields) > 3 and fields[3] == LISTEN:
                found.add(int(fields[1].rsplit(":", 1)[1], 16))
    return found if seen else None


def _connects(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=1):
            return True
    except OSError:
        return False


def probe_listeners(state: dict[str, Any], request_port: int | None) -> tuple[Listener, ...]:
    """Each port the server bound, and whether a socket listens on it. ``request_port``:
    the HTTPS port this question came in on (the page's own)."""
    ports = listening_ports()
    bind = str(state.get("bind") or "127.0.0.1")
    probe = "127.0.0.1" if bind in ("0.0.0.0", "::", "", "private") else bind  # noqa: S104
    found: list[Listener] = []
    for kind, key in (("dicom", "dicom_port"), ("dicom_tls", "dicom_tls_port"),
                      ("https", "https_port")):
        value = state.get(key)
        port = value if isinstance(value, int) and value > 0 else None
        if kind == "https" and port is None:
            port = request_port
        if port is None:
            found.append(Listener(kind, None, False))
            continue
        # without /proc: the HTTPS port answers this page; DICOM ports are connected to
        up = port in ports if ports is not None else (kind == "https"
                                                       or _connects(probe, port))
        found.append(Listener(kind, port, up))
    return tuple(found)


def certificates(vault: Vault, now: dt.datetime) -> tuple[Certificate, ...]:
    paths = [("server", vault.layout.tls.server_cert), ("ca", vault.layout.tls.ca_cert)]
    if vault.settings.web.cert_file:
        paths.append(("web", Path(vault.settings.web.cert_file)))
    found: list[Certificate] = []
    for kind, path in paths:
        try:
            expires = certificate_expiry(path)
        except (OSError, ValueError):
            found.append(Certificate(kind, None, None))
            continue
        found.append(Certificate(kind, expires, (expires - now).days))
    return tuple(found)


def storage(vault: Vault, received: int, *, measure_objects: bool) -> Storage:
    reserve = vault.settings.storage.min_free_mb * 1024 * 1024
    try:
        usage = shutil.disk_usage(vault.layout.objects)
        total, free = usage.total, usage.free
    except OSError:
        total = free = 0
    encrypted = sum(f.stat().st_size for f in vault.layout.objects.rglob("*.pvo")
                    if f.is_file()) if measure_objects else None
    return Storage(received=received, encrypted=encrypted, total=total, free=free,
                   reserve=reserve, path=str(vault.layout.root))


def _name_constrained(vault: Vault) -> bool | None:
    try:
        return ca_is_name_constrained(vault.layout.tls)
    except (OSError, ValueError):
        return None


def key_summary(vault: Vault) -> KeySummary:
    """``keys status`` in short: protection kind, file, same filesystem as the data."""
    found = describe(vault.key_path or Path("?"), vault.layout.root)
    return KeySummary(protection=str(found["protection"]), key_file=str(found["key_file"]),
                      same_filesystem=bool(found["same_filesystem"]),
                      in_data_backup=bool(found["in_data_backup"]),
                      warnings=tuple(found["warnings"]))


def security_events(trail: Path, limit: int = SECURITY_EVENTS) -> tuple[SecurityEvent, ...]:
    """The latest Security Alert events and exposures, newest first, without message,
    details or references."""
    from pacsvault.audit.tail import tail_records

    found: list[SecurityEvent] = []
    for body in tail_records(trail):
        if body.get("kind") != "event":
            continue
        if body.get("code") != EventCode.SECURITY_ALERT.value and \
                str(body.get("action", "")) != "exposure":
            continue
        found.append(SecurityEvent(time=str(body.get("time", ""))[:19].replace("T", " "),
                                   action=str(body.get("action", "")),
                                   outcome=str(body.get("outcome", "")),
                                   who=str(body.get("user") or body.get("ae") or ""),
                                   address=str(body.get("address", ""))))
        if len(found) >= limit:
            break
    return tuple(found)


def gather(vault: Vault, *, now: dt.datetime | None = None, measure_objects: bool = False,
           listeners_for: int | None = None, probe: bool = False,
           check_audit: bool = False) -> StatusReport:
    """The report of an open vault. ``measure_objects``: add up the encrypted objects'
    sizes (``status``); ``probe``: check each bound port for a listening socket,
    ``listeners_for`` being the HTTPS port asked on; ``check_audit``: verify the trail's
    last ``VERIFY_TAIL`` signatures and list the latest security events (the page)."""
    from sqlalchemy.exc import SQLAlchemyError

    now = now or dt.datetime.now(dt.UTC)
    settings = vault.settings
    state = read_server_state(vault.layout)
    deployed = deployment(vault, now)
    try:  # a PostgreSQL gone since the vault opened: the report says so (deployment)
        counted = stats.counts(vault.sessions)  # without the archive's pydicom
        nodes = tuple(vault.nodes.all())
    except SQLAlchemyError:
        if deployed.index.reachable:
            raise
        counted = {"patients": 0, "studies": 0, "series": 0, "instances": 0, "bytes": 0}
        nodes = ()
    return StatusReport(
        data=vault.layout.root,
        ae_title=settings.server.ae_title,
        server=state,
        server_alive=bool(state) and server_alive(state),
        configured=Configured(
            bind=settings.server.bind,
            dicom_port=settings.dicom.port if settings.dicom.plain_enabled else None,
            dicom_tls_port=settings.dicom.tls_port,
            https_port=settings.web.https_port if settings.web.enabled else None),
        nodes=nodes,
        counts=Counts(patients=counted["patients"], studies=counted["studies"],
                      series=counted["series"], instances=counted["instances"],
                      received_bytes=counted["bytes"]),
        # objects in a bucket: the local directory holds none (no listing of the bucket)
        storage=storage(vault, counted["bytes"],
                        measure_objects=measure_objects and not settings.storage.url),
        certificates=certificates(vault, now),
        ca_name_constraints=_name_constrained(vault),
        key=key_summary(vault),
        backup=backup_health(vault.layout, settings.backup, now),
        listeners=probe_listeners(state, listeners_for) if probe else (),
        audit=(vault.audit.verify(tail=VERIFY_TAIL)
               if check_audit and deployed.index.reachable else None),
        security_events=security_events(vault.audit.path) if check_audit else (),
        deployment=deployed,
    )
