"""The ``security-check`` alert rule: a critical finding that the last check did not have.

Why on the ``check.run`` event rather than in the check itself: the check only records
what it found (``check.record``); telling a person goes through the same detector,
grouping and channels as every other alert, and can be disabled like them. Only *new*
critical ids alert: the same open port reported every night would teach the practice to
ignore the mail. The text carries finding ids and counts only (no patient data exists in
a finding, and none is copied from the event's message).
"""

from __future__ import annotations

from pacsvault.audit.alerts.findings import Finding, Severity
from pacsvault.audit.alerts.findings import clean_text as _clean
from pacsvault.audit.events import AuditEvent

ACTION = "check.run"


def security_check(e: AuditEvent) -> list[Finding]:
    if e.action != ACTION:
        return []
    new = [i for i in str(e.detail.get("new_critical", "")).split(",") if i]
    if not new:
        return []
    ids = _clean(", ".join(new), 400)
    total = e.detail.get("critical", len(new))
    return [Finding(
        rule="security-check", subject=f"check:{','.join(sorted(new))}"[:200],
        severity=Severity.CRITICAL, title="Security check: new critical finding",
        what=(f"The security check found {len(new)} new critical point(s): {ids} "
              f"({total} critical in all). Each would expose patient data now; the "
              "Security check page (Administration) says what was seen and how to fix it."),
        look="pacsvault check", time=e.time,
        facts={"new_critical": ids, "critical": str(total)},
    )]
