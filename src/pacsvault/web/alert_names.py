"""What the pages call each security alert rule and level, in the reader's language.

The trail and the alert messages carry the rule's stable code (``failed-logins``) and an
English title for mail and syslog readers; a page in French must not show either raw
(issue 20, item 2). A rule without a name here (a later issue's) shows its English title.
"""

from __future__ import annotations

from pacsvault.web.i18n import N_, Gettext

RULES: dict[str, str] = {
    "account-locked": N_("Account locked"),
    "archive-sealed": N_("Archive sealed"),
    "audit-broken": N_("Audit trail damaged"),
    "audit-unwritable": N_("Audit trail cannot be written"),
    "backup-failed": N_("Backup failed"),
    "backup-stale": N_("Backup too old"),
    "breach-clock": N_("Breach: notification deadline approaching"),
    "bulk-access": N_("Many records opened"),
    "connection-abuse": N_("Too many connections"),
    "disk-full": N_("Disk almost full"),
    "exposure": N_("Archive exposed"),
    "exposure-switch": N_("Exposure settings changed"),
    "failed-logins": N_("Repeated failed sign-ins"),
    "forwarding": N_("Automatic forwarding failing"),
    "object-storage": N_("Image storage problem"),
    "security-check": N_("Security check: new critical finding"),
    "unknown-node": N_("Unknown DICOM device"),
    "unusual-hours": N_("Access at unusual hours"),
}
LEVELS: dict[str, str] = {"warning": N_("warning"), "critical": N_("critical")}


def rule_name(rule: str, title: str, _: Gettext) -> str:
    return _(RULES[rule]) if rule in RULES else title


def level_name(level: str, _: Gettext) -> str:
    return _(LEVELS[level]) if level in LEVELS else level
