"""Rows of figures -> JSON and a Markdown table (medians, min-max, ratio, share of a limit)."""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field
from typing import Any

from bench.compare import query_ceilings
from bench.compare.ceilings import KINDS, SHORT

SERVERS = ("pacsvault", "orthanc")
# pacsvault on PostgreSQL + S3, 2 instances or 2 workers (issue 16; bench/compare/scaleout.py):
# its own column, only in tables where it has figures.
SCALE_OUT = "scale-out"
COLUMNS = (*SERVERS, SCALE_OUT)
LIMIT_LABELS = {
    "disk_write_fsync_MBps": "disk write+fsync",
    "loopback_tcp_MBps": "loopback TCP",
    "small_files_fsync_per_s": "fsync'ed 512 kB files/s",
}


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100)."""
    s = sorted(values)
    return s[max(0, math.ceil(q / 100 * len(s)) - 1)]


@dataclass
class Row:
    workload: str
    metric: str  # e.g. "images/s", "MB/s", "p95 ms"
    higher_is_better: bool
    stat: str = "median"  # median | p50 | p95 | value
    limit: str | None = None  # key of the limits dict
    samples: dict[str, list[float]] = field(default_factory=lambda: {s: [] for s in COLUMNS})
    checks: dict[str, str] = field(default_factory=dict)  # server -> "ok ..." / "MISMATCH ..."
    informational: bool = False  # a fact about the servers, not a race (no "ahead")
    # wire ceilings it is read against (``ceilings.KINDS``: "store" or an ingest row's other
    # shape such as "store_tls4", "get", "web"), or None
    ceiling: str | None = None
    # the row's unit per MB/s of its ceilings (images per MB of its files, for an images/s
    # row read against MB/s ceilings); None: the ceilings' own unit
    per_mb: float | None = None
    # the row's own ceilings (``query_ceilings``: a query's answer sent by a bare stack),
    # key -> samples in the row's unit, read with the row's ``stat``
    wire: dict[str, list[float]] = field(default_factory=dict)

    def value(self, server: str) -> float | None:
        return self._stat(self.samples[server])

    def _stat(self, v: list[float]) -> float | None:
        if not v:
            return None
        if self.stat == "p95":
            return percentile(v, 95)
        if self.stat == "p50":
            return percentile(v, 50)
        return float(statistics.median(v))

    def ratio(self, server: str = "pacsvault") -> float | None:
        a, b = self.value(server), self.value("orthanc")
        return a / b if a is not None and b else None

    def cell(self, server: str) -> str:
        v = self.samples[server]
        if not v:
            return "-"
        if self.stat == "p95" or len(v) == 1:
            return _num(self.value(server))
        return f"{_num(self.value(server))} ({_num(min(v))}–{_num(max(v))})"

    def ahead(self) -> bool | None:
        r = self.ratio()
        if r is None or self.informational:
            return None
        return r >= 1 if self.higher_is_better else r <= 1

    def ceiling_values(self, ceilings: dict[str, float]) -> dict[str, float]:
        """Each ceiling this row is read against: its own (``wire``), else the run's of
        its kind."""
        if self.wire:
            return {k: x for k, v in self.wire.items() if (x := self._stat(v))}
        if not self.ceiling:
            return {}
        scale = self.per_mb or 1.0
        return {k: ceilings[k] * scale for k in KINDS[self.ceiling] if ceilings.get(k)}

    def ceiling_shares(self, server: str, ceilings: dict[str, float]) -> dict[str, float]:
        """The server's figure as a fraction of each ceiling (of its speed, for a row
        where lower is better: 0.5 = twice the ceiling's latency)."""
        v = self.value(server)
        if not v:
            return {}
        return {k: v / c if self.higher_is_better else c / v
                for k, c in self.ceiling_values(ceilings).items()}

    def to_json(self, limits: dict[str, float],
                ceilings: dict[str, float] | None = None) -> dict[str, Any]:
        out: dict[str, Any] = {
            "workload": self.workload, "metric": self.metric, "stat": self.stat,
            "higher_is_better": self.higher_is_better, "ratio": self.ratio(),
            "pacsvault_ahead": self.ahead(), "limit": self.limit, "checks": self.checks,
            "ceiling": self.ceiling,
        }
        for s in COLUMNS:
            v = self.samples[s]
            if s == SCALE_OUT and not v:
                continue
            out[s] = {"value": self.value(s), "min": min(v) if v else None,
                      "max": max(v) if v else None, "n": len(v), "samples": v}
            if self.limit and self.value(s) is not None and limits.get(self.limit):
                out[s]["fraction_of_limit"] = self.value(s) / limits[self.limit]  # type: ignore[operator]
            if s in SERVERS and (shares := self.ceiling_shares(s, ceilings or {})):
                out[s]["fraction_of_ceilings"] = shares
        if self.samples[SCALE_OUT]:
            out["scale_out_ratio"] = self.ratio(SCALE_OUT)
        if self.wire:
            out["ceilings"] = {k: {"label": query_ceilings.LABELS.get(k, k),
                                   "value": self._stat(v), "samples": v}
                               for k, v in self.wire.items()}
        return out


