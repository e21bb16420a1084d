"""Check section 'accounts' (issue 18). Placeholder: filled by its owner."""

from __future__ import annotations

from pacsvault.check.model import CheckContext, Finding


def check(ctx: CheckContext) -> list[Finding]:
    return []
