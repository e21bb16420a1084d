"""Check section 'audit': does the trail verify, is it kept as long as it should, and
does its copy reach the collector?

Why: after an incident the trail is the only answer to "who saw what" (and to the breach
notification's questions); a trail that does not verify, that was purged too early or kept
forever, or whose off-machine copy silently stopped, fails the day it is needed.

Options (``ctx.options``): ``syslog_timeout`` (seconds, default 3) for the collector probe
(a TCP connection only, no record sent; skipped when ``ctx.probe`` is false).
"""

from __future__ import annotations

import datetime as dt
import json
import socket

from pacsvault.audit.instances import verify_all
from pacsvault.check.model import (
    CNIL_TRACE,
    DICOM_PS3_15,
    GDPR_5_E,
    GDPR_32,
    CheckContext,
    Finding,
    Localized,
    Severity,
    requirement,
)

SECTION = "audit"
REQ = requirement(GDPR_32, CNIL_TRACE, DICOM_PS3_15)
MIN_RETENTION_DAYS = 180  # the regulator's guide: logs kept 6 months to 1 year
PURGE_SLACK = dt.timedelta(days=3)  # the purge runs daily; a few days late is no finding


def check(ctx: CheckContext) -> list[Finding]:
    out: list[Finding] = []
    verdict = verify_all(ctx.vault.audit)
    if not verdict.ok:
        problem = "; ".join(verdict.problems)[:300] or "the chain does not verify"
        out.append(Finding(
            id="audit.chain-broken", section=SECTION, severity=Severity.CRITICAL,
            title=Localized("Audit trail does not verify",
                            "Le journal d’audit ne se vérifie pas"),
            requirement=REQ,
            evidence=Localized(f"Verification failed: {problem}",
                               f"La vérification a échoué : {problem}"),
            fix=Localized("Run 'pacsvault audit verify' to see where; treat an edit you did "
                          "not make as an incident (the breach register).",
                          "Lancez « pacsvault audit verify » pour voir où ; traitez une "
                          "modification que vous n’avez pas faite comme un incident (le "
                          "registre des violations)."),
            data={"records": verdict.records}))
    out.extend(_retention(ctx))
    out.extend(_syslog(ctx))
    return out


def _oldest(ctx: CheckContext) -> dt.datetime | None:
    """Time of the oldest record still in clear (sealed runs are what the purge left)."""
    try:
        with ctx.vault.audit.path.open("rb") as fh:
            for _ in range(1000):
                line = fh.readline()
                if not line:
                    return None
                try:
                    body = json.loads(line)
                except ValueError:
                    return None
                if body.get("kind") == "seal":
                    continue
                when = dt.datetime.fromisoformat(str(body["time"]))
                return when if when.tzinfo else when.replace(tzinfo=dt.UTC)
    except (OSError, KeyError, ValueError):
        return None
    return None


def _retention(ctx: CheckContext) -> list[Finding]:
    days = ctx.vault.settings.audit.retention_days
    out: list[Finding] = []
    if days < MIN_RETENTION_DAYS:
        out.append(Finding(
            id="audit.retention-short", section=SECTION, severity=Severity.WARNING,
            title=Localized("Audit trail kept too briefly",
                            "Journal d’audit conservé trop peu de temps"),
            requirement=REQ,
            evidence=Localized(
                f"[audit] retention_days = {days}: an intrusion found after {days} days "
                "cannot be traced back.",
                f"[audit] retention_days = {days} : une intrusion découverte après {days} "
                "jours ne peut plus être retracée."),
            fix=Localized("Keep the trail 6 to 12 months (365 days, the default).",
                          "Conservez le journal 6 à 12 mois (365 jours, la valeur par "
                          "défaut)."),
            data={"retention_days": days}))
    oldest = _oldest(ctx)
    if oldest is not None and ctx.now - oldest > dt.timedelta(days=days) + PURGE_SLACK:
        age = (ctx.now - oldest).days
        out.append(Finding(
            id="audit.retention-overdue", section=SECTION, severity=Severity.WARNING,
            title=Localized("Audit records kept past the retention window",
                            "Traces d’audit conservées au-delà de la durée prévue"),
            requirement=requirement(GDPR_5_E, CNIL_TRACE),
            evidence=Localized(
                f"The oldest record is {age} days old; the retention window is {days} "
                "days: the daily purge is not running.",
                f"La trace la plus ancienne a {age} jours ; la durée de conservation est de "
                f"{days} jours : la purge quotidienne ne s’exécute pas."),
            fix=Localized("Run 'pacsvault audit purge' and keep 'pacsvault serve' running.",
                          "Lancez « pacsvault audit purge » et gardez « pacsvault serve » "
                          "en marche."),
            data={"oldest_days": age, "retention_days": days}))
    return out


def _syslog(ctx: CheckContext) -> list[Finding]:
    cfg = ctx.vault.settings.audit.syslog
    if not cfg.enabled or not cfg.host or not ctx.probe:
        return []
    timeout = float(ctx.options.get("syslog_timeout", 3.0))
    target = f"{cfg.host}:{cfg.port}"
    try:
        with socket.create_connection((cfg.host, cfg.port), timeout=timeout):
            pass
    except OSError as exc:
        reason = type(exc).__name__
        return [Finding(
            id="audit.syslog-unreachable", section=SECTION, severity=Severity.WARNING,
            title=Localized("Syslog collector unreachable",
                            "Collecteur syslog injoignable"),
            requirement=REQ,
            evidence=Localized(
                f"No TCP connection to {target} ({reason}): audit records wait in the "
                "local queue, and the off-machine copy is behind.",
                f"Pas de connexion TCP vers {target} ({reason}) : les traces attendent "
                "dans la file locale et la copie hors machine prend du retard."),
            fix=Localized("Check the collector and the network to it ([audit.syslog]).",
                          "Vérifiez le collecteur et le réseau jusqu’à lui ([audit.syslog])."),
            data={"target": target})]
    return []
