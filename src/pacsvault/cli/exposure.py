"""The exposure guard of ``serve`` (issue 19): a switch that opens the archive beyond the
practice network is never silent, and never taken without a person who would be told.

At every start (``guard``) the exposure switches the settings file asks for
(``config.exposure``: ``remote_access``, ``tls_from_anywhere``, ``bind``,
``trusted_networks``) are compared with the values last applied. A change is recorded
(``exposure.switch``: what changed, the file's owner and time, the user running the
server) and alerted (rule ``exposure-switch``). A change that *widens* the exposure takes
effect only when

* an alert channel as configured now delivered a test (``pacsvault alerts test``), and
* the security check's network section reports nothing critical.

Otherwise it is refused (``exposure.refused``, alerted, a red banner on Health) and the
server **starts with the values it last applied**. Why not refuse to start: a typo in the
settings file (or an over-eager IT provider) must not cut the practice off its own images
for a day; but the refused exposure is never silent either: the trail, the alert channels
that exist, the log and the Health banner all say which switch was refused and why, until
the file is fixed or the conditions are met and the server restarted.

While the server runs, the settings file is watched (every ``WATCH_SECONDS`` and at
``SIGHUP``): an edit behind the server's back is recorded and alerted at once
(``exposure.pending``), with what the guard will do with it at the next start.

Events decided before the alert sink runs (the guard runs before the listeners) wait in
the state file and are emitted by the primary process once its sink is attached
(``announce``), so ``serve --workers N`` and a single process behave the same.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import ipaddress
import logging
import os
import pwd
import signal
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pacsvault.audit import AuditEvent, EventCode, Outcome
from pacsvault.audit.events import NETWORK_CONFIGURATION
from pacsvault.config import CONFIG_NAME, ConfigError, load
from pacsvault.config.exposure import (
    Exposure,
    ExposureState,
    apply,
    changed,
    last_tests,
    read_state,
    safe_start,
    widened,
    write_state,
)

if TYPE_CHECKING:
    from pacsvault.config import Settings
    from pacsvault.vault import Vault

log = logging.getLogger("pacsvault.exposure")

WATCH_SECONDS = 5.0


def conditions(vault: Vault, now: dt.datetime) -> list[str]:
    """Why a widening switch may not take effect now (empty: it may)."""
    reasons: list[str] = []
    if not last_tests(vault.layout.root, vault.settings.alerts):
        reasons.append("no alert channel has delivered a test as configured now: set "
                       "mail_to/smtp_host or webhook_url in [alerts], then run "
                       "'pacsvault alerts test'")
    from pacsvault.check import CheckContext, Severity, run

    # No active probes here: the start must not wait on the gateway; the nightly check
    # (and 'pacsvault check') probes. A section that cannot run is not a pass.
    result = run(CheckContext(vault, now, probe=False), sections=("network",))
    critical = sorted(f.id for f in result.findings if f.severity is Severity.CRITICAL)
    if critical:
        reasons.append("the security check's network section reports "
                       + ", ".join(critical) + " (run 'pacsvault check')")
    if result.errors:
        reasons.append("the security check's network section could not run: "
                       + "; ".join(e for _s, e in result.errors))
    return reasons


def guard(vault: Vault, bind_override: str | None,
          now: dt.datetime | None = None) -> tuple[Settings, str]:
    """Decide the exposure this start runs with: (settings, bind). Writes the state file
    with the events to announce; never raises for a refused switch (see module doc)."""
    now = now or dt.datetime.now(dt.UTC)
    root = vault.layout.root
    state = read_state(root)
    current = Exposure.of(vault.settings, bind_override)
    applied = state.applied or safe_start(current)
    events = list(state.events)
    diff = changed(applied, current)
    wider = widened(applied, current)
    reasons = conditions(vault, now) if wider else []
    who = _who(root)
    stamp = now.isoformat()
    if reasons:
        events.append(_event("exposure.refused", Outcome.MAJOR_FAILURE, diff, wider, who,
                             reasons=reasons, kept="; ".join(applied.active()) or "lan only"))
        log.error("EXPOSURE CHANGE REFUSED: %s asks for %s, but %s. The server runs with "
                  "the values it last applied (%s); fix %s or meet the conditions, then "
                  "restart.", CONFIG_NAME, ", ".join(wider), "; and ".join(reasons),
                  "; ".join(applied.active()) or "practice network only", CONFIG_NAME)
        write_state(root, dataclasses.replace(
            state, applied=applied, applied_at=state.applied_at or stamp, refused=current,
            reasons=tuple(reasons), refused_at=stamp, pending=None, pending_at="",
            events=tuple(events)))
        return apply(vault.settings, applied), applied.bind
    if diff:
        events.append(_event("exposure.switch", Outcome.SUCCESS, diff, wider, who))
        if wider:
            log.warning("EXPOSURE CHANGED: %s (alert channel tested, network check "
                        "passed); recorded and alerted", ", ".join(wider))
    write_state(root, ExposureState(applied=current,
                                    applied_at=stamp if diff or not state.applied
                                    else state.applied_at,
                                    events=tuple(events)))
    return vault.settings, current.bind


def sealed_start(root: Path, settings: Settings, bind_override: str | None
                 ) -> tuple[Settings, str, AuditEvent | None]:
    """A sealed start (no master key: no vault, no network check): a widening is never
    taken; the server runs with the values last applied, and the event to record says so
    (the unseal and a restart bring the normal guard)."""
    state = read_state(root)
    current = Exposure.of(settings, bind_override)
    applied = state.applied or safe_start(current)
    wider = widened(applied, current)
    if not wider:
        return settings, current.bind, None
    reasons = ["the archive is sealed: the guard runs after the unseal and a restart"]
    log.error("EXPOSURE CHANGE REFUSED while sealed: %s asks for %s; the server runs with "
              "the values it last applied until it is unsealed and restarted", CONFIG_NAME,
              ", ".join(wider))
    raw = _event("exposure.refused", Outcome.MAJOR_FAILURE, changed(applied, current), wider,
                 _who(root), reasons=reasons,
                 kept="; ".join(applied.active()) or "lan only")
    event = AuditEvent(action="exposure.refused", outcome=Outcome.MAJOR_FAILURE,
                       code=EventCode.SECURITY_ALERT, message=str(raw["message"]),
                       detail=dict(raw["detail"]))
    return apply(settings, applied), applied.bind, event


def apply_decision(vault: Vault, bind_override: str | None) -> str:
    """A ``serve --workers`` worker: the parent's decision applied to the settings it read
    again (a refused switch stays refused in every worker). Returns the bind."""
    state = read_state(vault.layout.root)
    current = Exposure.of(vault.settings, bind_override)
    if state.refused is not None and state.refused == current and state.applied is not None:
        vault.settings = apply(vault.settings, state.applied)
        return state.applied.bind
    return current.bind


def announce(vault: Vault) -> None:
    """Emit the events the guard (or a reload) decided, now that the alert sink listens."""
    root = vault.layout.root
    state = read_state(root)
    if not state.events:
        return
    write_state(root, dataclasses.replace(state, events=()))
    for raw in state.events:
        detail = {str(k): v for k, v in dict(raw.get("detail") or {}).items()
                  if isinstance(v, str | int | bool)}
        vault.recorder.emit(AuditEvent(
            action=str(raw.get("action")), outcome=Outcome(str(raw.get("outcome", "0"))),
            code=EventCode.SECURITY_ALERT, message=str(raw.get("message", "")),
            actor_user=str(raw.get("user", "")), detail=detail))


def detect(vault: Vault, bind_override: str | None, now: dt.datetime | None = None) -> bool:
    """The settings file compared with what runs (a reload, or the periodic look): a new
    difference is recorded and alerted as ``exposure.pending``. True when one was."""
    now = now or dt.datetime.now(dt.UTC)
    root = vault.layout.root
    state = read_state(root)
    try:
        on_disk = load(root)
    except ConfigError as exc:
        log.error("settings file unreadable, nothing changes until it is fixed: %s", exc)
        return False
    current = Exposure.of(on_disk, bind_override)
    applied = state.applied or Exposure.of(vault.settings, bind_override)
    if current == applied or current == state.pending or current == state.refused:
        if current == applied and state.pending is not None:
            write_state(root, dataclasses.replace(state, pending=None, pending_at=""))
        return False
    diff = changed(applied, current)
    wider = widened(applied, current)
    reasons = conditions(vault, now) if wider else []
    verdict = ("will be refused at the next start: " + "; and ".join(reasons) if reasons
               else "takes effect at the next start")
    event = _event("exposure.pending", Outcome.MINOR_FAILURE if wider else Outcome.SUCCESS,
                   diff, wider, _who(root), reasons=reasons, verdict=verdict)
    write_state(root, dataclasses.replace(state, pending=current,
                                          pending_at=now.isoformat()))
    log.warning("%s changed while the server runs: %s; %s", CONFIG_NAME,
                "; ".join(f"{k}: {v}" for k, v in diff.items()), verdict)
    _emit(vault, event)
    return True


class Watch:
    """Looks at the settings file every ``period`` seconds and at SIGHUP (``detect``)."""

    def __init__(self, vault: Vault, bind_override: str | None,
                 period: float = WATCH_SECONDS) -> None:
        self._vault = vault
        self._bind = bind_override
        self._period = period
        self._stop = threading.Event()
        self._now = threading.Event()
        self._seen: tuple[int, int] | None = None
        self._thread = threading.Thread(target=self._run, name="pacsvault-exposure",
                                        daemon=True)

    def start(self) -> None:
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGHUP, lambda _s, _f: self._now.set())
        self._seen = self._stamp()
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._now.set()
        self._thread.join(5)

    def _stamp(self) -> tuple[int, int] | None:
        try:
            st = (self._vault.layout.root / CONFIG_NAME).stat()
        except OSError:
            return None
        return st.st_mtime_ns, st.st_size

    def _run(self) -> None:
        while not self._stop.is_set():
            asked = self._now.wait(self._period)
            self._now.clear()
            if self._stop.is_set():
                return
            stamp = self._stamp()
            if not asked and stamp == self._seen:
                continue
            self._seen = stamp
            try:
                detect(self._vault, self._bind)
            except Exception as exc:  # the watch must never stop the server
                log.error("exposure check of the settings file failed: %s",
                          type(exc).__name__)


def addresses_notice(bind: str) -> str | None:
    """One line naming where a wildcard ``bind`` listens: this machine's private and
    loopback addresses, and in capitals any public one (reachable from the internet
    whatever the trusted networks say about who is answered). For ``private`` (the
    default), the addresses it listens on. None for a set address."""
    from pacsvault.service import bind as binding

    if bind == binding.PRIVATE:
        return binding.notice(binding.addresses(bind))
    if bind not in ("0.0.0.0", "::", ""):  # noqa: S104 (names, not a bind)
        return None
    from pacsvault.check.network import local_addresses

    private: list[str] = []
    public: list[str] = []
    for text in sorted(local_addresses()):
        try:
            ip = ipaddress.ip_address(text)
        except ValueError:
            continue
        if bind != "::" and ip.version == 6:
            continue
        (public if ip.is_global else private).append(text)
    line = (f"listening on every address of this machine ({bind}): "
            f"{', '.join(private) or 'none private'}")
    if public:
        line += (f"; and on PUBLIC address(es) {', '.join(public)}: set [server] bind to a "
                 "private address to listen only on the practice network")
    else:
        line += "; to listen on one of them only, set [server] bind in pacsvault.toml"
    return line


def _emit(vault: Vault, raw: dict[str, Any]) -> None:
    vault.recorder.emit(AuditEvent(
        action=str(raw["action"]), outcome=Outcome(str(raw["outcome"])),
        code=EventCode.SECURITY_ALERT, message=str(raw["message"]),
        actor_user=str(raw.get("user", "")), detail=dict(raw["detail"])))


def _event(action: str, outcome: Outcome, diff: dict[str, str], wider: list[str],
           who: dict[str, str], **extra: str | list[str]) -> dict[str, Any]:
    """One event as JSON (it may wait in the state file for the alert sink)."""
    detail: dict[str, str | int | bool] = {
        "type_code": NETWORK_CONFIGURATION,
        "changes": "; ".join(f"{k}: {v}" for k, v in diff.items()),
        "widened": ", ".join(wider), **who,
    }
    for key, value in extra.items():
        detail[key] = "; ".join(value) if isinstance(value, list) else value
    what = {"exposure.switch": "exposure settings changed",
            "exposure.refused": "exposure change refused: the previous values stay",
            "exposure.pending": "exposure settings edited while the server runs"}[action]
    return {"action": action, "outcome": outcome.value, "detail": detail,
            "message": f"{what}: {detail['changes'] or 'first record'}"}


def _who(root: Path) -> dict[str, str]:
    """Who/when as far as the server can know: the settings file's owner and time of its
    last change, and the user running the server (the editor's name is not on disk)."""
    out = {"server_user": _user(os.geteuid())}
    try:
        st = (root / CONFIG_NAME).stat()
    except OSError:
        return out
    out["file_owner"] = _user(st.st_uid)
    out["file_modified"] = dt.datetime.fromtimestamp(st.st_mtime, dt.UTC).isoformat(
        timespec="seconds")
    return out


def _user(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)
