"""Vault settings: ``DATA/pacsvault.toml`` read into a validated model.

The toml is written once by ``init`` with every setting present and commented, so the
practice's IT provider can read what the server does without reading code. It never holds
a secret: keys live in the key file, whose *path* may be recorded here.
"""

from __future__ import annotations

import ipaddress
import tomllib
from pathlib import Path
from typing import Annotated, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from pacsvault.config.alerts import AlertSettings, render_section
from pacsvault.config.check import TOML_SECTION as CHECK_SECTION
from pacsvault.config.check import CheckSettings
from pacsvault.config.forward import TOML_SECTION as FORWARD_SECTION
from pacsvault.config.forward import ForwardSettings
from pacsvault.config.index import TOML_SECTION as INDEX_SECTION
from pacsvault.config.index import IndexSettings as IndexSettings
from pacsvault.config.syslog import TOML_SECTION as SYSLOG_SECTION
from pacsvault.config.syslog import SyslogSettings
from pacsvault.config.tokens import TOML_SECTION as TOKENS_SECTION
from pacsvault.config.tokens import TokenSettings
from pacsvault.config.tomledit import TomlValue, set_in_section
from pacsvault.service.bind import normalize as normalize_bind

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

CONFIG_NAME = "pacsvault.toml"
DEFAULT_TRUSTED = [
    "127.0.0.0/8", "::1/128",                              # loopback
    "10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16",       # RFC 1918
    "fc00::/7",                                            # RFC 4193 unique local
    "169.254.0.0/16", "fe80::/10",                         # link-local
]


