"""Day-by-day figures for the Health page's charts (issue 20, item 7).

What the page draws: images received per day per device (calling AE) over ``DAYS`` days,
the bytes held at the end of each day with a forecast of when the disk fills, sign-ins
and failed sign-ins per day, and each device's last contact.

Why computed here, from the index and the trail, rather than kept as counters: nothing
new is written at every store or sign-in (no hot path changes, no new table), and the
figures cannot drift from what the archive holds. Why bounded:

* the reception time is sealed on a PostgreSQL index (``SealedTime``: never compared in
  SQL), so the instances are read newest first (primary key order, which is reception
  order give or take concurrent stores) and the scan stops after ``OLD_STREAK``
  consecutive rows older than the window: a page view never reads a year of instances;
* the trail is read backwards from its end, in blocks, until a record older than the
  window or ``TRAIL_BUDGET`` bytes (the records are shown, not trusted: ``audit verify``
  checks the chain).

No patient data: counts per day and device, times; nothing decrypted but the reception
time. The result is cached by the caller (``web/health_charts``) for a few minutes.
"""

from __future__ import annotations

import datetime as dt
import json
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy import select
from sqlalchemy.exc import SQLAlchemyError

from pacsvault.index.models import Instance

if TYPE_CHECKING:
    from sqlalchemy.orm import Session, sessionmaker

DAYS = 90
FIT_DAYS = 30  # the forecast's linear fit: the last 30 days of growth
OLD_STREAK = 5000  # consecutive rows older than the window: the scan stops
TRAIL_BUDGET = 64 * 1024 * 1024  # bytes of trail read at most, from its end
BLOCK = 1024 * 1024
SIGN_IN, SIGN_IN_FAILED = "auth.login", "auth.login.failed"
CONTACTS = frozenset({"dicom.association.accepted", "dicom.store.association"})


@dataclass(frozen=True)
class Series:
    """Everything the charts draw, per day (``days[i]`` is a UTC date, oldest first)."""

    days: tuple[dt.date, ...]
    received: dict[str, tuple[int, ...]]  # calling AE ("" = unknown) -> images per day
    held: tuple[int, ...]  # bytes the index holds at the end of each day
    sign_ins: tuple[int, ...]
    failed_sign_ins: tuple[int, ...]
    last_seen: dict[str, dt.datetime] = field(default_factory=dict)  # AE -> last contact
    partial_trail: bool = False  # the budget ran out before the window's start

    def growth_per_day(self) -> float | None:
        """Least-squares slope of ``held`` over the last ``FIT_DAYS`` days (bytes/day)."""
        ys = self.held[-FIT_DAYS:]
        n = len(ys)
        if n < 2:
            return None
        mean_x, mean_y = (n - 1) / 2, sum(ys) / n
        var = sum((x - mean_x) ** 2 for x in range(n))
        return sum((x - mean_x) * (y - mean_y) for x, y in enumerate(ys)) / var

    def full_on(self, free: int, reserve: int) -> dt.date | None:
        """The day the free space reaches the reserve at the fitted pace, None when the
        archive does not grow (or the date is beyond a century: no forecast)."""
        slope = self.growth_per_day()
        if slope is None or slope <= 0:
            return None
        days = max(0.0, (free - reserve) / slope)
        if days > 36500:
            return None
        return self.days[-1] + dt.timedelta(days=int(days))


def _utc(when: dt.datetime) -> dt.datetime:
    return when if when.tzinfo else when.replace(tzinfo=dt.UTC)


