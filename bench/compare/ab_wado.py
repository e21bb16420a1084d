"""A/B of the WADO-RS series path alone (issue 17): two pacsvault trees and the bare
uvicorn HTTPS ceiling, same run, alternated.

``python -m bench.compare.ab_wado --old DIR [--new DIR] [--slices N] [--rounds R]
[--reps K]``: DIR holds ``pacsvault/`` (``git archive <commit> src | tar -x``), put first
on the server's ``PYTHONPATH``; without ``--new`` the installed pacsvault is "new".

Why a script of its own: ``ab_retrieval`` also runs C-GET and Orthanc (minutes of setup
and transfer); deciding whether a change to the WADO-RS part pipeline helps needs only
the series retrieval, the same vault served by both trees in turn, and the ceiling it is
bounded by (``ceilings``' bare Starlette app sending the same files as a multipart from
memory over HTTPS, same ``httpx`` client). Reported: median MB/s per variant and the
server's CPU seconds per retrieval (``psutil`` user + system of serve and its worker),
which the other jobs on a shared machine disturb far less than wall time.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

from bench.compare import ceilings, dataset
from bench.compare.ab_retrieval import _cpu, _start_pv
from bench.compare.pacsvault_server import PacsvaultTarget
from bench.compare.procs import rmtree
from bench.compare.workloads import SERIES_ACCEPT, http_client, ingest, wado

MB = 1e6


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.compare.ab_wado")
    ap.add_argument("--old", type=Path, required=True)
    ap.add_argument("--new", type=Path)
    ap.add_argument("--slices", type=int, default=60, help="CT slices 512x512 (one series)")
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--reps", type=int, default=3, help="retrievals per variant per round")
    ap.add_argument("--out", type=Path, default=Path("/tmp/ab_wado"))
    args = ap.parse_args(argv)
    rmtree(args.out / "work")
    work = args.out / "work"
    work.mkdir(parents=True)
    size = dataset.Size("ab", 1, args.slices, 0, 1, 1, 0)
    corpus = dataset.generate(args.out / "dataset", size)
    ct = corpus.of_kind("CT")
    study, series = ct[0].study, ct[0].series
    files = corpus.files(ct)
    nbytes = sum(i.bytes for i in ct)
    print(f"{len(ct)} CT, {nbytes / MB:.1f} MB", file=sys.stderr)
    pv = PacsvaultTarget(work / "pv", False)
    variants: dict[str, Path | None] = {"old": args.old.resolve(),
                                        "new": args.new.resolve() if args.new else None}
    _start_pv(pv, variants["new"])
    ingest(pv, files, 4, work / "logs-pv")
    pv.stop()
    mbps: dict[str, list[float]] = {n: [] for n in (*variants, "ceiling")}
    cpu: dict[str, list[float]] = {n: [] for n in variants}
    path = f"studies/{study}/series/{series}"
    for r in range(args.rounds):
        names = list(variants) if r % 2 == 0 else list(variants)[::-1]
        for name in names:
            _start_pv(pv, variants[name])
            client = http_client(pv)
            try:
                wado(client, pv, path, SERIES_ACCEPT, False)  # warm: imports, TLS session
                for _ in range(args.reps):
                    c0 = _cpu(pv.pid)
                    res = wado(client, pv, path, SERIES_ACCEPT, False)
                    cpu[name].append(_cpu(pv.pid) - c0)
                    mbps[name].append(res.nbytes / res.seconds / MB)
            finally:
                client.close()
                pv.stop()
        mbps["ceiling"] += ceilings._web_once("web_https", files, work / "ceilings", args.reps)
        print(f"round {r + 1}/{args.rounds} done", file=sys.stderr, flush=True)
    ceiling = statistics.median(mbps["ceiling"])
    print("| variant | WADO-RS series MB/s (median) | all | server CPU s per retrieval | "
          "share of the ceiling |")
    print("|---|---:|---|---:|---:|")
    for n in variants:
        own = statistics.median(mbps[n])
        print(f"| {n} | {own:.1f} | {', '.join(f'{v:.0f}' for v in mbps[n])} | "
              f"{statistics.median(cpu[n]):.3f} | {own / ceiling:.2f} |")
    print(f"| ceiling (bare uvicorn HTTPS from memory) | {ceiling:.1f} | "
          f"{', '.join(f'{v:.0f}' for v in mbps['ceiling'])} | | 1.00 |")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
