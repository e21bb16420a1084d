"""The Health page's charts, drawn on the server as SVG (issue 20, item 7).

Why SVG from Python rather than a chart library: the page's Content-Security-Policy
allows no inline script or style and no other origin, a library would be one more
dependency to keep patched for three bar charts, and SVG markup is readable by a screen
reader (each bar has a ``<title>``) and by the tests. Colours come from classes in
``static/style.css`` (``chart-s0`` … ``chart-s5``), never from ``style`` attributes.

The figures (``status.series``) cost a scan of the last 90 days of instances and of the
trail: they are kept ``TTL`` seconds per vault and recomputed at once when the number of
images changed (a page view after a store shows it).
"""

from __future__ import annotations

import datetime as dt
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from markupsafe import Markup, escape

from pacsvault.status.series import Series, gather_series
from pacsvault.vault import Vault
from pacsvault.web.i18n import Gettext

TTL = 300.0  # seconds the figures are kept
COLOURS = 6  # chart-s0 … chart-s5, then they repeat
WIDTH, HEIGHT, LEFT, BOTTOM, TOP = 640, 180, 48, 20, 10

_lock = threading.Lock()
_cache: dict[Path, tuple[float, int, dt.date, Series]] = {}


def series_of(vault: Vault, instances: int, total_bytes: int,
              now: dt.datetime) -> Series:
    """The figures of ``vault``, from the cache when fresh (same image count, same day,
    younger than ``TTL``)."""
    root = vault.layout.root
    today = now.astimezone(dt.UTC).date()
    with _lock:
        kept = _cache.get(root)
        if kept and kept[1] == instances and kept[2] == today and \
                time.monotonic() - kept[0] < TTL:
            return kept[3]
    found = gather_series(vault.sessions, vault.audit.path, total_bytes, now)
    with _lock:
        _cache[root] = (time.monotonic(), instances, today, found)
    return found


def _scale(top: int) -> int:
    """A round maximum for the axis (1, 2, 5 × 10^n) at or above ``top``."""
    top = max(top, 1)
    step = 1
    while True:
        for m in (1, 2, 5):
            if m * step >= top:
                return m * step
        step *= 10


def _frame(label: str, top_label: str, days: Sequence[dt.date], body: list[str],
           chart_id: str) -> Markup:
    plot_h = HEIGHT - BOTTOM - TOP
    parts = [f'<svg id="{chart_id}" class="chart" viewBox="0 0 {WIDTH} {HEIGHT}" '
             f'role="img" aria-labelledby="{chart_id}-title" '
             f'xmlns="http://www.w3.org/2000/svg">',
             f'<title id="{chart_id}-title">{escape(label)}</title>',
             f'<line class="chart-axis" x1="{LEFT}" y1="{TOP + plot_h}" x2="{WIDTH}" '
             f'y2="{TOP + plot_h}"/>',
             f'<line class="chart-axis" x1="{LEFT}" y1="{TOP}" x2="{LEFT}" '
             f'y2="{TOP + plot_h}"/>',
             f'<text class="chart-label" x="{LEFT - 4}" y="{TOP + 8}" '
             f'text-anchor="end">{escape(top_label)}</text>',
             f'<text class="chart-label" x="{LEFT - 4}" y="{TOP + plot_h}" '
             f'text-anchor="end">0</text>']
    if days:
        parts.append(f'<text class="chart-label" x="{LEFT}" y="{HEIGHT - 4}">'
                     f'{days[0].isoformat()}</text>')
        parts.append(f'<text class="chart-label" x="{WIDTH}" y="{HEIGHT - 4}" '
                     f'text-anchor="end">{days[-1].isoformat()}</text>')
    parts.extend(body)
    parts.append("</svg>")
    return Markup("".join(parts))  # noqa: S704 - every text above is escaped


def _bars(days: Sequence[dt.date], stacks: Sequence[Sequence[tuple[int, str, str]]],
          label: str, chart_id: str, unit: str) -> Markup:
    """One ``<g class="bar">`` per day; each holds one rect per (value, class, name)."""
    top = _scale(max((sum(v for v, _c, _n in s) for s in stacks), default=0))
    plot_w, plot_h = WIDTH - LEFT, HEIGHT - BOTTOM - TOP
    slot = plot_w / max(len(days), 1)
    width = max(slot * 0.8, 1.0)
    body: list[str] = []
    for i, (day, stack) in enumerate(zip(days, stacks, strict=True)):
        x = LEFT + i * slot + (slot - width) / 2
        y = float(TOP + plot_h)
        total = sum(v for v, _c, _n in stack)
        detail = ", ".join(f"{name} {v}" for v, _c, name in stack if v)
        tip = f"{day.isoformat()}: {total} {unit}" + (f" ({detail})" if detail else "")
        rects = []
        for value, cls, _name in stack:
            if not value:
                continue
            h = plot_h * value / top
            y -= h
            rects.append(f'<rect class="{cls}" x="{x:.1f}" y="{y:.1f}" '
                         f'width="{width:.1f}" height="{h:.1f}"/>')
        body.append(f'<g class="bar" data-day="{day.isoformat()}" data-total="{total}">'
                    f'<title>{escape(tip)}</title>{"".join(rects)}</g>')
    return _frame(label, str(top), days, body, chart_id)


@dataclass(frozen=True)
class Legend:
    name: str
    cls: str
    total: int


def received_chart(s: Series, _: Gettext) -> tuple[Markup, list[Legend]]:
    """Images received per day, stacked by calling AE, and the legend."""
    devices = list(s.received)
    classes = {ae: f"chart-s{n % COLOURS}" for n, ae in enumerate(devices)}
    names = {ae: ae or _("unknown device") for ae in devices}
    stacks = [[(s.received[ae][i], classes[ae], names[ae]) for ae in devices]
              for i in range(len(s.days))]
    legend = [Legend(names[ae], classes[ae], sum(s.received[ae])) for ae in devices]
    return (_bars(s.days, stacks, _("Images received per day and device, last %(days)s days")
                  % {"days": len(s.days)}, "chart-received", _("images")), legend)


def sign_in_chart(s: Series, _: Gettext) -> Markup:
    """Sign-ins and failed sign-ins per day, stacked (failed on top, in the alarm colour)."""
    ok, failed = _("sign-ins"), _("failed sign-ins")
    stacks = [[(s.sign_ins[i], "chart-ok", ok), (s.failed_sign_ins[i], "chart-bad", failed)]
              for i in range(len(s.days))]
    return _bars(s.days, stacks, _("Sign-ins and failed sign-ins per day, last %(days)s days")
                 % {"days": len(s.days)}, "chart-sign-ins", _("sign-ins"))


def storage_chart(s: Series, _: Gettext, size_text: str) -> Markup:
    """The bytes held at the end of each day, as a line (``size_text``: the top's label)."""
    top = max(max(s.held, default=0), 1)
    plot_w, plot_h = WIDTH - LEFT, HEIGHT - BOTTOM - TOP
    step = plot_w / max(len(s.days) - 1, 1)
    points = " ".join(f"{LEFT + i * step:.1f},{TOP + plot_h - plot_h * v / top:.1f}"
                      for i, v in enumerate(s.held))
    body = [f'<polyline class="chart-line" points="{points}"/>']
    return _frame(_("Images held at the end of each day, last %(days)s days")
                  % {"days": len(s.days)}, size_text, s.days, body, "chart-storage")
