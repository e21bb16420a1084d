"""The vocabulary every check section shares: severities, findings, the run's context.

Findings carry both languages (``Localized``) rather than gettext message ids: the command
prints in ``--lang``, the page in the reader's language, the nightly audit record and the
alert in the practice's language, and a breach record (issue 18) may cite a finding in a
document of either language, long after the run, without re-running the check.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import StrEnum
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pacsvault.vault import Vault


class Severity(StrEnum):
    """Ordered: ``info`` is advice, ``warning`` a weakness, ``critical`` an exposure now."""

    INFO = "info"
    WARNING = "warning"
    CRITICAL = "critical"

    @property
    def rank(self) -> int:
        return {"info": 0, "warning": 1, "critical": 2}[self.value]


@dataclass(frozen=True)
class Localized:
    """One text in English and French (the two languages of the product)."""

    en: str
    fr: str

    def get(self, lang: str) -> str:
        return self.fr if lang == "fr" else self.en


@dataclass(frozen=True)
class Finding:
    """One thing the practice should know, with the rule it comes from and the fix.

    ``id`` is stable across releases ("section.what", e.g. ``network.upnp-mapping``): the
    nightly comparison (a *new* critical finding raises an alert), breach records and
    monitoring scripts key on it. ``requirement`` cites the source (GDPR article, the
    regulator's guide, ANSSI, DICOM PS3.15), ``evidence`` says what was observed (never
    patient data), ``fix`` what to do.
    """

    id: str
    section: str
    severity: Severity
    title: Localized
    requirement: str
    evidence: Localized
    fix: Localized
    data: dict[str, Any] = field(default_factory=dict)  # machine-readable evidence (JSON)

    def as_json(self, lang: str = "en") -> dict[str, Any]:
        return {
            "id": self.id,
            "section": self.section,
            "severity": self.severity.value,
            "title": self.title.get(lang),
            "requirement": self.requirement,
            "evidence": self.evidence.get(lang),
            "fix": self.fix.get(lang),
            "data": self.data,
        }


@dataclass(frozen=True)
class CheckContext:
    """What a section may use. ``probe`` allows active probes (TLS handshakes against this
    server's own listeners, UPnP/NAT-PMP questions to the gateway); ``options`` carries
    test overrides (e.g. the gateway's discovery address on loopback) and timeouts."""

    vault: Vault
    now: dt.datetime
    probe: bool = True
    options: dict[str, Any] = field(default_factory=dict)


Section = Callable[[CheckContext], list[Finding]]


@dataclass(frozen=True)
class CheckResult:
    started: dt.datetime
    finished: dt.datetime
    sections: tuple[str, ...]
    findings: tuple[Finding, ...]
    errors: tuple[tuple[str, str], ...] = ()  # (section, one-line reason) of a section that failed

    @property
    def worst(self) -> Severity | None:
        if not self.findings:
            return None
        return max((f.severity for f in self.findings), key=lambda s: s.rank)

    @property
    def exit_code(self) -> int:
        """0 clean (info only), 1 warnings (or a section that could not run), 2 critical."""
        worst = self.worst
        if worst is Severity.CRITICAL:
            return 2
        if worst is Severity.WARNING or self.errors:
            return 1
        return 0

    def ids(self, *, at_least: Severity = Severity.INFO) -> set[str]:
        return {f.id for f in self.findings if f.severity.rank >= at_least.rank}

    def as_json(self, lang: str = "en") -> dict[str, Any]:
        return {
            "started": self.started.isoformat(),
            "finished": self.finished.isoformat(),
            "sections": list(self.sections),
            "exit_code": self.exit_code,
            "worst": self.worst.value if self.worst else None,
            "findings": [f.as_json(lang) for f in self.findings],
            "errors": [{"section": s, "error": e} for s, e in self.errors],
        }


# The sources a finding cites (``Finding.requirement``). The regulator's guide is cited by
# its fiches' titles, stable across its editions (their numbers changed in 2024).
GDPR_32 = "GDPR art. 32(1)"
GDPR_32_B = "GDPR art. 32(1)(b)"
GDPR_32_C = "GDPR art. 32(1)(c)"
GDPR_32_D = "GDPR art. 32(1)(d)"
GDPR_5_E = "GDPR art. 5(1)(e)"
CNIL_GUIDE = "CNIL, Guide de la sécurité des données personnelles (2024)"
CNIL_AUTH = f'{CNIL_GUIDE}, fiche « Authentifier les utilisateurs »'
CNIL_RIGHTS = f'{CNIL_GUIDE}, fiche « Gérer les habilitations »'
CNIL_TRACE = f'{CNIL_GUIDE}, fiche « Tracer les opérations »'
CNIL_SERVERS = f'{CNIL_GUIDE}, fiche « Sécuriser les serveurs »'
CNIL_BACKUP = f'{CNIL_GUIDE}, fiche « Sauvegarder »'
CNIL_CRYPTO = f'{CNIL_GUIDE}, fiche « Chiffrer, garantir l’intégrité ou signer »'
DICOM_PS3_15 = "DICOM PS3.15 (Security and System Management Profiles)"


def requirement(*sources: str) -> str:
    """Several sources in one ``requirement`` string, in the order given."""
    return "; ".join(sources)


def finding_from_json(data: dict[str, Any]) -> Finding:
    """A finding read back from a kept run (``check-state.json``: both languages kept)."""
    return Finding(
        id=str(data["id"]), section=str(data["section"]),
        severity=Severity(str(data["severity"])),
        title=Localized(str(data["title"]["en"]), str(data["title"]["fr"])),
        requirement=str(data.get("requirement", "")),
        evidence=Localized(str(data["evidence"]["en"]), str(data["evidence"]["fr"])),
        fix=Localized(str(data["fix"]["en"]), str(data["fix"]["fr"])),
        data=dict(data.get("data") or {}),
    )


def finding_to_json(f: Finding) -> dict[str, Any]:
    """Both languages (the kept run is read by pages in either language)."""
    return {
        "id": f.id, "section": f.section, "severity": f.severity.value,
        "title": {"en": f.title.en, "fr": f.title.fr}, "requirement": f.requirement,
        "evidence": {"en": f.evidence.en, "fr": f.evidence.fr},
        "fix": {"en": f.fix.en, "fr": f.fix.fr}, "data": f.data,
    }
