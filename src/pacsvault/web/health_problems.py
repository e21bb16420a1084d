"""The Health page's "active problems" banner in words: what is wrong, what to do.

``status.problems`` says which problems hold (a code, a severity, parameters); this table
words each one for a practice, in the reader's language (``N_`` here, the catalogs in
``web/locale``). A code without an entry (a later issue's) is shown by its code, never
hidden. The security check's critical findings carry their own French and English texts
(``check.Localized``), shown as they are.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pacsvault.status.problems import Problem
from pacsvault.web.i18n import N_, Gettext

# code -> (what is wrong, what to do); %(name)s are the problem's parameters
TEXTS: dict[str, tuple[str, str]] = {
    "exposure.active": (
        N_("The archive is open beyond the practice network (%(what)s) since %(since)s UTC."),
        N_("If nobody at the practice asked for it, close it now in pacsvault.toml and "
           "restart the server; otherwise keep it as short as possible.")),
    "exposure.refused": (
        N_("A change of the exposure settings was refused (%(what)s): %(why)s."),
        N_("Fix what the reason says, or put the settings back; the server keeps its "
           "previous values meanwhile.")),
    "exposure.pending": (
        N_("The exposure settings were edited at %(when)s UTC behind the running server."),
        N_("If nobody at the practice made this change, someone else has access to the "
           "server: call the IT provider before restarting.")),
    "backup.none": (
        N_("No backup is configured: a disk failure loses every image."),
        N_("Add a backup target (a USB disk and an off-site repository) in the [backup] "
           "section of pacsvault.toml and restart the server.")),
    "backup.never": (
        N_("Backup target %(name)s has no good backup yet."),
        N_("Check that its disk or repository is reachable; pacsvault backup run makes "
           "one now.")),
    "backup.failing": (
        N_("The last backup to %(name)s failed: %(error)s"),
        N_("Check that its disk is plugged in or its repository reachable, then run "
           "pacsvault backup run.")),
    "backup.stale": (
        N_("The last good backup to %(name)s is older than %(hours)s hours."),
        N_("Check that the server runs its backups (its disk plugged in, the repository "
           "reachable), then run pacsvault backup run.")),
    "backup.drill-failed": (
        N_("The last restore drill of %(name)s failed: the backup may not restore."),
        N_("Run pacsvault backup drill and ask the IT provider to look at its report.")),
    "certificate.expired": (
        N_("A certificate has expired (%(kind)s): devices and browsers refuse the archive."),
        N_("Renew it now (pacsvault tls rotate-ca re-issues the vault's own; a certificate "
           "named in [web] cert_file comes from its issuer), then restart the server.")),
    "certificate.expiring": (
        N_("A certificate expires in %(days)s days (%(kind)s)."),
        N_("Renew it before then (pacsvault tls rotate-ca re-issues the vault's own; a "
           "certificate named in [web] cert_file comes from its issuer), then restart the "
           "server.")),
    "certificate.unreadable": (
        N_("A certificate cannot be read (%(kind)s)."),
        N_("Check the file named in pacsvault.toml, or re-issue the vault's own with "
           "pacsvault tls rotate-ca.")),
    "audit.broken": (
        N_("The audit trail does not verify: a record was altered or removed."),
        N_("Run pacsvault audit verify, keep a copy of the trail as evidence, and treat it "
           "as a possible breach (Breach register).")),
    "disk.below": (
        N_("The disk is full: new images are refused."),
        N_("Free some space or add a disk now; the devices will resend what was refused.")),
    "disk.low": (
        N_("The disk is getting full."),
        N_("Plan a larger disk: below the reserve, new images are refused.")),
    "listener.down": (
        N_("A listener is down (%(kind)s, port %(port)s): devices cannot reach the archive."),
        N_("Restart the server and look at its log (journalctl -u pacsvault).")),
    "check.stale": (
        N_("The security check has not run since %(when)s."),
        N_("Run it from the Security check page; it should run every night.")),
}
KINDS: dict[str, str] = {
    "server": N_("server"), "ca": N_("certificate authority"), "web": N_("web"),
    "dicom": N_("DICOM (plain)"), "dicom_tls": N_("DICOM TLS"), "https": N_("Web (HTTPS)"),
}


@dataclass(frozen=True)
class Worded:
    code: str
    severity: str
    what: str
    fix: str
    link: str


def word(problem: Problem, _: Gettext, lang: str) -> Worded:
    """``problem`` in the reader's language."""
    params: dict[str, Any] = dict(problem.params)
    if problem.code == "check.critical":
        return Worded(problem.code, problem.severity, params["title"].get(lang),
                      params["fix"].get(lang), problem.link)
    for key in ("kind",):
        if key in params and str(params[key]) in KINDS:
            params[key] = _(KINDS[str(params[key])])
    if "when" in params and hasattr(params["when"], "strftime"):
        params["when"] = params["when"].strftime("%Y-%m-%d %H:%M")
    if problem.code not in TEXTS:
        return Worded(problem.code, problem.severity, problem.code, "", problem.link)
    what, fix = TEXTS[problem.code]
    return Worded(problem.code, problem.severity, _(what) % params, _(fix) % params,
                  problem.link)