def _num(v: float | None) -> str:
    if v is None:
        return "-"
    if v >= 100:
        return f"{v:.0f}"
    if v >= 10:
        return f"{v:.1f}"
    return f"{v:.2f}"


def _shares(r: Row, server: str, ceilings: dict[str, float]) -> str:
    shares = r.ceiling_shares(server, ceilings)
    if r.wire:  # the row's own ceilings: their figure too (no table lists them)
        values = r.ceiling_values(ceilings)
        return ", ".join(f"{100 * v:.0f} % {query_ceilings.SHORT.get(k, k)} "
                         f"{_num(values[k])}" for k, v in shares.items())
    return ", ".join(f"{100 * v:.0f} % {SHORT[k]}" for k, v in shares.items())


def markdown(rows: list[Row], limits: dict[str, float],
             ceilings: dict[str, float] | None = None) -> str:
    scale = any(r.samples[SCALE_OUT] for r in rows)
    wire = ceilings or {}
    show = bool(wire) or any(r.wire for r in rows)
    lines = [
        "| workload | metric | pacsvault | Orthanc | ratio pv/Orthanc | pacsvault ahead | "
        "pacsvault % of limit | Orthanc % of limit | limit |"
        + (" pacsvault % of wire ceilings | Orthanc % of wire ceilings |" if show else "")
        + (" pacsvault scale-out | ratio scale-out/Orthanc |" if scale else ""),
        "|---|---|---:|---:|---:|:---:|---:|---:|---|" + ("---|---|" if show else "")
        + ("---:|---:|" if scale else ""),
    ]
    for r in rows:
        ratio = r.ratio()
        ahead = {True: "yes", False: "**no**", None: "-"}[r.ahead()]
        fr = []
        for s in SERVERS:
            val, lim = r.value(s), limits.get(r.limit or "")
            fr.append(f"{100 * val / lim:.0f} %" if val is not None and lim else "")
        label = LIMIT_LABELS.get(r.limit or "", "")
        if r.limit and r.limit in limits:
            label += f" {_num(limits[r.limit])}"
        lines.append(
            f"| {r.workload} | {r.metric} | {r.cell('pacsvault')} | {r.cell('orthanc')} | "
            f"{_num(ratio) if ratio is not None else '-'} | {ahead} | {fr[0]} | {fr[1]} | "
            f"{label} |"
            + (f" {_shares(r, 'pacsvault', wire)} | {_shares(r, 'orthanc', wire)} |"
               if show else "")
            + (f" {r.cell(SCALE_OUT)} | {_num(r.ratio(SCALE_OUT))} |" if scale else ""))
    return "\n".join(lines)


def limits_markdown(limits: dict[str, float]) -> str:
    return "\n".join([
        "| physical limit (same run) | value |", "|---|---:|",
        f"| sequential disk write, fsync'ed | {limits['disk_write_fsync_MBps']:.0f} MB/s |",
        f"| 512 kB files written, fsync'ed, renamed | {limits['small_files_fsync_per_s']:.0f}"
        " files/s |",
        f"| AES-256-GCM (`cryptography`, one core) | {limits['aes_256_gcm_1core_MBps']:.0f} MB/s |",
        f"| loopback TCP, one stream | {limits['loopback_tcp_MBps']:.0f} MB/s |",
    ])
