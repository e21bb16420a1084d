"""Skip or fail when a real component (PostgreSQL, SeaweedFS) is not installed here."""

from __future__ import annotations

import os

import pytest


def require(missing: str | None) -> None:
    """Skip a test whose component is missing (``missing`` says why); under CI (``CI=true``)
    fail instead: CI installs both (scripts/install.sh --test) and must run those tests."""
    if missing is None:
        return
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"{missing}; required under CI", pytrace=False)
    pytest.skip(missing)
