"""Run the sections in a fixed order; a section that fails is reported, never fatal.

Why never fatal: a check that crashes on a missing tool (no ``/sys`` in a container, a
gateway that answers garbage) must still report everything else, and say which part it
could not look at (that alone is a warning: an unverified point is not a passed one).
"""

from __future__ import annotations

import datetime as dt
import time

from pacsvault.check import accounts, alerting, audit, backups, keys, network, software, tls
from pacsvault.check.model import CheckContext, CheckResult, Finding, Section

SECTIONS: tuple[tuple[str, Section], ...] = (
    ("network", network.check),
    ("tls", tls.check),
    ("accounts", accounts.check),
    ("keys", keys.check),
    ("backups", backups.check),
    ("audit", audit.check),
    ("software", software.check),
    ("alerts", alerting.check),  # would a person be told (issue 19)
)
SECTION_NAMES: tuple[str, ...] = tuple(name for name, _ in SECTIONS)


def run(ctx: CheckContext, sections: tuple[str, ...] | None = None) -> CheckResult:
    wanted = sections or SECTION_NAMES
    unknown = set(wanted) - set(SECTION_NAMES)
    if unknown:
        raise ValueError(f"unknown check section(s): {', '.join(sorted(unknown))}")
    started = ctx.now  # a fake clock in tests ages everything, the run's time included
    clock = time.monotonic()
    findings: list[Finding] = []
    errors: list[tuple[str, str]] = []
    for name, section in SECTIONS:
        if name not in wanted:
            continue
        try:
            findings.extend(section(ctx))
        except Exception as exc:  # one broken section must not hide the others
            first = str(exc).splitlines()[0] if str(exc) else ""
            errors.append((name, f"{type(exc).__name__}: {first}"))
    order = {name: i for i, name in enumerate(SECTION_NAMES)}
    findings.sort(key=lambda f: (-f.severity.rank, order.get(f.section, 99), f.id))
    ran = tuple(n for n in SECTION_NAMES if n in wanted)
    finished = started + dt.timedelta(seconds=time.monotonic() - clock)
    return CheckResult(started, finished, ran, tuple(findings), tuple(errors))
