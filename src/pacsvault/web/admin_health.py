"""The health panel: ``/admin/health``, what ``pacsvault status`` says and a bit more.

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
* the active sign-in blocks with their "lift" buttons: the same fragment and endpoint as the
  Users page (``blocks_section.html``, ``/admin/users/blocks/lift``: CSRF, admin, audited),
  so an administrator looking at the health of the archive sees a locked-out practice too.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import shutil
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request
from starlette.responses import Response

from pacsvault.audit import EventCode
from pacsvault.backup.health import backup_health
from pacsvault.crypto.protection import describe
from pacsvault.crypto.tls import certificate_expiry
from pacsvault.vault import Vault
from pacsvault.web.principal import Principal
from pacsvault.web.ui import PageRole, _accounts, _page, _vault, tail_records

router = APIRouter()

AdminPage = Annotated[Principal, Depends(PageRole("admin"))]
EXPIRY_WARNING_DAYS = 30
VERIFY_TAIL = 1000
SECURITY_EVENTS = 20
LISTEN = "0A"


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


def server_state(vault: Vault) -> dict[str, Any]:
    try:
        state = json.loads(vault.layout.state.read_text("utf-8"))
    except (OSError, ValueError):
        return {}
    return state if isinstance(state, dict) else {}


def listeners(vault: Vault, request_port: int | None) -> list[Listener]:
    state = server_state(vault)
    ports = listening_ports()
    bind = str(state.get("bind") or "127.0.0.1")
    probe = "127.0.0.1" if bind in ("0.0.0.0", "::", "") else bind  # noqa: S104
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
    return found


def certificates(vault: Vault, now: dt.datetime) -> list[Certificate]:
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
    return found


def storage(vault: Vault, received: int) -> dict[str, Any]:
    reserve = vault.settings.storage.min_free_mb * 1024 * 1024
    try:
        usage = shutil.disk_usage(vault.layout.objects)
        total, free = usage.total, usage.free
    except OSError:
        total = free = 0
    return {"received": received, "total": total, "free": free, "reserve": reserve,
            "low": free < reserve * 2, "below": free < reserve,
            "path": str(vault.layout.root)}


def security_events(trail: Path, limit: int = SECURITY_EVENTS) -> list[dict[str, str]]:
    """The latest Security Alert events and failures, newest first, without message,
    details or references."""
    found: list[dict[str, str]] = []
    for body in tail_records(trail):
        if body.get("kind") != "event":
            continue
        if body.get("code") != EventCode.SECURITY_ALERT.value and \
                str(body.get("action", "")) != "exposure":
            continue
        found.append({"time": str(body.get("time", ""))[:19].replace("T", " "),
                      "action": str(body.get("action", "")),
                      "outcome": str(body.get("outcome", "")),
                      "who": str(body.get("user") or body.get("ae") or ""),
                      "address": str(body.get("address", ""))})
        if len(found) >= limit:
            break
    return found


def size(n: int) -> str:
    value = float(n)
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if value < 1024 or unit == "TB":
            return f"{n} B" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{n} B"


@router.get("/admin/health")
def health_page(request: Request, principal: AdminPage) -> Response:
    vault = _vault(request)
    now = dt.datetime.now(dt.UTC)
    counts = vault.archive.counts()
    verdict = vault.audit.verify(tail=VERIFY_TAIL)
    state = server_state(vault)
    running = bool(state) and state.get("pid") == os.getpid()
    nodes = vault.nodes.all()
    return _page(request, "admin_health.html", nav="admin", admin_nav="health",
                 listeners=listeners(vault, request.url.port), running=running,
                 bind=str(state.get("bind", "")), ae_title=vault.settings.server.ae_title,
                 counts=counts, storage=storage(vault, int(counts.get("bytes", 0))),
                 size=size, certificates=certificates(vault, now),
                 warning_days=EXPIRY_WARNING_DAYS,
                 events=security_events(vault.audit.path), verdict=verdict,
                 nodes=len(nodes), legacy_tls=[n for n in nodes if n.legacy_tls],
                 key=describe(vault.key_path or Path("?"), vault.layout.root),
                 blocks=_accounts(request).blocks(),
                 blocks_back="/admin/health",
                 backup=backup_health(vault.layout, vault.settings.backup, now))
