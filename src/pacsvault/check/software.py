"""Check section 'software': installed versions against the advisories shipped with the release.

Why a list in the package (``check/data/known_vulnerable.toml``) and no online lookup: a
medical archive should not call out to the Internet on its own, and the list a release was
built with is reviewable; the finding says which advisory, which version is installed and
which one fixes it. Versions compared with ``packaging`` (PEP 440), never as strings.

Options (``ctx.options``): ``advisories`` (a path to another list, for tests) and
``versions`` (a mapping package -> version that replaces what is installed).
"""

from __future__ import annotations

import importlib.metadata
import tomllib
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from packaging.specifiers import InvalidSpecifier, SpecifierSet
from packaging.version import InvalidVersion, Version

from pacsvault.check.model import (
    CNIL_SERVERS,
    GDPR_32,
    CheckContext,
    Finding,
    Localized,
    Severity,
    requirement,
)

SECTION = "software"
REQ = requirement(GDPR_32, CNIL_SERVERS)


@dataclass(frozen=True)
class Advisory:
    package: str
    id: str
    affected: tuple[SpecifierSet, ...]
    fixed: str
    severity: Severity
    summary: Localized

    def affects(self, version: Version) -> bool:
        return any(spec.contains(version, prereleases=True) for spec in self.affected)


def load_advisories(path: Path | None = None) -> list[Advisory]:
    if path is None:
        text = resources.files("pacsvault.check").joinpath(
            "data/known_vulnerable.toml").read_text("utf-8")
    else:
        text = path.read_text("utf-8")
    out: list[Advisory] = []
    for entry in tomllib.loads(text).get("advisory", []):
        out.append(_advisory(entry))
    return out


def _advisory(entry: dict[str, Any]) -> Advisory:
    try:
        specs = tuple(SpecifierSet(part.strip())
                      for part in str(entry["affected"]).split("||"))
    except InvalidSpecifier as exc:
        raise ValueError(f"advisory {entry.get('id')}: bad 'affected': {exc}") from None
    summary = str(entry.get("summary", ""))
    return Advisory(
        package=str(entry["package"]).lower(), id=str(entry["id"]), affected=specs,
        fixed=str(entry.get("fixed", "")), severity=Severity(str(entry["severity"])),
        summary=Localized(summary, str(entry.get("summary_fr", summary))))


def installed(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def check(ctx: CheckContext) -> list[Finding]:
    path = ctx.options.get("advisories")
    advisories = load_advisories(Path(path) if path else None)
    overrides: dict[str, str] = {str(k).lower(): str(v)
                                 for k, v in dict(ctx.options.get("versions") or {}).items()}
    out: list[Finding] = []
    for adv in advisories:
        text = overrides.get(adv.package) or installed(adv.package)
        if text is None:
            continue
        try:
            version = Version(text)
        except InvalidVersion:
            continue
        if not adv.affects(version):
            continue
        out.append(Finding(
            id=f"software.{adv.package}.{adv.id}", section=SECTION, severity=adv.severity,
            title=Localized(f"{adv.package} {text} has a known vulnerability ({adv.id})",
                            f"{adv.package} {text} a une vulnérabilité connue ({adv.id})"),
            requirement=REQ,
            evidence=Localized(f"{adv.package} {text} is installed: {adv.summary.en}.",
                               f"{adv.package} {text} est installé : {adv.summary.fr}."),
            fix=Localized(f"Upgrade pacsvault (or {adv.package} to {adv.fixed} or later) "
                          "and restart the server.",
                          f"Mettez pacsvault à jour (ou {adv.package} en {adv.fixed} ou "
                          "plus) et redémarrez le serveur."),
            data={"package": adv.package, "installed": text, "advisory": adv.id,
                  "fixed": adv.fixed}))
    return out
