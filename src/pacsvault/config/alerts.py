"""The ``[alerts]`` settings: addresses, thresholds and rule ids, and their toml block.

Why apart from ``audit/alerts``: the settings model is read by ``config`` at every start
(and by everyday CLI commands), which must not import the SMTP/webhook delivery code.
Secrets never live here: the SMTP password and webhook token are read from 0600 files.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import urllib.parse
import zoneinfo
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

RULES: dict[str, str] = {
    "failed-logins": "repeated failed sign-ins",
    "account-locked": "an account was locked",
    "exposure": "a connection from outside the trusted networks",
    "unknown-node": "an unknown or unauthorised DICOM node",
    "bulk-access": "one user or node reading an unusual number of studies or patients",
    "unusual-hours": "access outside business hours",
    "audit-broken": "the audit trail does not verify",
    "disk-full": "the archive disk is (nearly) full",
    "connection-abuse": "one source repeatedly refused by the connection budget",
    "audit-unwritable": "the audit trail cannot be written: accesses are refused",
    "backup-failed": "a backup, its verification or its restore drill failed",
    "backup-stale": "the last good backup is older than the configured limit",
    "archive-sealed": "the server runs sealed (master key unavailable), or a sealed-mode "
                      "file is damaged",
    "object-storage": "the object storage (an S3 bucket) is unreachable, or an object is "
                      "missing or corrupt",
    "breach-clock": "a breach record reached 48 h or 66 h of its 72 without a decision on "
                    "notifying the authority",
    "exposure-switch": "a change of who can reach the archive (remote access, bind, trusted "
                       "networks, DICOM TLS from anywhere), applied, refused or pending",
    "security-check": "the nightly security check found a critical point it had not found "
                      "the night before",
    "forwarding": "automatic forwarding to a device keeps failing (images are not reaching "
                  "the workstation that expects them)",
}

DAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
Day = Literal["mon", "tue", "wed", "thu", "fri", "sat", "sun"]
WORK_DAYS: tuple[Day, ...] = ("mon", "tue", "wed", "thu", "fri", "sat")


def is_loopback_host(host: str) -> bool:
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


class AlertConfigError(Exception):
    """The alert settings or their secret files are unusable (message is user-facing)."""


class AlertSettings(BaseModel):
    """The ``[alerts]`` section. Addresses and thresholds only: secrets live in 0600 files."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    enabled: bool = True
    # Label of this server in messages (default: the host name), so the reader knows
    # which machine to look at.
    server_name: str = Field("", max_length=64)

    # --- e-mail (empty smtp_host or mail_to: no e-mail, alerts still go to the trail) ---
    smtp_host: str = ""
    smtp_port: int = Field(587, ge=1, le=65535)
    # starttls (default, port 587) or tls (implicit, port 465); "none" only for a relay on
    # this machine (loopback), since the mail would otherwise cross the network in clear.
    smtp_security: Literal["starttls", "tls", "none"] = "starttls"
    smtp_username: str = ""
    smtp_password_file: str = ""  # path of a file readable by its owner only (chmod 600)
    # Extra CA to trust instead of the system CAs (a practice relay with its own CA).
    smtp_ca_file: str = ""
    smtp_timeout: float = Field(30.0, gt=0)
    mail_from: str = ""  # default pacsvault@<host name>
    mail_to: list[str] = Field(default_factory=list)

    # --- webhook (optional) ---
    webhook_url: str = ""
    webhook_token_file: str = ""  # bearer token, file readable by its owner only
    webhook_ca_file: str = ""
    # http:// is refused except to a loopback address when this is set (tests, local relay).
    webhook_allow_http_loopback: bool = False
    webhook_timeout: float = Field(10.0, gt=0)

    # --- rules ---
    disabled_rules: list[str] = Field(default_factory=list)
    failed_logins_per_10min: int = Field(5, ge=1)  # alert when this many fail in 10 min
    bulk_studies_per_hour: int = Field(50, ge=1)  # alert when MORE distinct studies in 1 h
    bulk_patients_per_hour: int = Field(40, ge=1)  # alert when MORE distinct patients in 1 h
    business_hours: str = Field("07:00-20:00", pattern=r"^\d\d:\d\d-\d\d:\d\d$")
    business_days: list[Day] = Field(default_factory=lambda: list(WORK_DAYS))
    timezone: str = ""  # IANA name, e.g. "Europe/Paris"; empty = this machine's time zone
    group_minutes: int = Field(15, ge=1, le=1440)
    disk_warn_free_mb: int = Field(2048, ge=0)  # 0 = no free-space check

    @field_validator("disabled_rules")
    @classmethod
    def _known_rules(cls, value: list[str]) -> list[str]:
        unknown = sorted(set(value) - set(RULES))
        if unknown:
            raise ValueError(f"unknown rule(s) {', '.join(unknown)}; "
                             f"known: {', '.join(RULES)}")
        return value

    @field_validator("mail_to")
    @classmethod
    def _addresses(cls, value: list[str]) -> list[str]:
        for address in value:
            if "@" not in address or any(c in address for c in "\r\n,;<> "):
                raise ValueError(f"not a plain e-mail address: {address!r}")
        return value

    @field_validator("mail_from", "server_name", "smtp_host", "smtp_username")
    @classmethod
    def _one_line(cls, value: str) -> str:
        if any(ord(c) < 32 or ord(c) == 127 for c in value):
            raise ValueError("must be a single line of printable text")
        return value

    @field_validator("business_hours")
    @classmethod
    def _hours(cls, value: str) -> str:
        for part in value.split("-"):
            hour, minute = (int(x) for x in part.split(":"))
            if not (0 <= hour <= 24 and 0 <= minute < 60) or (hour == 24 and minute):
                raise ValueError(f"not a time of day: {part}")
        return value

    @field_validator("timezone")
    @classmethod
    def _zone(cls, value: str) -> str:
        if value:
            try:
                zoneinfo.ZoneInfo(value)
            except (zoneinfo.ZoneInfoNotFoundError, ValueError):
                raise ValueError(f"unknown time zone {value!r}") from None
        return value

    @model_validator(mode="after")
    def _consistent(self) -> AlertSettings:
        if self.smtp_security == "none" and self.smtp_host and not is_loopback_host(
            self.smtp_host
        ):
            raise ValueError("smtp_security = \"none\" is only allowed for a relay on this "
                             "machine (localhost); use starttls or tls")
        if self.smtp_username and not self.smtp_password_file:
            raise ValueError("smtp_username needs smtp_password_file (the password itself "
                             "never goes in this file)")
        if self.webhook_url:
            parts = urllib.parse.urlsplit(self.webhook_url)
            loopback_http = (parts.scheme == "http" and self.webhook_allow_http_loopback
                             and is_loopback_host(parts.hostname or ""))
            if not parts.hostname or (parts.scheme != "https" and not loopback_http):
                raise ValueError("webhook_url must be an https:// URL")
        return self

    @property
    def mail_enabled(self) -> bool:
        return bool(self.smtp_host and self.mail_to)

    def hours(self) -> tuple[dt.time, dt.time]:
        def parse(text: str) -> dt.time:
            hour, minute = (int(x) for x in text.split(":"))
            return dt.time.max if hour == 24 else dt.time(hour, minute)

        start, end = self.business_hours.split("-")
        return parse(start), parse(end)


