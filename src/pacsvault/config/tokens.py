"""The ``[tokens]`` settings: how long an API token may live (issue 19, token policy).

Why limits at all: a bearer token is a single factor that a script keeps in a file; the
sanctioned practices' leaks came from credentials nobody remembered. So a token lasts 30
days unless asked otherwise, never more than ``max_days`` (90 by default, a year at most
whatever the setting), and dies after ``idle_days`` without use: a forgotten token stops
working by itself.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, model_validator

# Whatever the settings say, no token outlives a year.
CEILING_DAYS = 365


class TokenSettings(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    default_days: int = Field(30, ge=1, le=CEILING_DAYS)
    max_days: int = Field(90, ge=1, le=CEILING_DAYS)
    idle_days: int = Field(30, ge=1, le=CEILING_DAYS)

    @model_validator(mode="after")
    def _default_within_max(self) -> TokenSettings:
        if self.default_days > self.max_days:
            raise ValueError("default_days cannot exceed max_days")
        return self


TOML_SECTION = """\
[tokens]
# API tokens (pacsvault token create): lifetime when none is asked, the longest one that
# may be asked (at most 365), and days without any use after which a token expires.
default_days = 30
max_days = 90
idle_days = 30
"""

__all__ = ["CEILING_DAYS", "TOML_SECTION", "TokenSettings"]
