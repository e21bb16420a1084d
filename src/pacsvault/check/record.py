"""Run the check and keep its result: the audit record, the kept last run, the nightly job.

Why one place for the command, the page's "run now" and ``serve``'s nightly run: all three
must record the same one event (``check.run``: counts and finding ids, never patient
data), compare with the same previous run (a critical finding whose id was not in it is
*new*: the event says so and the ``security-check`` alert rule raises it), and leave the
same file behind (``check-state.json`` in the data directory, 0600, replaced atomically)
that Health and the Security check page read without re-running anything.

Only a run of every section replaces the kept run: a ``--section`` run is recorded in the
trail but would otherwise make every other section's findings look "new" the next night.

Test hook: ``PACSVAULT_CHECK_OPTIONS`` (a JSON object) becomes ``CheckContext.options``
for runs started by the command and by ``serve`` (fake ``/sys`` trees, ``/proc`` texts).
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pacsvault.check.model import (
    CheckContext,
    CheckResult,
    Severity,
    finding_from_json,
    finding_to_json,
)
from pacsvault.check.runner import SECTION_NAMES, run

if TYPE_CHECKING:
    from pacsvault.vault import Vault

log = logging.getLogger("pacsvault.check")

STATE_NAME = "check-state.json"
STATE_FORMAT = "pacsvault-check/1"
OPTIONS_ENV = "PACSVAULT_CHECK_OPTIONS"
ACTION = "check.run"
_IDS_LIMIT = 1500  # characters of ids in the event (a trail line stays small)
_first_tick: dict[str, dt.datetime] = {}  # data dir -> first tick of this process


@dataclass(frozen=True)
class KeptRun:
    """The last complete run, as kept: its result and what started it."""

    result: CheckResult
    trigger: str
    new_critical: tuple[str, ...]


def options_from_env() -> dict[str, Any]:
    text = os.environ.get(OPTIONS_ENV, "")
    if not text:
        return {}
    value = json.loads(text)
    if not isinstance(value, dict):
        raise ValueError(f"{OPTIONS_ENV} must be a JSON object")
    return value


def state_path(vault: Vault) -> Path:
    return vault.layout.root / STATE_NAME


def load_kept(data_dir: Path) -> KeptRun | None:
    """The last complete run, or None (never run, or a damaged file: said as "never")."""
    try:
        raw = json.loads((data_dir / STATE_NAME).read_text("utf-8"))
        if raw.get("format") != STATE_FORMAT:
            return None
        result = CheckResult(
            started=dt.datetime.fromisoformat(raw["started"]),
            finished=dt.datetime.fromisoformat(raw["finished"]),
            sections=tuple(raw["sections"]),
            findings=tuple(finding_from_json(f) for f in raw["findings"]),
            errors=tuple((str(e["section"]), str(e["error"])) for e in raw["errors"]),
        )
        return KeptRun(result, str(raw.get("trigger", "")),
                       tuple(str(i) for i in raw.get("new_critical", [])))
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _save(data_dir: Path, result: CheckResult, trigger: str,
          new_critical: list[str]) -> None:
    body = {
        "format": STATE_FORMAT, "trigger": trigger,
        "started": result.started.isoformat(), "finished": result.finished.isoformat(),
        "sections": list(result.sections), "exit_code": result.exit_code,
        "findings": [finding_to_json(f) for f in result.findings],
        "errors": [{"section": s, "error": e} for s, e in result.errors],
        "new_critical": new_critical,
    }
    fd, tmp = tempfile.mkstemp(prefix=".check-state.", dir=data_dir)  # 0600 from birth
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            json.dump(body, fh, ensure_ascii=False, indent=1)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, data_dir / STATE_NAME)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def counts(result: CheckResult) -> dict[str, int]:
    out = {s.value: 0 for s in Severity}
    for f in result.findings:
        out[f.severity.value] += 1
    return out


def run_and_record(vault: Vault, *, trigger: str, sections: tuple[str, ...] | None = None,
                   options: dict[str, Any] | None = None, probe: bool = True,
                   user: str = "", address: str = "",
                   now: dt.datetime | None = None) -> tuple[CheckResult, list[str]]:
    """Run, record one ``check.run`` event, keep a complete run; returns the result and
    the ids of the critical findings that the previous complete run did not have."""
    from pacsvault.audit.events import AuditEvent, EventCode, Outcome

    ctx = CheckContext(vault=vault, now=now or dt.datetime.now(dt.UTC), probe=probe,
                       options=dict(options_from_env() if options is None else options))
    result = run(ctx, sections)
    complete = set(result.sections) == set(SECTION_NAMES)
    previous = load_kept(vault.layout.root)
    before = previous.result.ids() if previous is not None else set()
    new_critical = sorted(result.ids(at_least=Severity.CRITICAL) - before)
    n = counts(result)
    ids = ",".join(sorted(result.ids()))
    outcome = {0: Outcome.SUCCESS, 1: Outcome.MINOR_FAILURE}.get(result.exit_code,
                                                                 Outcome.SERIOUS_FAILURE)
    detail: dict[str, str | int | bool] = {
        "trigger": trigger, "exit_code": result.exit_code, "critical": n["critical"],
        "warning": n["warning"], "info": n["info"], "errors": len(result.errors),
        "sections": ",".join(result.sections), "complete": complete,
        "ids": ids[:_IDS_LIMIT], "new_critical": ",".join(new_critical)[:_IDS_LIMIT],
    }
    vault.recorder.emit(AuditEvent(
        action=ACTION, outcome=outcome,
        code=EventCode.SECURITY_ALERT if new_critical else EventCode.APPLICATION_ACTIVITY,
        actor_user=user, actor_address=address,
        message=(f"security check: {n['critical']} critical, {n['warning']} warning(s), "
                 f"{n['info']} note(s)"
                 + (f"; new critical: {', '.join(new_critical)}" if new_critical else "")),
        detail=detail,
    ))
    if complete:
        _save(vault.layout.root, result, trigger, new_critical)
    return result, new_critical


def tick(vault: Vault, now: dt.datetime | None = None) -> None:
    """The ``check`` job of ``serve``: once a day at ``[check] at`` (local time), the
    whole check with its active probes. A time missed while the server was down runs at
    the next tick; a vault never checked waits for its first time of day (a server
    starting, in tests above all, does not run the whole check at once)."""
    from pacsvault.backup.schedule import last_slot

    settings = vault.settings.check
    if not settings.enabled:
        return
    now = now or dt.datetime.now(dt.UTC)
    slot = last_slot(settings.at, now)
    kept = load_kept(vault.layout.root)
    since = kept.result.started if kept is not None \
        else _first_tick.setdefault(str(vault.layout.root), now)
    if since >= slot:
        return
    result, new = run_and_record(vault, trigger="nightly", now=now)
    log.info("security check: exit %d, %d finding(s), %d new critical",
             result.exit_code, len(result.findings), len(new))