def render_section() -> str:
    """The commented ``[alerts]`` block for the settings file written by ``init``."""
    return """\
[alerts]
# Detection of suspicious activity. Every alert is recorded in the audit trail; with the
# settings below it is also e-mailed and/or posted to a webhook. Alerts never contain
# patient data: only what happened, when, which node/user/address, and where to look.
enabled = true
# Name of this server in the messages (default: the host name).
server_name = ""
# E-mail through your provider's SMTP server (STARTTLS on port 587, or "tls" on 465).
# Leave smtp_host empty to send no e-mail.
smtp_host = ""
smtp_port = 587
smtp_security = "starttls"
smtp_username = ""
# Path of a file holding the SMTP password, readable by its owner only (chmod 600).
smtp_password_file = ""
# Only if the mail server uses its own certificate authority (default: system CAs).
smtp_ca_file = ""
# Seconds to wait for the mail server before retrying later.
smtp_timeout = 30.0
mail_from = ""
mail_to = []            # e.g. ["dr.martin@example.fr", "dpo@example.fr"]
# Optional: JSON POST to an https:// URL (chat or monitoring). Token in a 0600 file.
webhook_url = ""
webhook_token_file = ""
# Only if the webhook's server uses its own certificate authority (default: system CAs).
webhook_ca_file = ""
# Allow http:// for a webhook on this machine (127.0.0.1/::1) only; never for others.
webhook_allow_http_loopback = false
webhook_timeout = 10.0
# Rules: failed-logins, account-locked, exposure, unknown-node, bulk-access,
# unusual-hours, audit-broken, disk-full, audit-unwritable, backup-failed, backup-stale,
# archive-sealed, object-storage, breach-clock, exposure-switch, security-check,
# forwarding. List here the ones you do not want.
disabled_rules = []
# Failed sign-ins within 10 minutes (from one address, or for one user) that raise an alert.
failed_logins_per_10min = 5
# Alert when one user or node reads more than this many different studies / patients
# within one hour (retrievals, exports, image views; queries and incoming images excluded).
bulk_studies_per_hour = 50
bulk_patients_per_hour = 40
# Reading images or signing in outside these hours and days raises an alert.
business_hours = "07:00-20:00"
business_days = ["mon", "tue", "wed", "thu", "fri", "sat"]
timezone = ""           # e.g. "Europe/Paris"; empty = this machine's time zone
# Repeats of one alert within this many minutes are grouped into one follow-up message.
group_minutes = 15
# Warn when free space on the archive disk falls below this (MB); 0 = no check.
disk_warn_free_mb = 2048
"""


__all__ = [
    "DAYS", "RULES", "WORK_DAYS", "AlertConfigError", "AlertSettings", "Day",
    "is_loopback_host", "render_section",
]