class ConfigError(Exception):
    """The settings file is missing or invalid (message is user-facing)."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ServerSettings(_Strict):
    # Printable ASCII without backslash (the DICOM value separator), not only spaces.
    ae_title: Annotated[
        str, Field(min_length=1, max_length=16, pattern=r"^[ -\[\]-~]*[!-\[\]-~][ -\[\]-~]*$")
    ]
    # "private" (issue 19): every loopback and private address of this machine, one socket
    # each (service/bind.py), never a public one; or one address ("0.0.0.0": every
    # interface, the trusted-network rule filtering sources). Guarded (config/exposure.py).
    bind: str = "private"
    key_file: str | None = None

    @field_validator("bind")
    @classmethod
    def _bind_keyword(cls, value: str) -> str:
        """The keywords in any case, else an address (service/bind.py: the same rule as
        ``serve --bind``)."""
        return normalize_bind(value)


class DicomSettings(_Strict):
    port: int = Field(11112, ge=0, le=65535)
    tls_port: int = Field(2762, ge=0, le=65535)
    plain_enabled: bool = True
    trusted_networks: list[IPNetwork] = Field(
        default_factory=lambda: [ipaddress.ip_network(n) for n in DEFAULT_TRUSTED]
    )
    tls_from_anywhere: bool = False
    # Load balancers whose connections start with a PROXY protocol header (v1/v2) naming
    # the real client (``pacsvault/proxyproto``), on the DICOM and HTTPS listeners; from
    # them the header is required, from anyone else never read. Empty: off.
    proxy_protocol_from: list[IPNetwork] = Field(default_factory=list)
    maximum_pdu_size: int = Field(0, ge=0)
    network_timeout: float = Field(60.0, gt=0)
    # Resource budget for every unauthenticated byte (see dicom/limits.py).
    max_associations: int = Field(32, ge=1)
    max_connections_per_source: int = Field(8, ge=1)
    max_pending_connections: int = Field(64, ge=1)
    association_pdu_limit: int = Field(256 * 1024, ge=16 * 1024, le=16 * 1024 * 1024)
    connect_timeout: float = Field(10.0, gt=0)
    association_timeout: float = Field(30.0, gt=0)
    pdu_timeout: float = Field(60.0, gt=0)
    refusal_report_seconds: float = Field(60.0, gt=0)
    # Which transfer syntax we accept when a sender offers several in one presentation
    # context, per calling AE title (dicom/negotiation.py); default "keep" for everyone.
    syntax_preference: dict[str, Literal["keep", "as-offered", "explicit", "implicit"]] = (
        Field(default_factory=dict)
    )


class StorageSettings(_Strict):
    min_free_mb: int = Field(512, ge=0)
    duplicate_policy: str = Field("keep-first", pattern="^keep-first$")
    # A deflated dataset inflating beyond this is refused (A700), at storing and on reads.
    max_inflated_mb: int = Field(512, ge=1)
    # Objects in an S3 bucket instead of DATA/objects (storage/backends.py, storage/s3.py):
    # "s3://bucket/prefix"; empty = local files (the default).
    url: str = Field("", pattern=r"^(s3://[a-z0-9][a-z0-9.-]{1,61}[a-z0-9](/[A-Za-z0-9._/-]*)?)?$")
    endpoint: str = ""  # https://s3.example.net; empty: AWS for the region
    region: str = ""
    credentials_file: str = ""  # 0600: access_key_id = ... / secret_access_key = ...
    ca_file: str = ""  # a private CA for the endpoint's certificate (always verified)
    path_style: bool = False  # https://host/bucket/key (MinIO, SeaweedFS, Ceph by name)
    check_etag: bool = True  # a PUT's ETag must be its MD5 (off for SSE-KMS/SSE-C buckets)
    # An object no index row names is deleted once older than this (in-flight batches are
    # seconds old); the sweep lists the bucket this often, the scrubber reads every
    # indexed object once per scrub_every_hours at most scrub_per_second objects/s.
    orphan_grace_seconds: float = Field(3600.0, gt=0)
    # More unindexed objects than this at once: an index that does not go with the bucket
    # (restored from an older backup?): the sweep deletes nothing and says so.
    orphan_limit: int = Field(1000, ge=1)
    orphan_sweep_seconds: float = Field(3600.0, gt=0)
    scrub_every_hours: float = Field(24.0, gt=0)
    scrub_per_second: float = Field(20.0, gt=0)


class QuerySettings(_Strict):
    # Wall-clock seconds a C-FIND or QIDO query may spend in the index before it is
    # stopped (C-FIND A700, QIDO 413) and audited.
    time_budget_seconds: float = Field(10.0, gt=0)


class WebSettings(_Strict):
    enabled: bool = True
    https_port: int = Field(8443, ge=0, le=65535)
    # "lan": only the trusted networks may connect; "internet": anyone may reach the sign-in
    # page (admin functions still refuse outside sources).
    remote_access: str = Field("lan", pattern="^(lan|internet)$")
    # Fractional minutes are accepted (tests use a few seconds).
    session_idle_minutes: float = Field(30, gt=0)
    session_absolute_hours: int = Field(12, ge=1)
    # A certificate of your own (e.g. from your IT provider); default: the vault's CA.
    cert_file: str = ""
    key_file: str = ""
    # Where the OHIF viewer was installed (``pacsvault viewer install``); empty: the cache.
    viewer_dir: str = ""
    # Shown in the viewer's header instead of OHIF's logo (and in its tab).
    practice_name: str = Field("pacsvault", min_length=1, max_length=80)
    # The practice's time zone (IANA name): every date and time on the pages is shown in it.
    time_zone: str = Field("Europe/Paris", min_length=1, max_length=64)
    # OHIF modes offered beside the basic viewer (which has MPR for CT/MR); others hidden.
    viewer_modes: list[Literal["segmentation", "tmtv", "preclinical-4d", "us-pleura"]] = Field(
        default_factory=list)
    # Slowloris guard: seconds for a request's headers, and for its body (plus one second
    # per MiB received); connections at once, in all and per source address.
    header_timeout: float = Field(10.0, gt=0)
    body_timeout: float = Field(60.0, gt=0)
    max_connections: int = Field(512, ge=1)
    max_connections_per_source: int = Field(32, ge=1)

    @field_validator("time_zone")
    @classmethod
    def _zone(cls, value: str) -> str:
        import zoneinfo

        try:
            zoneinfo.ZoneInfo(value)
        except (zoneinfo.ZoneInfoNotFoundError, ValueError):
            raise ValueError(f"unknown time zone {value!r}") from None
        return value


DEFAULT_RETENTION_DAYS = 365


class AuditSettings(_Strict):
    retention_days: int = Field(DEFAULT_RETENTION_DAYS, ge=1)
    retention_justification: str = ""
    # The running server re-checks the trail against its index anchor this often (and on
    # every append): an edit, deletion, truncation or forgery is alerted within a minute.
    check_seconds: int = Field(30, ge=1, le=3600)
    # Several instances sharing a PostgreSQL index (issue 16): each appends a signed
    # checkpoint naming the others' heads this often (and at start and stop).
    checkpoint_seconds: int = Field(300, ge=5, le=86400)
    syslog: SyslogSettings = SyslogSettings()

    @model_validator(mode="after")
    def _justified(self) -> AuditSettings:
        if self.retention_days != DEFAULT_RETENTION_DAYS and not self.retention_justification:
            raise ValueError(
                "changing retention_days from the CNIL-recommended 365 needs a "
                "retention_justification"
            )
        return self


class BackupTarget(_Strict):
    """One place backups go: a USB disk, an off-site server or bucket (restic syntax)."""

    name: str = Field(pattern=r"^[a-z0-9][a-z0-9-]{0,31}$")
    # A restic repository: /media/usb/pacsvault-backup, sftp:user@host:/srv/backup,
    # s3:https://s3.example.net/bucket/pacsvault, rest:https://host:8000/pacsvault
    repository: str = Field(min_length=1)
    # Optional 0600 file of KEY=VALUE lines handed to restic's environment (e.g.
    # AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY). Never the repository password: that one
    # is derived from the vault's keys.
    credentials_file: str = ""


class BackupSettings(_Strict):
    targets: list[BackupTarget] = []
    # Daily run time, local time of the server ("HH:MM").
    schedule: str = Field("01:30", pattern=r"^([01][0-9]|2[0-3]):[0-5][0-9]$")
    # Alert when the last good backup of a target is older than this.
    max_age_hours: int = Field(36, ge=1)
    keep_daily: int = Field(7, ge=0)
    keep_weekly: int = Field(4, ge=0)
    keep_monthly: int = Field(12, ge=0)
    keep_yearly: int = Field(20, ge=0)
    # A restore drill (restore the latest snapshot, open and verify it) this often.
    drill_every_days: int = Field(30, ge=1)
    restic_binary: str = "restic"
    # PostgreSQL index (issue 16): the directory of pg_dump/pg_restore ("" = PATH). Their
    # major version must be at least the server's.
    pg_bin_dir: str = ""

    @model_validator(mode="after")
    def _unique_names(self) -> BackupSettings:
        names = [t.name for t in self.targets]
        if len(names) != len(set(names)):
            raise ValueError("backup target names must be unique")
        return self


class RetentionSettings(_Strict):
    """How long patient images are kept (``storage.retention``) before erasure may be
    proposed. French law (Code de la santé publique R1112-7): 20 years after the last
    exam, and for a minor at least until their 28th birthday."""

    years: int = Field(20, ge=1, le=200)
    minor_until_age: int = Field(28, ge=0, le=150)
    # Longer (or shorter) periods per modality, in years after the last exam with it,
    # e.g. per_modality = { MG = 30 }. The longest rule that applies wins.
    per_modality: dict[
        Annotated[str, Field(pattern=r"^[A-Z0-9]{1,16}$")], Annotated[int, Field(ge=1, le=200)]
    ] = Field(default_factory=dict)
    # A practice with a single administrator: an erasure is then confirmed by that
    # administrator typing the patient ID again (recorded), instead of a second admin.
    solo_practice: bool = False


class Settings(_Strict):
    server: ServerSettings
    dicom: DicomSettings = DicomSettings()
    storage: StorageSettings = StorageSettings()
    query: QuerySettings = QuerySettings()
    web: WebSettings = WebSettings()
    audit: AuditSettings = AuditSettings()
    alerts: AlertSettings = AlertSettings()
    backup: BackupSettings = BackupSettings()
    retention: RetentionSettings = RetentionSettings()
    index: IndexSettings = IndexSettings()
    tokens: TokenSettings = TokenSettings()
    check: CheckSettings = CheckSettings()
    forward: ForwardSettings = ForwardSettings()  # issue 20, part 5 (config/forward.py)

    def is_trusted(self, address: str) -> bool:
        ip = peer_ip(address)
        return ip is not None and any(ip in net for net in self.dicom.trusted_networks)

    def is_balancer(self, address: str) -> bool:
        """``address`` is a load balancer that sends a PROXY header (``proxy_protocol_from``)."""
        ip = peer_ip(address)
        return ip is not None and any(ip in net for net in self.dicom.proxy_protocol_from)


def peer_ip(address: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """A connection's source address as an IP (None when it is none): the IPv6 zone
    (``%eth0``) dropped, an IPv4-mapped IPv6 address (``::ffff:a.b.c.d``, a dual-stack
    socket) as the IPv4 address it is, so the trusted networks and the registered hosts
    are compared with what the peer really is."""
    try:
        ip = ipaddress.ip_address(address.split("%")[0])
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def load(data_dir: Path) -> Settings:
    path = data_dir / CONFIG_NAME
    try:
        raw = tomllib.loads(path.read_text("utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"no vault at {data_dir} ({CONFIG_NAME} missing); run 'pacsvault init'")\
            from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: {exc}") from None
    try:
        return Settings.model_validate(raw)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors()
        )
        raise ConfigError(f"{path}: {problems}") from None


def _toml_str(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def with_storage(text: str, storage: StorageSettings) -> str:
    """The settings file ``text`` with ``storage``'s S3 settings (``init --storage-url``)
    in place of the defaults of its ``[storage]`` section (comments kept)."""
    values: dict[str, TomlValue] = {
        name: getattr(storage, name)
        for name in ("url", "endpoint", "region", "credentials_file", "ca_file", "path_style")}
    try:
        return set_in_section(text, "storage", values)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None


def render(ae_title: str, key_file: Path | None, index: IndexSettings | None = None) -> str:
    """The commented settings file that ``init`` writes (``index``: a PostgreSQL index
    chosen at ``init``; default the embedded one)."""
    index = index or IndexSettings()
    index_section = INDEX_SECTION.format(url=_toml_str(index.url),
                                         password_file=_toml_str(index.password_file))
    key_line = (
        f"key_file = {_toml_str(str(key_file))}"
        if key_file
        else "# key_file = \"/media/usb/pacsvault.key\""
    )
    trusted = ",\n    ".join(_toml_str(n) for n in DEFAULT_TRUSTED)
    return f"""\
