"""The ``[audit.syslog]`` settings (export to an ATNA collector) and their toml block.

Why apart from ``audit/syslog``: ``config`` reads this model at every start, and must not
import the encrypted queue or the TLS sender to do so. No secrets: paths only.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, model_validator

DEFAULT_PORT = 6514  # RFC 5425's port for syslog over TLS


class SyslogConfigError(ValueError):
    """The export settings cannot work (message is user-facing)."""


class SyslogSettings(BaseModel):
    """``[audit.syslog]``: where audit messages go. No secrets: paths only."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    enabled: bool = False
    host: str | None = None
    port: int = Field(DEFAULT_PORT, ge=1, le=65535)
    # Name to check in the collector's certificate when it differs from ``host``
    # (e.g. ``host`` is an IP address and the certificate names the machine).
    server_name: str | None = None
    ca_file: str | None = None
    client_cert: str | None = None
    client_key: str | None = None
    queue_limit: int = Field(100_000, ge=1)
    # Largest syslog record sent; bigger events are split into several AuditMessages.
    # RFC 5425 asks every receiver to take 8192 octets; raise it if the collector takes more.
    max_message_size: int = Field(8192, ge=2048, le=1 << 20)
    source_id: str | None = None  # AuditSourceID; default: the archive's AE title
    site_id: str | None = None  # AuditEnterpriseSiteID, e.g. the practice's name

    @model_validator(mode="after")
    def _complete(self) -> SyslogSettings:
        if self.enabled and not self.host:
            raise ValueError("the syslog export is enabled but has no host")
        if self.enabled and not self.ca_file:
            raise ValueError("the syslog export needs ca_file, the CA that signed the "
                             "collector's certificate (the collector is always verified)")
        if bool(self.client_cert) != bool(self.client_key):
            raise ValueError("client_cert and client_key go together")
        return self


TOML_SECTION = """\
[audit.syslog]
# Send every audit event to an audit record repository (IHE ATNA: DICOM audit messages
# over syslog/TLS, RFC 5424 + 5425). Events wait, encrypted, in audit/syslog-queue/ while
# the collector is unreachable and are delivered in order when it is back.
enabled = false
# host = "audit.example.lan"
port = 6514
# CA certificate (PEM) that signed the collector's certificate: the collector is verified.
# ca_file = "/etc/pacsvault/collector-ca.pem"
# Name in the collector's certificate, if it is not the host above.
# server_name = "audit.example.lan"
# Client certificate and key (PEM, unencrypted key) if the collector requires one.
# client_cert = "/etc/pacsvault/syslog-client.pem"
# client_key = "/etc/pacsvault/syslog-client.key"
# Most events kept while the collector is down (then a gap is reported to it).
queue_limit = 100000
# Largest record in octets (RFC 5425 receivers take 8192); bigger events are split.
max_message_size = 8192
# AuditSourceID (default: this archive's AE title) and AuditEnterpriseSiteID.
# source_id = "PACSVAULT"
# site_id = "Cabinet de radiologie"
"""


__all__ = ["DEFAULT_PORT", "TOML_SECTION", "SyslogConfigError", "SyslogSettings"]
