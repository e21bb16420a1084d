"""The rules about the service's own health (backups, sealed mode, the breach clock, object
storage, forwarding, a full disk): each a pure function of one event.

Apart from ``rules.py`` because they keep no state between events (no windows, no
patients), unlike the access rules there, and to keep that module small. ``Detector``
declares what each one watches (``dispatch.Watch``).
"""

from __future__ import annotations

import datetime as dt

from pacsvault.audit.alerts.findings import Finding, Severity
from pacsvault.audit.alerts.findings import clean_text as _clean
from pacsvault.audit.alerts.findings import minute_text as _minute
from pacsvault.audit.alerts.findings import show_command as _show
from pacsvault.audit.alerts.findings import who_of as _who
from pacsvault.audit.events import AuditEvent, Outcome

# Backup actions whose failure is an alert: (what failed, why it matters).
BACKUP_ACTIONS: dict[str, tuple[str, str]] = {
    "backup.run": ("backup run", "Images received since the last good backup exist only on "
                   "this server's disk until a run succeeds."),
    "backup.verify": ("backup verification", "The repository may be damaged: a restore "
                      "from it could fail. Make a new backup to another target soon."),
    "backup.prune": ("pruning of old snapshots", "The repository keeps growing; backups "
                     "themselves still run."),
    "backup.drill": ("restore drill", "Restoring this backup after a disaster would not "
                     "give back the archive as it was. Check the repository "
                     "('pacsvault backup verify') and make a new backup."),
}


def backup_failed(e: AuditEvent) -> list[Finding]:
    """A backup run, verification, pruning or restore drill that did not succeed."""
    if e.action not in BACKUP_ACTIONS or e.outcome is Outcome.SUCCESS:
        return []
    target = _clean(str(e.detail.get("target", ""))) or "?"
    what, consequence = BACKUP_ACTIONS[e.action]
    reason = _clean(str(e.detail.get("error") or e.message), 300) or "see the audit trail"
    return [Finding(
        rule="backup-failed", subject=f"{e.action}:{target}", severity=Severity.CRITICAL,
        title=f"Backup problem: {what} failed",
        what=f"The {what} of backup target '{target}' failed: {reason}. {consequence}",
        look=(f"pacsvault status; pacsvault audit show --action {e.action} "
              f"--since {_minute(e.time - dt.timedelta(minutes=5))}"),
        time=e.time, facts={"target": target, "action": e.action},
    )]


def sealed(e: AuditEvent) -> list[Finding]:
    """The practice must know at once that nobody can view images (sealed/)."""
    if e.action == "application.start" and e.detail.get("sealed"):
        return [Finding(
            rule="archive-sealed", subject="sealed", severity=Severity.CRITICAL,
            title="Archive sealed: an administrator must unlock it",
            what=("The server started without its master key (key medium removed, or "
                  "its passphrase not given). Devices can still send images, which are "
                  "kept encrypted, but nobody can view or query anything until an "
                  "administrator unlocks it: put the key medium back or have the "
                  "passphrase ready, then open https://<this server>/unseal or run "
                  "'pacsvault unseal'."),
            look="pacsvault unseal", time=e.time)]
    if e.action in ("sealed.snapshot", "sealed.journal.damaged") \
            and e.outcome is not Outcome.SUCCESS:
        return [Finding(
            rule="archive-sealed", subject=e.action, severity=Severity.CRITICAL,
            title="Sealed mode: a file does not verify",
            what=_clean(e.message, 400) or "a sealed-mode file does not verify",
            look=f"pacsvault audit show --action {e.action}", time=e.time)]
    return []


def backup_stale(e: AuditEvent) -> list[Finding]:
    if e.action != "backup.stale":
        return []
    target = _clean(str(e.detail.get("target", ""))) or "?"
    age = e.detail.get("age_hours", "?")
    limit = e.detail.get("max_age_hours", "?")
    return [Finding(
        rule="backup-stale", subject=f"target:{target}", severity=Severity.CRITICAL,
        title="Backup too old",
        what=(f"The last good backup of target '{target}' is {age} hours old (limit "
              f"{limit} h). Images received since then exist only on this server's "
              "disk. Check that the backup disk is plugged in or the off-site "
              "repository reachable, then run 'pacsvault backup run'."),
        look="pacsvault status; pacsvault audit show --action backup",
        time=e.time, facts={"target": target, "age_hours": str(age)},
    )]