# pacsvault settings. Secrets are never stored here.
# Edit, then restart 'pacsvault serve'. Command-line flags override these values.

[server]
# DICOM Application Entity title of this archive (what modalities call "called AE").
ae_title = {_toml_str(ae_title)}
# Addresses to listen on. "private" = every loopback and private address of this machine
# (RFC 1918, IPv6 unique local; 169.254.x.x only when there is none), one socket each,
# never a public address; the server and init name them. An address this machine gets
# later (DHCP) is served after a restart. Or one address; 0.0.0.0 = every interface (the
# server names them at start; the trusted-network rule below still refuses sources
# outside the practice network). bind, trusted_networks, tls_from_anywhere and
# remote_access are exposure switches: every change is recorded and alerted, and one that
# opens the archive further (a public address or network, internet mode, TLS from
# anywhere) is refused, keeping the previous values, until an alert channel was tested
# ('pacsvault alerts test').
bind = "private"
# Master key file. Default: under the user's config directory, outside this data dir,
# so a copy of the data dir alone opens nothing. Keep it on a USB key if you prefer.
{key_line}

[dicom]
# Plain (unencrypted) DICOM, for legacy modalities that cannot do TLS.
port = 11112
plain_enabled = true
# DICOM over TLS (TLS 1.2/1.3, forward-secret AEAD suites only).
tls_port = 2762
# Source addresses allowed to connect at all. Anything else is refused before any DICOM
# exchange and raises an "exposure" security event: it means the server is reachable
# from outside the practice network (port forwarding or DMZ on the internet box).
trusted_networks = [
    {trusted},
]
# Allow DICOM TLS from outside the trusted networks (e.g. a teleradiology partner).
# Registered nodes and TLS still apply. Leave false unless you need it.
tls_from_anywhere = false
# Behind a TCP load balancer (HAProxy "send-proxy-v2", nginx stream "proxy_protocol on"):
# the balancers' addresses. Their connections must start with a PROXY protocol header,
# whose client address then counts everywhere (trusted networks, node hosts, budgets,
# sign-in throttling, audit); from any other address such a header is refused as garbage.
# Empty = no balancer. Example: proxy_protocol_from = ["10.0.0.5"]
proxy_protocol_from = []
# Largest PDU we accept (bytes); 0 = no limit (fastest with modern modalities).
maximum_pdu_size = 0
# Seconds of silence before an association is dropped.
network_timeout = 60.0
# Budget for connections that have not (yet) been accepted as a registered node, so one
# host cannot exhaust memory or slots. Refusals are recorded (aggregated per source).
# Associations at once (all nodes together).
max_associations = 32
# Connections at once from one address, associated or not (a registered node's address
# may use up to max_associations).
max_connections_per_source = 8
# Connections at once still before their association is accepted (registered nodes'
# addresses always get in, within their per-source budget).
max_pending_connections = 64
# Largest association request (bytes) read before the association is accepted.
association_pdu_limit = 262144
# Seconds allowed for the first byte, for the whole association request, and for any
# one PDU (plus one second per MiB received).
connect_timeout = 10.0
association_timeout = 30.0
pdu_timeout = 60.0
# Repeated refusals from one source are recorded as one summary per this many seconds.
refusal_report_seconds = 60.0
# When a sender offers several transfer syntaxes in one presentation context we accept, by
# default ("keep"): its compressed syntax as offered (never forcing a decompression), else
# Explicit VR Little Endian, else Implicit, and Big Endian only when nothing else is
# offered. Per calling AE title for a modality that misbehaves: "as-offered" (the sender's
# own first choice), "explicit" or "implicit" (uncompressed first), e.g.
# syntax_preference = {{ OLDCT = "explicit" }}
syntax_preference = {{}}

