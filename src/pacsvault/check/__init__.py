"""The security self-check (issue 18): what would expose patient data today, and how to fix it.

Why a package of its own: the sanctioned practices were never told their server was open;
``pacsvault check`` (run nightly by ``serve``, shown on the admin "Security check" page and
summarised on Health) answers the inspector's questions every morning. Each section is a
small module returning ``Finding``s; this module holds the shared vocabulary and the
runner, so the command, the page, the nightly job and the exposure-switch guard (issue 19)
all see the same result.

A finding never carries patient data: ids, counts, addresses, paths and settings only.
"""

from __future__ import annotations

from pacsvault.check.model import (
    CheckContext,
    CheckResult,
    Finding,
    Localized,
    Section,
    Severity,
)
from pacsvault.check.runner import SECTION_NAMES, run

__all__ = [
    "SECTION_NAMES",
    "CheckContext",
    "CheckResult",
    "Finding",
    "Localized",
    "Section",
    "Severity",
    "run",
]
