"""Rule ``exposure-switch`` (issue 19): a change of who can reach the archive.

Apart from ``rules.py`` (already at its size limit) and pure like it. The events come
from the exposure guard of ``serve`` (``cli/exposure.py``): ``exposure.switch`` (applied),
``exposure.refused`` (a widening refused, the previous values kept) and
``exposure.pending`` (the settings file edited while the server runs). Each distinct change
is its own subject, so two different switches within a grouping window are both sent.
"""

from __future__ import annotations

import hashlib

from pacsvault.audit.alerts.findings import Finding, Severity
from pacsvault.audit.alerts.findings import clean_text as _clean
from pacsvault.audit.events import AuditEvent

ACTIONS = ("exposure.switch", "exposure.refused", "exposure.pending")


def exposure_switch(e: AuditEvent) -> list[Finding]:
    if e.action not in ACTIONS:
        return []
    changes = _clean(str(e.detail.get("changes", "")), 400) or "first record"
    wider = _clean(str(e.detail.get("widened", "")), 300)
    who = ", ".join(f"{k.replace('_', ' ')} {_clean(str(e.detail[k]), 60)}"
                    for k in ("file_owner", "file_modified", "server_user") if k in e.detail)
    if e.action == "exposure.refused":
        title = "Exposure change refused"
        what = (f"The settings file asks to open the archive further ({wider}), but "
                f"{_clean(str(e.detail.get('reasons', '')), 400)}. The server runs with its "
                f"previous values ({_clean(str(e.detail.get('kept', '')), 200)}). If nobody "
                "at the practice made this change, someone else has access to the server.")
    elif e.action == "exposure.pending":
        title = "Exposure settings edited on the server"
        what = (f"The settings file was changed while the server runs: {changes}. It "
                f"{_clean(str(e.detail.get('verdict', '')), 300)}. If nobody at the practice "
                "made this change, someone else has access to the server.")
    else:
        title = "Archive exposure changed" + (": now reachable from outside" if wider else "")
        what = (f"The exposure settings changed at this start: {changes}."
                + (f" Opened: {wider}." if wider else "")
                + " If nobody at the practice asked for it, undo it in pacsvault.toml and "
                  "restart the server.")
    if who:
        what += f" ({who}.)"
    severity = Severity.CRITICAL if wider or e.action == "exposure.refused" \
        else Severity.WARNING
    subject = e.action + ":" + hashlib.sha256(changes.encode()).hexdigest()[:12]
    return [Finding(rule="exposure-switch", subject=subject, severity=severity, title=title,
                    what=what, look="pacsvault audit show --action exposure; the Health page",
                    time=e.time, facts={"changes": changes, "widened": wider})]