[storage]
# Refuse new images (status A700 "out of resources") when free disk falls below this.
min_free_mb = 512
# A different object received under an existing SOP Instance UID: keep the first one,
# answer with warning status B006 (elements discarded) and record a security event.
duplicate_policy = "keep-first"
# A deflated dataset (Deflated Explicit VR Little Endian) that would expand beyond this
# many MiB in memory is refused (status A700), and never inflated beyond it when read.
max_inflated_mb = 512
# Objects in an S3-compatible bucket (AWS, OVH, Scaleway, Ceph, MinIO, SeaweedFS) instead
# of this directory: the same encrypted objects under random names, e.g.
# url = "s3://my-bucket/pacsvault", endpoint = "https://s3.example.net" (empty: AWS in
# `region`). Empty url: local files here (the default).
url = ""
endpoint = ""
region = ""
# A 0600 file with two lines, access_key_id = ... and secret_access_key = ...; empty: the
# standard AWS provider chain (environment, ~/.aws, instance profile). Never on argv.
credentials_file = ""
# The endpoint's private CA (PEM); empty: the system's. TLS is always verified.
ca_file = ""
# true for MinIO/SeaweedFS/Ceph reached by host name (https://host/bucket/key).
path_style = false
# A PUT's ETag must be the MD5 of what was sent; false for SSE-KMS/SSE-C buckets.
check_etag = true
# An object uploaded but never indexed (a crash between the two) is deleted once older
# than this; more such objects at once than orphan_limit means an index that does not go
# with the bucket: then none is deleted. The bucket is listed every orphan_sweep_seconds;
# every indexed object is read back and authenticated once per scrub_every_hours, at
# most scrub_per_second objects per second.
orphan_grace_seconds = 3600.0
orphan_limit = 1000
orphan_sweep_seconds = 3600.0
scrub_every_hours = 24.0
scrub_per_second = 20.0

