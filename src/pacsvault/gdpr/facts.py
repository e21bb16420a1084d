"""What the record of processing says about this archive, read from the live vault.

Why a separate step: the document (``record``) is words around facts, in two languages; the
facts are read once, here, from the settings, the node registry, the accounts, the backup
state, the audit trail's verification and the last security check. Nothing here reads the
images or the index's patient rows: the record describes the processing, never a patient.

Where a fact cannot be known by the product (is a host name in the EU? who is the
controller?) it says so ("to be verified", blanks to fill) instead of guessing.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import json
from collections import Counter
from dataclasses import dataclass
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

if TYPE_CHECKING:
    from pacsvault.vault import Vault

# The kept last run of ``pacsvault check`` (``check.record``: DATA/check-state.json, read
# as plain JSON here so that a damaged or absent file is only "never run").
CHECK_STATE = "check-state.json"


@dataclass(frozen=True)
class Endpoint:
    """Somewhere data leaves this machine for. ``host`` "" = a local path (a USB disk)."""

    kind: str  # "backup", "storage", "index", "syslog", "mail", "webhook"
    name: str
    host: str
    detail: str = ""

    @property
    def remote(self) -> bool:
        """Not this machine and not an address of a private network: possibly abroad."""
        if not self.host:
            return False
        try:
            ip = ipaddress.ip_address(self.host.strip("[]"))
        except ValueError:
            return self.host.lower() != "localhost"
        return not (ip.is_private or ip.is_loopback or ip.is_link_local)


@dataclass(frozen=True)
class NodeFact:
    ae_title: str
    host: str
    port: int | None
    roles: tuple[str, ...]
    tls: bool


@dataclass(frozen=True)
class BackupFact:
    name: str
    location: str  # the repository's host, or "local disk"
    state: str  # backup.health's: "ok", "never", "failing", "stale", "drill-failed"
    last_success: dt.datetime | None
    last_drill: dt.datetime | None
    last_drill_ok: bool | None


@dataclass(frozen=True)
class CheckFact:
    finished: dt.datetime
    critical: int
    warning: int


@dataclass(frozen=True)
class Facts:
    now: dt.datetime
    ae_title: str
    nodes: tuple[NodeFact, ...]
    roles: dict[str, int]  # role -> active accounts holding it
    accounts: int  # active accounts
    disabled: int
    second_factor: int  # active accounts with TOTP or a passkey
    totp: int
    passkeys: int  # active accounts with at least one passkey
    https: bool
    https_port: int
    remote_access: str
    dicom_tls_port: int
    plain_dicom: bool
    plain_port: int
    tls_from_anywhere: bool
    trusted_networks: tuple[str, ...]
    storage: str  # "local" or "s3"
    index: str  # "embedded" or "postgresql"
    syslog: Endpoint | None
    mail: Endpoint | None
    webhook: Endpoint | None
    backups: tuple[BackupFact, ...]
    endpoints: tuple[Endpoint, ...]
    audit_ok: bool
    audit_problem: str
    audit_retention_days: int
    audit_justification: str
    retention_years: int
    minor_until_age: int
    per_modality: dict[str, int]
    backup_keep: dict[str, int]
    drill_every_days: int
    token_max_days: int
    token_idle_days: int
    check: CheckFact | None


def _url_host(url: str) -> str:
    try:
        return urlsplit(url).hostname or ""
    except ValueError:
        return ""


def repository_host(repository: str) -> str:
    """The host of a restic repository ("" for a local path): ``sftp:user@host:/p``,
    ``s3:https://host/bucket``, ``rest:https://host:8000/``; other back-ends (b2:,
    azure:, gs:, rclone:) are a provider's service, named by their scheme."""
    kind, sep, rest = repository.partition(":")
    if not sep or repository.startswith("/") or len(kind) == 1:  # a path (or C:\...)
        return ""
    if kind == "sftp":
        target = rest.removeprefix("//")
        target = target.split("@", 1)[-1]
        return target.split(":", 1)[0].split("/", 1)[0]
    if kind in ("s3", "rest", "swift"):
        return _url_host(rest) or rest.split("/", 1)[0]
    if kind == "local":
        return ""
    return f"{kind} (provider)"


