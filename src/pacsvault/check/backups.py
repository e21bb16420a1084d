"""Check section 'backups': is there a recent good copy, and was restoring it ever tried?

Why from ``backup.health``: the same verdicts as Health and ``pacsvault status`` (read from
the settings and the state file, no restic call), so the three never disagree. A backup
nobody has restored is a hope, not a copy: the restore drill's age is checked as well.
"""

from __future__ import annotations

import datetime as dt

from pacsvault.backup.health import backup_health
from pacsvault.check.model import (
    CNIL_BACKUP,
    GDPR_32_C,
    GDPR_32_D,
    CheckContext,
    Finding,
    Localized,
    Severity,
    requirement,
)

SECTION = "backups"
REQ = requirement(GDPR_32_C, CNIL_BACKUP)
# A backup this old is no longer a weakness but a loss waiting to happen.
CRITICAL_AGE = dt.timedelta(days=7)


def check(ctx: CheckContext) -> list[Finding]:
    settings = ctx.vault.settings.backup
    health = backup_health(ctx.vault.layout, settings, ctx.now)
    if not health.configured:
        return [Finding(
            id="backups.none", section=SECTION, severity=Severity.WARNING,
            title=Localized("No backup configured", "Aucune sauvegarde configurée"),
            requirement=REQ,
            evidence=Localized("pacsvault.toml has no [[backup.targets]] entry: a disk "
                               "failure, a theft or ransomware loses every image.",
                               "pacsvault.toml n’a aucune entrée [[backup.targets]] : une "
                               "panne de disque, un vol ou un rançongiciel fait perdre "
                               "toutes les images."),
            fix=Localized("Add two targets (a USB disk and an off-site repository) under "
                          "[[backup.targets]] and restart the server; the first backup "
                          "runs at once.",
                          "Ajoutez deux cibles (un disque USB et un dépôt hors site) sous "
                          "[[backup.targets]] et redémarrez le serveur ; la première "
                          "sauvegarde démarre aussitôt."),
        )]
    out: list[Finding] = []
    for t in health.targets:
        if t.state in ("never", "failing", "stale"):
            old = t.last_success is None or ctx.now - t.last_success > CRITICAL_AGE
            age = "never" if t.age_hours is None else f"{t.age_hours:.0f} h"
            age_fr = "jamais" if t.age_hours is None else f"{t.age_hours:.0f} h"
            out.append(Finding(
                id="backups.stale", section=SECTION,
                severity=Severity.CRITICAL if old else Severity.WARNING,
                title=Localized(f"No recent good backup on '{t.name}'",
                                f"Pas de sauvegarde récente sur « {t.name} »"),
                requirement=REQ,
                evidence=Localized(
                    f"Target '{t.name}': state {t.state}, last good backup {age} ago "
                    f"(limit {health.max_age_hours} h)."
                    + (" The last run failed." if t.state == "failing" else ""),
                    f"Cible « {t.name} » : état {t.state}, dernière sauvegarde réussie il y "
                    f"a {age_fr} (limite {health.max_age_hours} h)."
                    + (" La dernière exécution a échoué." if t.state == "failing" else "")),
                fix=Localized("Check that the disk is plugged in or the repository "
                              "reachable, then run 'pacsvault backup run'.",
                              "Vérifiez que le disque est branché ou le dépôt joignable, "
                              "puis lancez « pacsvault backup run »."),
                data={"target": t.name, "state": t.state, "age_hours": t.age_hours}))
            continue
        out.extend(_drill(ctx, t.name, t.last_drill, t.last_drill_ok,
                          settings.drill_every_days))
    return out


def _drill(ctx: CheckContext, name: str, last: dt.datetime | None, ok: bool | None,
           every_days: int) -> list[Finding]:
    req = requirement(GDPR_32_D, CNIL_BACKUP)
    fix = Localized("Run 'pacsvault backup drill' (a restore into a scratch directory, "
                    "opened and verified).",
                    "Lancez « pacsvault backup drill » (restauration dans un répertoire "
                    "temporaire, ouverte et vérifiée).")
    if ok is False:
        return [Finding(
            id="backups.drill-failed", section=SECTION, severity=Severity.WARNING,
            title=Localized(f"Last restore drill of '{name}' failed",
                            f"Le dernier test de restauration de « {name} » a échoué"),
            requirement=req,
            evidence=Localized("Restoring this backup did not give back the archive as it "
                               "was.", "La restauration de cette sauvegarde n’a pas rendu "
                               "l’archive telle qu’elle était."),
            fix=fix, data={"target": name})]
    limit = dt.timedelta(days=2 * every_days)
    if last is None or ctx.now - last > limit:
        days = "never" if last is None else f"{(ctx.now - last).days} days ago"
        jours = "jamais" if last is None else f"il y a {(ctx.now - last).days} jours"
        return [Finding(
            id="backups.drill-old", section=SECTION,
            severity=Severity.INFO if last is None else Severity.WARNING,
            title=Localized(f"No recent restore drill of '{name}'",
                            f"Pas de test de restauration récent de « {name} »"),
            requirement=req,
            evidence=Localized(f"Last restore drill: {days} (expected every {every_days} "
                               "days).",
                               f"Dernier test de restauration : {jours} (attendu tous les "
                               f"{every_days} jours)."),
            fix=fix, data={"target": name})]
    return []