[query]
# Seconds a C-FIND or QIDO-RS query may spend before it is stopped and recorded
# (C-FIND status A700 "out of resources", QIDO-RS 413 "query too broad").
time_budget_seconds = 10.0

[web]
# HTTPS access for the doctor's browser and for DICOMweb viewers (no plain HTTP, ever).
enabled = true
https_port = 8443
# "lan": only the trusted networks above may connect (recommended). "internet": the
# sign-in page is reachable from anywhere (password + second factor still required);
# administration still refuses outside sources. Guarded like bind (see [server]).
remote_access = "lan"
# Sessions end after this much inactivity, and in any case after the absolute limit.
session_idle_minutes = 30
session_absolute_hours = 12
# Your own certificate and key (PEM), e.g. from your IT provider. Empty: the vault's CA.
cert_file = ""
key_file = ""
# Where the OHIF viewer is installed (`pacsvault viewer install`). Empty: the user's cache.
viewer_dir = ""
# The practice's name, shown in the viewer's header and tab.
practice_name = "pacsvault"
# The practice's time zone: dates and times on the pages are shown in it (24-hour clock).
time_zone = "Europe/Paris"
# Viewer modes offered beside the basic viewer (which includes MPR for CT and MR), among
# "segmentation", "tmtv" (PET tumour volume), "preclinical-4d", "us-pleura".
viewer_modes = []
# Slow clients are cut: seconds allowed for a request's headers (and the TLS handshake),
# and for its body (plus one second per MiB received).
header_timeout = 10.0
body_timeout = 60.0
# Connections at once, in all and from one address.
max_connections = 512
max_connections_per_source = 32

