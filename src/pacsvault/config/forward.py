"""Automatic forwarding (issue 20, part 5): the ``[forward]`` section and its rules.

Why rules in settings and not in the index: they are part of how the practice is set up
(which workstation gets which images), read by the IT provider with the rest of the
toml; the queue of what is still to be sent is in the index (``dicom/forward``).
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, field_validator


class ForwardRule(BaseModel):
    """Every instance received whose series modality is in ``modality`` (any when empty)
    and, when given, sent by one of the ``source`` AE titles, goes to ``node``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    node: str = Field(min_length=1, max_length=16)
    modality: list[str] = Field(default_factory=list)
    source: list[str] = Field(default_factory=list)

    @field_validator("modality", "source")
    @classmethod
    def _upper(cls, values: list[str]) -> list[str]:
        return [v.strip().upper() for v in values if v.strip()]

    def matches(self, modality: str, source_ae: str) -> bool:
        if self.modality and modality.strip().upper() not in self.modality:
            return False
        return not self.source or source_ae.strip().upper() in self.source


class ForwardSettings(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    rules: list[ForwardRule] = Field(default_factory=list)
    # First retry after this many seconds, then doubling up to ``max_retry_seconds``.
    retry_seconds: float = Field(30.0, gt=0)
    max_retry_seconds: float = Field(3600.0, gt=0)
    # An alert (audit event ``forward.failing``) once an instance failed this many times;
    # forwarding goes on trying (nothing is dropped silently).
    alert_after: int = Field(5, ge=1)
    # Instances sent in one association per destination and pass.
    batch: int = Field(200, ge=1, le=5000)


TOML_SECTION = """\
[forward]
# Automatic forwarding: images received are sent on to a registered node (with the
# retrieve role and a port), e.g. every CT and MR to the radiologist's workstation:
#   rules = [
#     { node = "RADIOWS", modality = ["CT", "MR"] },
#     { node = "ARCHIVE2", source = ["ECHO1"] },   # everything sent by ECHO1
#   ]
# modality and source (sending AE titles) are optional (absent: any). Images are
# forwarded after they are stored (never delaying the sender), from a queue kept in the
# index (a restart resumes it); a failure is retried after retry_seconds, doubling up to
# max_retry_seconds, and is recorded (forward.failing) after alert_after attempts.
rules = []
retry_seconds = 30.0
max_retry_seconds = 3600.0
alert_after = 5
batch = 200
"""

__all__ = ["TOML_SECTION", "ForwardRule", "ForwardSettings"]