def breach_clock(e: AuditEvent) -> list[Finding]:
    """The breach register's 72-hour clock (``breach.clock``): 48 h and 66 h gone."""
    if e.action != "breach.clock":
        return []
    breach = _clean(str(e.detail.get("breach", ""))) or "?"
    hours, left = e.detail.get("hours", "?"), e.detail.get("hours_left", "?")
    return [Finding(
        rule="breach-clock", subject=f"breach:{breach}:{hours}",
        severity=Severity.CRITICAL, title="Breach: notification deadline approaching",
        what=(f"Breach {breach} was known {hours} hours ago and no decision on notifying "
              f"the data protection authority is recorded; {left} hours are left of the "
              "72 (GDPR art. 33). Record the decision, or notify, with 'pacsvault breach "
              "update'."),
        look=f"pacsvault breach show {breach}", time=e.time,
        facts={"breach": breach, "hours": str(hours)},
    )]


def object_storage(e: AuditEvent) -> list[Finding]:
    """A bucket run by someone else: unreachable (images refused), or an indexed
    object gone or damaged there (found by the scrubber)."""
    if e.action == "storage.scrub" and e.outcome is not Outcome.SUCCESS:
        missing, corrupt = e.detail.get("missing", "?"), e.detail.get("corrupt", "?")
        return [Finding(
            rule="object-storage", subject="damaged", severity=Severity.CRITICAL,
            title="Stored images missing or damaged",
            what=(f"The object scrub found {missing} missing and {corrupt} corrupt "
                  "object(s) in the object storage: those images can no longer be "
                  "read. Ask the storage provider what happened, and restore the "
                  "objects from a copy (bucket versioning, replication or a backup)."),
            look="pacsvault storage scrub; pacsvault audit show --action storage.scrub",
            time=e.time, facts={"missing": str(missing), "corrupt": str(corrupt)})]
    if e.action == "storage.orphans" and e.outcome is not Outcome.SUCCESS:
        return [Finding(
            rule="object-storage", subject="orphans", severity=Severity.CRITICAL,
            title="Object storage does not match the index",
            what=_clean(e.message, 400) or "too many unindexed objects in the bucket",
            look="pacsvault storage scrub; pacsvault audit show --action storage.orphans",
            time=e.time)]
    if e.action == "dicom.store.failed" and "StorageUnavailable" in e.message:
        who = _who(e)
        return [Finding(
            rule="object-storage", subject="unreachable", severity=Severity.CRITICAL,
            title="Object storage unreachable: images are being refused",
            what=(f"The archive refused an image from {who.label} because the object "
                  "storage (S3 endpoint) did not answer or did not confirm the upload "
                  "(DICOM status A700). Modalities keep refused images in their queues, "
                  "or lose them. Check the endpoint and the network to it; storing "
                  "resumes by itself once it answers."),
            look=_show("--action dicom.store.failed", e.time - dt.timedelta(minutes=5)),
            time=e.time, source=_clean(e.actor_ae), ae=_clean(e.actor_ae),
            address=_clean(e.actor_address))]
    return []


def forwarding(e: AuditEvent) -> list[Finding]:
    """``forward.failing``: a forwarding rule's images keep failing to reach their node
    (the radiologist waits for a CT that never comes); recorded once per episode."""
    if e.action != "forward.failing":
        return []
    node = _clean(str(e.detail.get("destination", ""))) or "?"
    count = _clean(str(e.detail.get("instances", "")))
    return [Finding(
        rule="forwarding", subject=node, severity=Severity.WARNING,
        title=f"Automatic forwarding to {node} keeps failing",
        what=(f"{count or 'Some'} image(s) for {node} failed "
              f"{_clean(str(e.detail.get('attempts', '')))} times; pacsvault keeps "
              "retrying. Check that the device is on and its address, port and TLS "
              "settings are right."),
        look="pacsvault node list; pacsvault status",
        time=e.time, facts={"node": node},
    )]


def disk_full(e: AuditEvent) -> list[Finding]:
    if e.action != "dicom.store.failed" or "A700" not in e.message.upper() \
            or "StorageUnavailable" in e.message:
        return []
    who = _who(e)
    return [Finding(
        rule="disk-full", subject="refusing", severity=Severity.CRITICAL,
        title="Archive disk full: images are being refused",
        what=(f"The archive refused an image from {who.label} because free disk space "
              "is below the configured reserve (DICOM status A700). Modalities keep "
              "refused images in their queues, or lose them. Free space or add storage "
              "now."),
        look=_show("--action dicom.store.failed", e.time - dt.timedelta(minutes=5)),
        time=e.time, source=_clean(e.actor_ae), ae=_clean(e.actor_ae),
        address=_clean(e.actor_address),
    )]

__all__ = ["BACKUP_ACTIONS", "backup_failed", "backup_stale", "breach_clock", "disk_full",
           "forwarding", "object_storage", "sealed"]
