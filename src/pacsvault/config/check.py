"""The ``[check]`` settings: when ``serve`` runs the security self-check (issue 18).

Why a fixed time of day rather than "every 24 h from start": the practice reads the result
in the morning (Health, the Security check page, the alert mail), so it should be fresh
then whatever time the server was last restarted.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class CheckSettings(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    enabled: bool = True
    # Daily run time, this server's local time ("HH:MM").
    at: str = Field("06:00", pattern=r"^([01][0-9]|2[0-3]):[0-5][0-9]$")


TOML_SECTION = """\
[check]
# The security self-check ('pacsvault check': open ports, second factors, where the key
# lies, backups, audit trail, known-vulnerable versions) run by 'pacsvault serve' every
# day at this local time; the result is on Health and the Security check page, and a new
# critical finding raises an alert.
enabled = true
at = "06:00"
"""

__all__ = ["TOML_SECTION", "CheckSettings"]