def received(sessions: sessionmaker[Session], since: dt.datetime
             ) -> tuple[list[tuple[dt.datetime, str, int]], dict[str, dt.datetime]]:
    """(time, calling AE, bytes) of the instances received since ``since``, and each
    calling AE's latest reception among them."""
    rows: list[tuple[dt.datetime, str, int]] = []
    last: dict[str, dt.datetime] = {}
    streak = 0
    stmt = (select(Instance.received, Instance.source_ae, Instance.size)
            .order_by(Instance.pk.desc()).execution_options(yield_per=2000))
    with sessions() as session:
        for when, ae, size in session.execute(stmt):
            when = _utc(when)
            if when < since:
                streak += 1
                if streak >= OLD_STREAK:
                    break
                continue
            streak = 0
            rows.append((when, ae or "", int(size or 0)))
            if ae and (ae not in last or when > last[ae]):
                last[ae] = when
    return rows, last


def trail_backwards(trail: Path, since: str, budget: int = TRAIL_BUDGET
                    ) -> tuple[list[dict[str, Any]], bool]:
    """The trail's records at or after ``since`` (ISO time), newest first, reading at most
    ``budget`` bytes from the end; True when the budget ran out first."""
    found: list[dict[str, Any]] = []
    try:
        fh = open(trail, "rb")  # noqa: SIM115 - closed below
    except OSError:
        return found, False
    with fh:
        end = fh.seek(0, 2)
        pos, carry, read = end, b"", 0
        while pos > 0:
            if read >= budget:
                return found, True
            step = min(BLOCK, pos)
            pos -= step
            fh.seek(pos)
            chunk = fh.read(step) + carry
            read += step
            lines = chunk.split(b"\n")
            carry = lines[0] if pos > 0 else b""
            for line in reversed(lines[1:] if pos > 0 else lines):
                try:
                    body = json.loads(line)
                except ValueError:
                    continue
                if not isinstance(body, dict):
                    continue
                if str(body.get("time", "")) < since:
                    return found, False
                found.append(body)
    return found, False


def gather_series(sessions: sessionmaker[Session], trail: Path, total_bytes: int,
                  now: dt.datetime, days: int = DAYS) -> Series:
    """The figures of the last ``days`` days up to ``now`` (today included)."""
    today = now.astimezone(dt.UTC).date()
    first = today - dt.timedelta(days=days - 1)
    since = dt.datetime.combine(first, dt.time(), dt.UTC)
    day_list = tuple(first + dt.timedelta(days=i) for i in range(days))
    index = {d: i for i, d in enumerate(day_list)}
    try:  # a PostgreSQL gone since the vault opened: the charts stay empty, the page
        rows, last_seen = received(sessions, since)  # says why (status.deployment)
    except SQLAlchemyError:
        rows, last_seen = [], {}
    per_device: dict[str, list[int]] = defaultdict(lambda: [0] * days)
    added = [0] * days
    for when, ae, size in rows:
        i = index.get(when.date())
        if i is None:
            continue
        per_device[ae][i] += 1
        added[i] += size
    # bytes at the end of day i: what is held now minus what came after that day
    held: list[int] = []
    after = sum(added)
    for i in range(days):
        after -= added[i]
        held.append(max(0, total_bytes - after))
    records, partial = trail_backwards(trail, since.isoformat())
    ok: Counter[int] = Counter()
    failed: Counter[int] = Counter()
    for body in records:
        action = str(body.get("action", ""))
        if action in (SIGN_IN, SIGN_IN_FAILED):
            try:
                i = index.get(dt.date.fromisoformat(str(body.get("time", ""))[:10]))
            except ValueError:
                continue
            if i is not None:
                (ok if action == SIGN_IN else failed)[i] += 1
        elif action in CONTACTS and body.get("ae"):
            ae = str(body["ae"])
            try:
                when = _utc(dt.datetime.fromisoformat(str(body.get("time", ""))))
            except ValueError:
                continue
            if ae not in last_seen or when > last_seen[ae]:
                last_seen[ae] = when
    return Series(days=day_list,
                  received={ae: tuple(v) for ae, v in sorted(per_device.items())},
                  held=tuple(held), sign_ins=tuple(ok[i] for i in range(days)),
                  failed_sign_ins=tuple(failed[i] for i in range(days)),
                  last_seen=last_seen, partial_trail=partial)
