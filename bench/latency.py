"""Per-request latency and server CPU, two source trees A/B (issue 17, "secure must not
mean slow"): one C-FIND (dcmtk ``findscu``, one process and association each), one QIDO-RS
``/studies`` search and one WADO-RS single frame over HTTPS (bearer token), per request.

Why a script of its own: ``bench compare`` measures pacsvault against Orthanc at full size
(~20 min); deciding whether a change to the per-request path helps needs the *same* vault
served by the old and the new code, alternated, with the server's CPU per request (the
machine is shared, so wall time alone says little). Each tree serves its own copy of one
template vault (``serve --workers 1``), started with ``PYTHONPATH`` set to that tree's
``src``; the server's CPU is utime+stime of the serve process and its worker (``psutil``).

Usage: ``python -m bench.latency --old /tmp/pv-old/src [--new src] [--studies 431]
[--reps 15] [--rounds 3] [--workdir DIR] [--profile OUT_PREFIX]``. ``--profile`` samples
the new tree's server with py-spy (raw collapsed stacks) during one extra pass.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import shutil
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import psutil

from bench.compare import profile
from bench.compare.pacsvault_server import PacsvaultTarget
from bench.compare.workloads import FRAME_ACCEPT, findscu, qido, wado
from bench.ingest import make_corpus
from bench.query import NAME_PREFIX, WEEK, populate

CASES: dict[str, Callable[..., float]] = {}


@dataclass
class Served:
    label: str
    src: Path
    target: PacsvaultTarget
    cpu: dict[str, list[float]] = field(default_factory=dict)  # case -> per round: CPU s/req
    wall: dict[str, list[float]] = field(default_factory=dict)  # case -> s per request


def cpu_seconds(pid: int) -> float:
    """utime + stime of the serve process and its children (the worker)."""
    proc = psutil.Process(pid)
    total = sum(proc.cpu_times()[:2])
    for child in proc.children(recursive=True):
        with contextlib.suppress(psutil.Error):
            total += sum(child.cpu_times()[:2])
    return float(total)


def build_template(root: Path, studies: int) -> dict[str, str]:
    """A vault (node BENCHSCU, a bearer token), ``studies`` generated studies and one real
    512x512 CT stored for the frame requests; reused when already there."""
    marker = root / "latency.json"
    if marker.exists():
        return dict(json.loads(marker.read_text()))
    shutil.rmtree(root, ignore_errors=True)
    target = PacsvaultTarget(root, tls=False)
    populate(target.data, target.key, studies, 4, "full", progress=False)
    ct = make_corpus(root / "ct", 1)[0]
    from pydicom import dcmread

    from pacsvault.vault import Vault

    quiet = io.StringIO()
    with contextlib.redirect_stdout(quiet), contextlib.redirect_stderr(quiet):
        vault = Vault.open(target.data, target.key)
        try:
            vault.archive.store(ct.read_bytes(), source_ae="BENCHSCU")
        finally:
            vault.close()
    ds = dcmread(ct, stop_before_pixels=True)
    frame = {"study": str(ds.StudyInstanceUID), "series": str(ds.SeriesInstanceUID),
             "sop": str(ds.SOPInstanceUID)}
    marker.write_text(json.dumps(frame))
    return frame


def serve(label: str, src: Path, template: Path, root: Path) -> Served:
    target = PacsvaultTarget(root, tls=False, template=template)
    saved = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = str(src)
    try:
        target.start()
    finally:
        if saved is None:
            os.environ.pop("PYTHONPATH", None)
        else:
            os.environ["PYTHONPATH"] = saved
    return Served(label, src, target)


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[max(0, min(len(ordered) - 1, round(q * len(ordered) + 0.5) - 1))]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--old", type=Path, required=True, help="the old tree's src directory")
    ap.add_argument("--new", type=Path, default=Path(__file__).resolve().parent.parent / "src")
    ap.add_argument("--studies", type=int, default=431)
    ap.add_argument("--reps", type=int, default=15)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/pv-latency"))
    ap.add_argument("--cases", default="find-name,find-date,qido-name,qido-date,frame")
    ap.add_argument("--profile", type=Path, default=None)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    template = args.workdir / f"template-{args.studies}"
    frame = build_template(template, args.studies)
    week = f"{WEEK[0]}-{WEEK[1]}"
    frame_path = (f"studies/{frame['study']}/series/{frame['series']}/instances/"
                  f"{frame['sop']}/frames/1")
    servers = [serve("old", args.old.resolve(), template, args.workdir / "old"),
               serve("new", args.new.resolve(), template, args.workdir / "new")]
    clients = {s.label: httpx.Client(headers=s.target.http_headers,
                                     verify=str(s.target.ca_file), trust_env=False,
                                     timeout=60) for s in servers}
    out = args.workdir / "find-out"

    def one(s: Served, case: str) -> float:
        t, client = s.target, clients[s.label]
        if case == "find-name":
            return findscu(t, {"PatientName": NAME_PREFIX}, out / s.label)[0]
        if case == "find-date":
            return findscu(t, {"StudyDate": week}, out / s.label)[0]
        if case == "qido-name":
            return qido(client, t, {"PatientName": NAME_PREFIX})[0]
        if case == "qido-date":
            return qido(client, t, {"StudyDate": week})[0]
        if case == "frame":
            return wado(client, t, frame_path, FRAME_ACCEPT, keep=False).seconds
        raise ValueError(case)

    cases = args.cases.split(",")
    try:
        for s in servers:  # warm both (imports, caches, TLS session)
            for case in cases:
                one(s, case)
        for rnd in range(args.rounds):
            order = servers if rnd % 2 == 0 else servers[::-1]
            for case in cases:
                for s in order:
                    # CPU over the whole batch: the kernel counts in 10 ms ticks
                    c0 = cpu_seconds(s.target.pid)
                    for _ in range(args.reps):
                        s.wall.setdefault(case, []).append(one(s, case))
                    spent = cpu_seconds(s.target.pid) - c0
                    s.cpu.setdefault(case, []).append(spent / args.reps)
            print(f"round {rnd + 1}/{args.rounds} done", file=sys.stderr, flush=True)
        if args.profile is not None:
            s = servers[1]
            for case in cases:
                dest = args.profile.with_name(f"{args.profile.name}-{case}.txt")
                with profile.record(s.target.pid, dest, True):
                    time.sleep(1.0)
                    for _ in range(args.reps * 2):
                        one(s, case)
    finally:
        for c in clients.values():
            c.close()
        for s in servers:
            s.target.stop()
    rows = []
    print(f"{'case':<10} {'tree':<4} {'CPU ms/req (median of rounds)':>30} {'rounds':>20} "
          f"{'p50 ms':>8} {'p95 ms':>8}")
    for case in cases:
        for s in servers:
            cpu = statistics.median(s.cpu[case]) * 1000
            p50, p95 = pct(s.wall[case], 0.5) * 1000, pct(s.wall[case], 0.95) * 1000
            each = ", ".join(f"{c * 1000:.1f}" for c in s.cpu[case])
            rows.append({"case": case, "tree": s.label, "cpu_ms": cpu, "p50_ms": p50,
                         "p95_ms": p95, "n": len(s.wall[case]),
                         "cpu_rounds_ms": [c * 1000 for c in s.cpu[case]]})
            print(f"{case:<10} {s.label:<4} {cpu:30.1f} {each:>20} {p50:8.1f} {p95:8.1f}")
    if args.json is not None:
        args.json.write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
