"""Names of the security events the Health page lists (issue 20, item 7).

The audit page's table (``web/audit_names``) names the actions a DPO filters on; the
Health page's "latest security events" are mostly others (a refused form, an unknown
C-MOVE destination, a refused exposure switch...). This table adds those, in the same
way (``N_``, the catalogs in ``web/locale``), and falls back to ``audit_names`` (its
names, then its families, then the code): a raw code is the last resort, and the page
keeps it as the cell's tooltip; an action nobody named yet reads "Security event (code)".
"""

from __future__ import annotations

from pacsvault.web.audit_names import ACTIONS, action_name
from pacsvault.web.i18n import N_, Gettext

SECURITY_ACTIONS: dict[str, str] = {
    "web.csrf.refused": N_("Form refused (missing or wrong security token)"),
    "web.admin.refused": N_("Administration refused (not an administrator)"),
    "alert.failed": N_("Alert could not be sent"),
    "audit.export.overflow": N_("Audit export too large"),
    "backup.drill": N_("Restore drill"),
    "backup.stale": N_("Backup too old"),
    "dicom.move.unknown_destination": N_("Sending refused: unknown destination"),
    "dicom.qr.contexts_refused": N_("DICOM query refused (unsupported request)"),
    "dicom.send.refused": N_("Sending refused"),
    "dicom.store.conflict": N_("Conflicting image refused (DICOM)"),
    "dicom.echo": N_("Connection test (C-ECHO)"),
    "exposure.refused": N_("Exposure change refused"),
    "exposure": N_("Exposure changed"),
    "forward.failing": N_("Automatic forwarding failing"),
    "key.recover": N_("Master key recovered"),
    "node.tls_profile": N_("Device TLS profile changed"),
    "sealed.journal.damaged": N_("Sealed-mode journal damaged"),
    "sealed.snapshot": N_("Sealed-mode snapshot"),
    "sealed.store.conflict": N_("Conflicting image refused (sealed mode)"),
    "sealed.unseal": N_("Archive unsealed"),
    "sealed.unseal.page": N_("Unseal page used"),
    "tls.ca.rotate": N_("Certificate authority replaced"),
    "alerts.choice": N_("Alert channels chosen"),
    "alerts.test": N_("Alert channel tested"),
    "alerts.untested": N_("Alert channel not tested"),
    "check.run": N_("Security check run"),
    "keys.protected": N_("Master key protected"),
    "keys.unprotected": N_("Master key protection removed"),
    "keys.rotated": N_("Keys rotated"),
    "sealed.merged": N_("Sealed-mode images merged"),
    "storage.scrub": N_("Object scrub"),
    "storage.orphans": N_("Orphan sweep"),
}
FAMILIES: dict[str, str] = {
    "web.": N_("Web pages"),
    "forward.": N_("Automatic forwarding"),
    "alerts.": N_("Alerts"),
    "check.": N_("Security check"),
    "accounts.": N_("User accounts"),
}


def event_name(action: str, _: Gettext) -> str:
    """The reader's name of a security event's ``action``."""
    if action in ACTIONS:
        return action_name(action, _)
    if action in SECURITY_ACTIONS:
        return _(SECURITY_ACTIONS[action])
    named = action_name(action, _)
    if named != action:
        return named
    for prefix, name in FAMILIES.items():
        if action.startswith(prefix):
            return f"{_(name)} ({action})"
    return f"{_('Security event')} ({action})" if action else action