def _check(vault: Vault) -> CheckFact | None:
    try:
        raw = json.loads((vault.layout.root / CHECK_STATE).read_text("utf-8"))
        severities = Counter(str(f.get("severity", "")) for f in raw["findings"])
        return CheckFact(dt.datetime.fromisoformat(raw["finished"]),
                         severities["critical"], severities["warning"])
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None


def gather(vault: Vault, now: dt.datetime | None = None) -> Facts:
    """The facts of ``vault`` as configured and running now."""
    from pacsvault.backup.health import backup_health

    now = now or dt.datetime.now(dt.UTC)
    s = vault.settings
    nodes = tuple(NodeFact(n.ae_title, n.host, n.port, tuple(n.roles), n.tls)
                  for n in vault.nodes.all())
    users = vault.accounts.list_users()
    active = [u for u in users if not u.disabled]
    roles = Counter(role for u in active for role in u.roles)

    endpoints: list[Endpoint] = []
    backups: list[BackupFact] = []
    health = backup_health(vault.layout, s.backup, now)
    for target in health.targets:
        host = repository_host(target.repository)
        backups.append(BackupFact(target.name, host, target.state, target.last_success,
                                  target.last_drill, target.last_drill_ok))
        endpoints.append(Endpoint("backup", target.name, host))
    if s.storage.url:
        host = _url_host(s.storage.endpoint) or (
            f"s3.{s.storage.region}.amazonaws.com" if s.storage.region else "s3.amazonaws.com")
        endpoints.append(Endpoint("storage", s.storage.url.split("/")[2], host))
    if s.index.url:
        endpoints.append(Endpoint("index", "PostgreSQL", _url_host(s.index.url)))
    syslog = (Endpoint("syslog", "syslog", s.audit.syslog.host or "",
                       str(s.audit.syslog.port))
              if s.audit.syslog.enabled and s.audit.syslog.host else None)
    alerts = s.alerts
    mail = (Endpoint("mail", "e-mail", alerts.smtp_host, str(len(alerts.mail_to)))
            if alerts.enabled and alerts.smtp_host and alerts.mail_to else None)
    webhook = (Endpoint("webhook", "webhook", _url_host(alerts.webhook_url))
               if alerts.enabled and alerts.webhook_url else None)
    endpoints += [e for e in (syslog, mail, webhook) if e is not None]

    verdict = vault.audit.verify()
    b = s.backup
    return Facts(
        now=now, ae_title=s.server.ae_title, nodes=nodes, roles=dict(roles),
        accounts=len(active), disabled=len(users) - len(active),
        second_factor=sum(1 for u in active if u.second_factor_enrolled),
        totp=sum(1 for u in active if u.totp_enrolled),
        passkeys=sum(1 for u in active if u.passkeys > 0),
        https=s.web.enabled, https_port=s.web.https_port, remote_access=s.web.remote_access,
        dicom_tls_port=s.dicom.tls_port, plain_dicom=s.dicom.plain_enabled,
        plain_port=s.dicom.port, tls_from_anywhere=s.dicom.tls_from_anywhere,
        trusted_networks=tuple(str(n) for n in s.dicom.trusted_networks),
        storage="s3" if s.storage.url else "local",
        index="postgresql" if s.index.url else "embedded",
        syslog=syslog, mail=mail, webhook=webhook, backups=tuple(backups),
        endpoints=tuple(endpoints), audit_ok=verdict.ok, audit_problem=verdict.problem,
        audit_retention_days=s.audit.retention_days,
        audit_justification=s.audit.retention_justification,
        retention_years=s.retention.years, minor_until_age=s.retention.minor_until_age,
        per_modality=dict(s.retention.per_modality),
        backup_keep={"daily": b.keep_daily, "weekly": b.keep_weekly,
                     "monthly": b.keep_monthly, "yearly": b.keep_yearly},
        drill_every_days=b.drill_every_days,
        token_max_days=s.tokens.max_days, token_idle_days=s.tokens.idle_days,
        check=_check(vault),
    )
