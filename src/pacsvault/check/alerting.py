"""Check section 'alerts' (issue 19): would a person be told?

Why a section of its own: every other finding assumes someone reads it. With no e-mail or
webhook, an alert lands only in the trail and on the Health page, which nobody opens
during an incident: that is how the sanctioned practices learnt of their exposure from
outsiders. So "no alert channel" is a standing finding (whatever ``init`` was told), and
a channel never tested, or changed since its last successful test, is one too: the
exposure guard (``cli/exposure.py``) refuses to open the archive in either case.
"""

from __future__ import annotations

from pacsvault.check.model import CheckContext, Finding, Localized, Severity
from pacsvault.config.exposure import channels, last_tests

REQUIREMENT = ("GDPR art. 32(1)(d) and art. 33 (a breach must be known to be notified); "
               "CNIL, Guide de la sécurité des données personnelles (2024), fiche "
               "« Tracer les opérations »")


def check(ctx: CheckContext) -> list[Finding]:
    alerts = ctx.vault.settings.alerts
    configured = channels(alerts)
    if not configured:
        off = "" if alerts.enabled else " ([alerts] enabled = false)"
        return [Finding(
            id="alerts.no-channel", section="alerts", severity=Severity.WARNING,
            title=Localized("No alert reaches a person",
                            "Aucune alerte ne parvient à une personne"),
            requirement=REQUIREMENT,
            evidence=Localized(
                f"No e-mail address or webhook is configured{off}: security alerts "
                "(exposure, break-in attempts, failed backups) are only recorded in the "
                "audit trail.",
                f"Aucune adresse e-mail ni webhook n'est configuré{off} : les alertes de "
                "sécurité (exposition, tentatives d'intrusion, sauvegardes en échec) sont "
                "seulement inscrites dans le journal d'audit."),
            fix=Localized(
                "Set mail_to and smtp_host (or webhook_url) in the [alerts] section of "
                "pacsvault.toml, restart the server, then run 'pacsvault alerts test'.",
                "Renseignez mail_to et smtp_host (ou webhook_url) dans la section [alerts] "
                "de pacsvault.toml, redémarrez le serveur puis lancez "
                "« pacsvault alerts test »."),
            data={"channels": []})]
    ok = last_tests(ctx.vault.layout.root, alerts)
    untested = [c for c in configured if c not in ok]
    if not untested:
        return []
    names = ", ".join(untested)
    return [Finding(
        id="alerts.untested", section="alerts", severity=Severity.WARNING,
        title=Localized("An alert channel has never delivered a test",
                        "Un canal d'alerte n'a jamais transmis de test"),
        requirement=REQUIREMENT,
        evidence=Localized(
            f"No successful test of {names} as configured now (never tested, or its "
            "address changed since).",
            f"Aucun test réussi de {names} tel que configuré aujourd'hui (jamais testé, "
            "ou son adresse a changé depuis)."),
        fix=Localized("Run 'pacsvault alerts test' and check that the message arrives.",
                      "Lancez « pacsvault alerts test » et vérifiez que le message arrive."),
        data={"channels": configured, "untested": untested})]
