"""The active problems of the archive, gathered in one place (issue 20, item 7).

The Health page lists everything; an administrator opening it wants first "is anything
wrong, and what do I do?". This module answers from what is already gathered: the status
report (``status.report.gather``: backups, certificates, audit chain, disk, listeners),
the exposure state (``alert_notices.exposure_banner``'s dictionary) and the security
check's last kept run (``check.record.load_kept``: no check runs here). Each problem is a
stable code, a severity and its parameters; the page words it (what is wrong, what to do)
in the reader's language (``web/health_problems``), so the same list could feed a command
or a monitoring probe.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from pacsvault.status.report import EXPIRY_WARNING_DAYS

if TYPE_CHECKING:
    from pacsvault.check.record import KeptRun
    from pacsvault.status.report import StatusReport

CRITICAL, WARNING = "critical", "warning"
CHECK_STALE = dt.timedelta(days=8)  # the nightly check did not run for a week


@dataclass(frozen=True)
class Problem:
    code: str  # e.g. "backup.failing", "certificate.expiring" (see web/health_problems)
    severity: str  # CRITICAL or WARNING
    params: dict[str, Any] = field(default_factory=dict)
    link: str = ""  # the page (anchor) that shows the details


def active_problems(report: StatusReport, exposure: dict[str, Any] | None,
                    check: KeptRun | None, now: dt.datetime) -> list[Problem]:
    """The problems to show at the top of the Health page, critical ones first."""
    found: list[Problem] = []
    if exposure:
        if exposure.get("active"):
            found.append(Problem("exposure.active", CRITICAL,
                                 {"what": ", ".join(exposure["active"]),
                                  "since": exposure.get("since", "")}, "#exposure-banner"))
        if exposure.get("refused"):
            found.append(Problem("exposure.refused", CRITICAL,
                                 {"what": ", ".join(exposure["refused"]),
                                  "why": "; ".join(exposure.get("reasons", []))},
                                 "#exposure-banner"))
        if exposure.get("pending"):
            found.append(Problem("exposure.pending", CRITICAL,
                                 {"when": exposure.get("pending_at", "")},
                                 "#exposure-banner"))
    backup = report.backup
    scale_out = bool(report.deployment and report.deployment.scale_out)
    if not backup.configured and not scale_out:
        found.append(Problem("backup.none", CRITICAL, {}, "#backup-heading"))
    for t in backup.targets:
        if t.state == "ok":
            continue
        found.append(Problem(f"backup.{t.state}", CRITICAL if t.state != "never"
                             else WARNING,
                             {"name": t.name, "hours": backup.max_age_hours,
                              "error": t.last_error}, "#backup-heading"))
    for c in report.certificates:
        if c.days_left is None:
            found.append(Problem("certificate.unreadable", WARNING, {"kind": c.kind},
                                 "#certs-heading"))
        elif c.days_left < 0:
            found.append(Problem("certificate.expired", CRITICAL, {"kind": c.kind},
                                 "#certs-heading"))
        elif c.days_left < EXPIRY_WARNING_DAYS:
            found.append(Problem("certificate.expiring",
                                 CRITICAL if c.days_left < 7 else WARNING,
                                 {"kind": c.kind, "days": c.days_left}, "#certs-heading"))
    if report.audit is not None and not report.audit.ok:
        found.append(Problem("audit.broken", CRITICAL, {}, "#audit-heading"))
    if report.storage.total:
        if report.storage.below:
            found.append(Problem("disk.below", CRITICAL, {}, "#storage-heading"))
        elif report.storage.low:
            found.append(Problem("disk.low", WARNING, {}, "#storage-heading"))
    for listener in report.listeners:
        if listener.port and not listener.up:
            found.append(Problem("listener.down", CRITICAL,
                                 {"kind": listener.kind, "port": listener.port},
                                 "#listeners-heading"))
    if check is not None:
        for f in check.result.findings:
            if f.severity.value == "critical":
                found.append(Problem("check.critical", CRITICAL,
                                     {"title": f.title, "fix": f.fix, "id": f.id},
                                     "/admin/check"))
        finished = check.result.finished
        if finished.tzinfo is None:
            finished = finished.replace(tzinfo=dt.UTC)
        if now - finished > CHECK_STALE:
            found.append(Problem("check.stale", WARNING,
                                 {"when": check.result.finished}, "/admin/check"))
    found.sort(key=lambda p: p.severity != CRITICAL)  # stable: critical first
    return found