[backup]
# Encrypted backups with restic (README: "Backups and restoring onto a new machine").
# Each target is a restic repository: a USB disk and an off-site one. Add the targets
# (uncomment below), then run 'pacsvault backup init' once. The repository password is
# derived from the vault's keys; only the off-site credentials go in a 0600 file.
# Daily run time (this server's local time) of the backup made by 'pacsvault serve'.
schedule = "01:30"
# Alert when a target's last good backup is older than this many hours.
max_age_hours = 36
# Data snapshots kept by the retention (pruning); the latest keystore is always kept.
keep_daily = 7
keep_weekly = 4
keep_monthly = 12
keep_yearly = 20
# The server restores the latest snapshot into a temporary directory and verifies it
# (a restore drill) this often.
drill_every_days = 30
restic_binary = "restic"
# With a PostgreSQL index the backup streams a pg_dump into the repository: the directory
# of pg_dump / pg_restore (empty: the PATH; their major version must be >= the server's).
pg_bin_dir = ""
# [[backup.targets]]
# name = "usb"
# repository = "/media/usb/pacsvault-backup"
# [[backup.targets]]
# name = "offsite"
# repository = "s3:https://s3.example.net/my-bucket/pacsvault"
# credentials_file = "/etc/pacsvault/offsite-backup.env"  # 0600: AWS_ACCESS_KEY_ID=...

[audit]
# Audit records older than this are sealed out of the trail (the chain still verifies).
# 365 days is what the CNIL recommends for access logs; another value needs a reason,
# which is recorded in the trail with each purge.
retention_days = 365
retention_justification = ""
# Seconds between two checks of the trail by the running server (it also checks at every
# write); a change to the trail raises the audit-broken alert.
check_seconds = 30
# Several instances sharing a PostgreSQL index: seconds between two signed checkpoints
# naming the other instances' last records (also written at start and stop).
checkpoint_seconds = 300

[retention]
# How long patient images are kept: years after the patient's last exam (French rule:
# 20), and for a patient whose birth date is known at least until this birthday (28: a
# minor's images). Per modality, e.g. per_modality = {{ MG = 30 }}; the longest applies.
# When it ends, the daily check lists the patient for erasure (Administration > Erasure);
# nothing is erased without an administrator's confirmation.
years = 20
minor_until_age = 28
per_modality = {{}}
# true for a practice with a single administrator: an erasure is then confirmed by typing
# the patient ID again (recorded), since no second administrator exists to confirm it.
solo_practice = false

""" + index_section + "\n" + SYSLOG_SECTION + "\n" + render_section() + "\n" + TOKENS_SECTION \
        + "\n" + CHECK_SECTION + "\n" + FORWARD_SECTION
