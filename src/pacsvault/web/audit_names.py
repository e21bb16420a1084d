"""What the audit page calls each event, in the reader's language.

The trail stores stable codes (``dicomweb.retrieve``, ``auth.login.failed``, PS3.15 event
IDs): right for machines and the command line, opaque for a DPO. This table gives each a
sentence-case name, translated like every page string (``N_`` here, the catalogs in
``web/locale``). An action without a name (a new one, a later issue's) falls back to the
name of its family (``auth.…``), then to its code: the page never hides an event because
it has no name yet. The raw code stays visible behind each row.
"""

from __future__ import annotations

from pacsvault.audit.grouping import VIEW
from pacsvault.web.i18n import N_, Gettext

ACTIONS: dict[str, str] = {
    VIEW: N_("Viewed a study"),
    "dicomweb.retrieve": N_("Images read (DICOMweb)"),
    "dicomweb.search": N_("Search (DICOMweb)"),
    "dicomweb.store": N_("Images received (DICOMweb)"),
    "dicomweb.store.committed": N_("Images saved (DICOMweb)"),
    "dicomweb.store.conflict": N_("Conflicting image refused (DICOMweb)"),
    "dicom.association.accepted": N_("DICOM connection accepted"),
    "dicom.association.rejected": N_("DICOM connection refused"),
    "dicom.store.committed": N_("Images saved (DICOM)"),
    "dicom.store.association": N_("Images received (DICOM)"),
    "dicom.store.failed": N_("Image not saved (DICOM)"),
    "dicom.store.refused": N_("Image refused (DICOM)"),
    "dicom.find": N_("Search (DICOM)"),
    "dicom.get": N_("Images sent (DICOM C-GET)"),
    "dicom.get.begin": N_("Sending started (DICOM C-GET)"),
    "dicom.move": N_("Images sent (DICOM C-MOVE)"),
    "dicom.move.begin": N_("Sending started (DICOM C-MOVE)"),
    "dicom.tls.handshake_failed": N_("Secure connection failed (DICOM)"),
    "export": N_("Export"),
    "export.deidentified": N_("De-identified export"),
    "export.media": N_("Patient CD or USB export"),
    "auth.login": N_("Sign-in"),
    "auth.login.failed": N_("Failed sign-in"),
    "auth.logout": N_("Sign-out"),
    "auth.session.ended": N_("Session ended"),
    "auth.second_factor.enrolled": N_("Second factor set up"),
    "auth.account.locked": N_("Account locked"),
    "auth.account.unlocked": N_("Account unlocked"),
    "auth.address.locked": N_("Address blocked"),
    "auth.passkey.added": N_("Passkey added"),
    "auth.passkey.removed": N_("Passkey removed"),
    "user.add": N_("User added"),
    "user.disable": N_("User disabled"),
    "user.enable": N_("User enabled"),
    "user.reset": N_("Password reset"),
    "user.roles": N_("Roles changed"),
    "user.recovery_codes": N_("Recovery codes renewed"),
    "token.create": N_("API token created"),
    "token.revoke": N_("API token revoked"),
    "token.new-address": N_("API token used from a new address"),
    "node.add": N_("DICOM device added"),
    "node.set": N_("DICOM device changed"),
    "node.remove": N_("DICOM device removed"),
    "audit.show": N_("Audit trail consulted"),
    "audit.export": N_("Audit trail exported"),
    "audit.patient_report": N_("Patient access report"),
    "audit.verify": N_("Audit trail verified"),
    "audit.tamper": N_("Audit trail altered"),
    "audit.purge": N_("Old audit records removed"),
    "application.start": N_("Archive started"),
    "application.stop": N_("Archive stopped"),
    "patient.erased": N_("Patient erased"),
    "patient.erasure.requested": N_("Erasure requested"),
    "patient.erasure.cancelled": N_("Erasure cancelled"),
    "patient.retention.listed": N_("Expired retention listed"),
    "object.deleted": N_("Image deleted"),
    "object.quarantined": N_("Image quarantined"),
    "share.created": N_("Share link created"),
    "share.revoked": N_("Share link revoked"),
    "share.opened": N_("Share link opened"),
    "gdpr.record.export": N_("Record of processing exported"),
    "breach.opened": N_("Breach recorded"),
    "backup.run": N_("Backup"),
    "alert.sent": N_("Alert sent"),
    "exposure.switch": N_("Exposure changed"),
    "dicom.send": N_("Images sent (send to)"),
    "dicom.send.begin": N_("Sending started (send to)"),
    "exposure.pending": N_("Exposure change waiting for a restart"),
    "breach.exported": N_("Breach documents exported"),
    "breach.patients.export": N_("Breach patient list exported (encrypted)"),
}
# Security events (the Health page's list, issue 20 item 7): named on the audit page too.
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
    "dicomweb.": N_("DICOMweb"),
    "dicom.": N_("DICOM network"),
    "auth.": N_("Sign-in and sessions"),
    "user.": N_("User accounts"),
    "token.": N_("API tokens"),
    "node.": N_("DICOM devices"),
    "audit.": N_("Audit trail"),
    "patient.": N_("Patient erasure"),
    "object.": N_("Image removal"),
    "share.": N_("Share links"),
    "breach.": N_("Breach register"),
    "backup.": N_("Backups"),
    "alert.": N_("Alerts"),
    "exposure": N_("Exposure"),
    "sealed.": N_("Sealed mode"),
    "keys.": N_("Keys"),
    "key.": N_("Keys"),
    "tls.": N_("Certificates"),
    "storage.": N_("Storage"),
    "retention.": N_("Retention"),
}
# PS3.15 A.5 event IDs (audit.EventCode values).
CODES: dict[str, str] = {
    "110100": N_("Application activity"),
    "110102": N_("Begin transferring DICOM instances"),
    "110103": N_("DICOM instances accessed"),
    "110104": N_("DICOM instances transferred"),
    "110106": N_("Export"),
    "110107": N_("Import"),
    "110108": N_("Network entry"),
    "110112": N_("Query"),
    "110113": N_("Security alert"),
    "110114": N_("User authentication"),
}
OUTCOMES: dict[str, str] = {  # audit.Outcome names, as the trail keeps them
    "success": N_("success"),
    "minor_failure": N_("minor failure"),
    "serious_failure": N_("serious failure"),
    "major_failure": N_("major failure"),
}
# The action filter's choices: (prefix, name); "" is every action.
FILTERS: tuple[tuple[str, str], ...] = (
    (VIEW, ACTIONS[VIEW]),
    ("dicomweb.search", ACTIONS["dicomweb.search"]),
    ("dicom.find", ACTIONS["dicom.find"]),
    ("dicom.get", ACTIONS["dicom.get"]),
    ("dicom.move", ACTIONS["dicom.move"]),
    ("dicomweb.store", ACTIONS["dicomweb.store"]),
    ("dicom.store", ACTIONS["dicom.store.association"]),
    ("export", ACTIONS["export"]),
    ("share.", FAMILIES["share."]),
    ("auth.", FAMILIES["auth."]),
    ("user.", FAMILIES["user."]),
    ("node.", FAMILIES["node."]),
    ("audit.", FAMILIES["audit."]),
    ("patient.", FAMILIES["patient."]),
)


def action_name(action: str, _: Gettext) -> str:
    """The reader's name of ``action`` (its family's, else the code itself)."""
    if action in ACTIONS:
        return _(ACTIONS[action])
    if action in SECURITY_ACTIONS:
        return _(SECURITY_ACTIONS[action])
    for prefix, name in FAMILIES.items():
        if action.startswith(prefix):
            return f"{_(name)} ({action})"
    return action


def code_name(code: str, _: Gettext) -> str:
    return _(CODES[code]) if code in CODES else code


def outcome_name(outcome: str, _: Gettext) -> str:
    return _(OUTCOMES[outcome]) if outcome in OUTCOMES else outcome
