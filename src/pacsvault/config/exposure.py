"""The exposure switches (issue 19): which settings open the archive beyond the practice
network, the values last applied, and the record of the last successful alert test.

Why a state file: the settings file can be edited by anyone with a shell on the server (or
by a restored backup, or a configuration tool), and the sanctioned practices' servers were
opened exactly like that, silently. ``serve`` compares what the file says now with what it
last applied (``DATA/exposure.json``, 0600, written atomically) at every start and while it
runs; the guard itself (``cli/exposure.py``) decides whether a change may take effect.

Why the alert-test record lives here too: the guard refuses to widen the exposure unless a
person would be told, i.e. unless an alert channel *as configured now* delivered a test.
The record keeps a fingerprint of the channel's settings (addresses, host, URL), so a test
of yesterday's address does not vouch for today's.

Nothing here holds a secret or patient data: addresses, networks and times only.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import ipaddress
import json
import urllib.parse
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pacsvault.config.tomledit import TomlValue, set_in_section
from pacsvault.fsutil import write_atomic

if TYPE_CHECKING:
    from pacsvault.config import Settings
    from pacsvault.config.alerts import AlertSettings

STATE_NAME = "exposure.json"
ALERT_TEST_NAME = "alerts-tested.json"
WILDCARDS = ("0.0.0.0", "::", "")  # noqa: S104 (names, not a bind)
FIELDS = ("remote_access", "tls_from_anywhere", "bind", "trusted_networks")


@dataclass(frozen=True)
class Exposure:
    """The four settings that decide who can reach the archive."""

    remote_access: str = "lan"
    tls_from_anywhere: bool = False
    bind: str = "0.0.0.0"  # noqa: S104 (the legacy default; the trusted networks filter)
    trusted_networks: tuple[str, ...] = ()

    @classmethod
    def of(cls, settings: Settings, bind: str | None = None) -> Exposure:
        """The values ``settings`` asks for (``bind``: a ``--bind`` given to ``serve``)."""
        return cls(settings.web.remote_access, settings.dicom.tls_from_anywhere,
                   bind or settings.server.bind,
                   tuple(str(n) for n in settings.dicom.trusted_networks))

    @classmethod
    def from_json(cls, value: Any) -> Exposure | None:
        if not isinstance(value, dict):
            return None
        try:
            return cls(str(value["remote_access"]), bool(value["tls_from_anywhere"]),
                       str(value["bind"]), tuple(str(n) for n in value["trusted_networks"]))
        except (KeyError, TypeError):
            return None

    def as_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["trusted_networks"] = list(self.trusted_networks)
        return out

    def public_networks(self) -> list[str]:
        """Trusted networks that are not private, loopback or link-local: the internet."""
        return [n for n in self.trusted_networks if not _private_network(n)]

    def public_bind(self) -> bool:
        """Bound to a public address of this machine (a wildcard is the legacy default,
        filtered by the trusted networks; a public address is meant for the internet)."""
        if self.bind in WILDCARDS:
            return False
        try:
            ipaddress.ip_address(self.bind.split("%")[0])
        except ValueError:
            return False  # a host name: the port check refuses it anyway
        return not _private_network(self.bind.split("%")[0])

    def active(self) -> list[str]:
        """What is open beyond the practice network now (empty: nothing)."""
        out: list[str] = []
        if self.remote_access == "internet":
            out.append("remote_access = internet")
        if self.tls_from_anywhere:
            out.append("tls_from_anywhere = true")
        if self.public_bind():
            out.append(f"bind = {self.bind}")
        out.extend(f"trusted network {n}" for n in self.public_networks())
        return out


def widened(old: Exposure, new: Exposure) -> list[str]:
    """The changes from ``old`` to ``new`` that open the archive further (the guarded ones);
    a change that narrows it is recorded and alerted but never refused."""
    out: list[str] = []
    if new.remote_access == "internet" and old.remote_access != "internet":
        out.append("remote_access = internet")
    if new.tls_from_anywhere and not old.tls_from_anywhere:
        out.append("tls_from_anywhere = true")
    # A wildcard stays the legacy default (the trusted networks still filter every source):
    # recorded and alerted when it changes, guarded only towards a public address.
    if new.bind != old.bind and new.public_bind():
        out.append(f"bind = {new.bind}")
    added = [n for n in new.trusted_networks if n not in old.trusted_networks]
    out.extend(f"trusted network {n}" for n in added if not _covered(n, old.trusted_networks))
    return out


def changed(old: Exposure, new: Exposure) -> dict[str, str]:
    """Field -> "old -> new" for every field that differs (for the trail and the alert)."""
    out: dict[str, str] = {}
    for name in FIELDS:
        before, after = getattr(old, name), getattr(new, name)
        if before != after:
            out[name] = f"{_text(before)} -> {_text(after)}"
    return out


def safe_start(current: Exposure) -> Exposure:
    """The values a vault with no record is assumed to have had: the current ones without
    any internet exposure (so an exposure present at the first guarded start is guarded
    like a switch)."""
    return Exposure("lan", False, current.bind if not current.public_bind() else "0.0.0.0",  # noqa: S104
                    tuple(n for n in current.trusted_networks if _private_network(n)))


def apply(settings: Settings, values: Exposure) -> Settings:
    """``settings`` with ``values`` in place of its exposure switches (a refused change:
    the server runs with the values it last applied)."""
    from pacsvault.config import DicomSettings, ServerSettings, WebSettings

    nets = [ipaddress.ip_network(n) for n in values.trusted_networks]
    web = WebSettings.model_validate({**settings.web.model_dump(),
                                      "remote_access": values.remote_access})
    dicom = DicomSettings.model_validate({**settings.dicom.model_dump(),
                                          "tls_from_anywhere": values.tls_from_anywhere,
                                          "trusted_networks": nets})
    server = ServerSettings.model_validate({**settings.server.model_dump(),
                                            "bind": values.bind})
    return settings.model_copy(update={"web": web, "dicom": dicom, "server": server})


# --- the state file ----------------------------------------------------------------------


@dataclass(frozen=True)
class ExposureState:
    """``applied``: what the server last ran with; ``refused``: file values the guard refused
    (the server keeps ``applied`` until they are fixed or the conditions are met), with
    ``reasons``; ``pending``: file values seen while running, not applied before a restart."""

    applied: Exposure | None = None
    applied_at: str = ""
    refused: Exposure | None = None
    reasons: tuple[str, ...] = ()
    refused_at: str = ""
    pending: Exposure | None = None
    pending_at: str = ""
    events: tuple[dict[str, Any], ...] = ()  # decided before the alert sink runs: to emit

    def as_json(self) -> dict[str, Any]:
        return {
            "applied": self.applied.as_json() if self.applied else None,
            "applied_at": self.applied_at,
            "refused": self.refused.as_json() if self.refused else None,
            "reasons": list(self.reasons), "refused_at": self.refused_at,
            "pending": self.pending.as_json() if self.pending else None,
            "pending_at": self.pending_at, "events": list(self.events),
        }


def read_state(data_dir: Path) -> ExposureState:
    try:
        raw = json.loads((data_dir / STATE_NAME).read_text("utf-8"))
    except (OSError, ValueError):
        return ExposureState()
    if not isinstance(raw, dict):
        return ExposureState()
    return ExposureState(
        applied=Exposure.from_json(raw.get("applied")), applied_at=str(raw.get("applied_at", "")),
        refused=Exposure.from_json(raw.get("refused")),
        reasons=tuple(str(r) for r in raw.get("reasons") or ()),
        refused_at=str(raw.get("refused_at", "")),
        pending=Exposure.from_json(raw.get("pending")), pending_at=str(raw.get("pending_at", "")),
        events=tuple(e for e in raw.get("events") or () if isinstance(e, dict)),
    )


def write_state(data_dir: Path, state: ExposureState) -> None:
    write_atomic(data_dir / STATE_NAME, json.dumps(state.as_json(), indent=1).encode(), 0o600)


# --- the last successful alert test ------------------------------------------------------


def channels(alerts: AlertSettings) -> list[str]:
    """The channels that would carry an alert now ("mail", "webhook")."""
    out = []
    if alerts.enabled and alerts.mail_enabled:
        out.append("mail")
    if alerts.enabled and alerts.webhook_url:
        out.append("webhook")
    return out


def fingerprint(alerts: AlertSettings, channel: str) -> str:
    """What a test of ``channel`` vouches for: its destination as configured."""
    if channel == "mail":
        text = "|".join([alerts.smtp_host, str(alerts.smtp_port), alerts.smtp_security,
                         *sorted(alerts.mail_to)])
    else:
        text = alerts.webhook_url
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def record_test(data_dir: Path, alerts: AlertSettings, delivered: list[str],
                when: dt.datetime) -> None:
    """Remember the channels that delivered a test just now (others keep their record)."""
    record = _read_tests(data_dir)
    for channel in delivered:
        record[channel] = {"time": when.astimezone(dt.UTC).isoformat(),
                           "fingerprint": fingerprint(alerts, channel)}
    write_atomic(data_dir / ALERT_TEST_NAME, json.dumps(record).encode(), 0o600)


def last_tests(data_dir: Path, alerts: AlertSettings) -> dict[str, dt.datetime]:
    """Channel -> time of its last successful test, for the channels configured now and
    tested with the same destination."""
    out: dict[str, dt.datetime] = {}
    record = _read_tests(data_dir)
    for channel in channels(alerts):
        entry = record.get(channel)
        if isinstance(entry, dict) and entry.get("fingerprint") == fingerprint(alerts, channel):
            try:
                out[channel] = dt.datetime.fromisoformat(str(entry["time"]))
            except (KeyError, ValueError):
                continue
    return out


def _read_tests(data_dir: Path) -> dict[str, Any]:
    try:
        raw = json.loads((data_dir / ALERT_TEST_NAME).read_text("utf-8"))
    except (OSError, ValueError):
        return {}
    return raw if isinstance(raw, dict) else {}


# --- init: the chosen channel into the settings file -------------------------------------


def with_alerts(text: str, values: Mapping[str, TomlValue]) -> str:
    """The settings file ``text`` with ``values`` in its ``[alerts]`` section (comments
    kept), as ``init --alert-email/--alert-webhook`` chose them."""
    return set_in_section(text, "alerts", values)


def webhook_loopback_http(url: str) -> bool:
    parts = urllib.parse.urlsplit(url)
    from pacsvault.config.alerts import is_loopback_host

    return parts.scheme == "http" and is_loopback_host(parts.hostname or "")


# The practice network: the default trusted networks (loopback, RFC 1918, unique local,
# link-local) and carrier-grade NAT. Named, not ``is_private``: Python counts documentation
# and reserved ranges as private, which are not the practice's.
INSIDE = tuple(ipaddress.ip_network(n) for n in (
    "127.0.0.0/8", "::1/128", "10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "fc00::/7",
    "169.254.0.0/16", "fe80::/10", "100.64.0.0/10"))


def _private_network(text: str) -> bool:
    try:
        net = ipaddress.ip_network(text, strict=False)
    except ValueError:
        return False
    return any(net.version == inside.version and net.subnet_of(inside)  # type: ignore[arg-type]
               for inside in INSIDE)


def _covered(text: str, networks: tuple[str, ...]) -> bool:
    try:
        net = ipaddress.ip_network(text, strict=False)
    except ValueError:
        return False
    for other in networks:
        try:
            outer = ipaddress.ip_network(other, strict=False)
        except ValueError:
            continue
        if net.version == outer.version and net.subnet_of(outer):  # type: ignore[arg-type]
            return True
    return _private_network(text)


def _text(value: object) -> str:
    if isinstance(value, tuple):
        return "[" + ", ".join(value) + "]"
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)
