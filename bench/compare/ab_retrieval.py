"""A/B of the retrieval path (issue 17): two pacsvault source trees and Orthanc, same run.

``python -m bench.compare.ab_retrieval --old DIR [--new DIR] [--slices N] [--rounds R]``:
DIR is a source tree holding ``pacsvault/`` (e.g. ``git archive <commit> src | tar -x``),
put first on the server's ``PYTHONPATH``; without ``--new`` the installed pacsvault is "new".
One vault serves both variants in turn (same data, same index), Orthanc holds the same
files; every round runs C-GET (getscu) and C-MOVE (movescu to itself) of the CT study and
WADO-RS of its series against each server, the order rotated each round, then the wire
ceilings of C-GET and WADO-RS (``ceilings``:
a bare pynetdicom C-GET SCP from memory to the same getscu at 16 KB PDUs, a bare uvicorn
multipart from memory over HTTPS, same client). Reported per server: median MB/s and the
server's CPU seconds per retrieval (``psutil``, user + system), which the load of other
processes on the machine disturbs far less than wall time.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
from pathlib import Path

import psutil

from bench.compare import ceilings, dataset
from bench.compare.base import Target
from bench.compare.orthanc import OrthancTarget, ensure_installed
from bench.compare.pacsvault_server import PacsvaultTarget
from bench.compare.procs import free_port, rmtree
from bench.compare.workloads import SERIES_ACCEPT, cget, cmove, http_client, ingest, wado

MB = 1e6


def _cpu(pid: int) -> float:
    proc = psutil.Process(pid)
    total = 0.0
    for p in (proc, *proc.children(recursive=True)):
        try:
            t = p.cpu_times()
            total += t.user + t.system
        except psutil.NoSuchProcess:
            continue
    return total


def _start_pv(target: PacsvaultTarget, src: Path | None) -> None:
    saved = os.environ.get("PYTHONPATH")
    if src is not None:
        os.environ["PYTHONPATH"] = str(src)
    else:
        os.environ.pop("PYTHONPATH", None)
    try:
        target.start()
    finally:
        if saved is None:
            os.environ.pop("PYTHONPATH", None)
        else:
            os.environ["PYTHONPATH"] = saved


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.compare.ab_retrieval")
    ap.add_argument("--old", type=Path, required=True)
    ap.add_argument("--new", type=Path)
    ap.add_argument("--slices", type=int, default=60, help="CT slices 512x512 (one series)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", type=Path, default=Path("/tmp/ab_retrieval"))
    args = ap.parse_args(argv)
    ensure_installed()
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
    orth = OrthancTarget(work / "orthanc", False, work / "pki")
    ports = {"pv": free_port(), "orthanc": free_port()}
    pv.allow_move(ports["pv"])
    orth.allow_move(ports["orthanc"])
    variants: dict[str, Path | None] = {"pv-old": args.old.resolve(),
                                        "pv-new": args.new.resolve() if args.new else None}
    _start_pv(pv, variants["pv-new"])
    ingest(pv, files, 4, work / "logs-pv")
    pv.stop()
    orth.start()
    ingest(orth, files, 4, work / "logs-orthanc")
    names = [*variants, "orthanc"]
    kinds = ("cget", "cmove", "wado")
    mbps: dict[str, dict[str, list[float]]] = {n: {k: [] for k in kinds}
                                               for n in (*names, "ceiling")}
    cpu: dict[str, dict[str, list[float]]] = {n: {k: [] for k in kinds} for n in names}
    try:
        for r in range(args.rounds):
            rotated = names[r % len(names):] + names[:r % len(names)]
            for name in rotated:
                target: Target = orth if name == "orthanc" else pv
                if name != "orthanc":
                    _start_pv(pv, variants[name])
                client = http_client(target)
                try:
                    for _ in range(2):
                        c0 = _cpu(target.pid)
                        res = cget(target, study, work / "cget" / name)
                        cpu[name]["cget"].append(_cpu(target.pid) - c0)
                        mbps[name]["cget"].append(res.nbytes / res.seconds / MB)
                        c0 = _cpu(target.pid)
                        res = cmove(target, study, work / "cmove" / name,
                                    ports["orthanc" if name == "orthanc" else "pv"])
                        cpu[name]["cmove"].append(_cpu(target.pid) - c0)
                        mbps[name]["cmove"].append(res.nbytes / res.seconds / MB)
                        c0 = _cpu(target.pid)
                        res = wado(client, target, f"studies/{study}/series/{series}",
                                   SERIES_ACCEPT, False)
                        cpu[name]["wado"].append(_cpu(target.pid) - c0)
                        mbps[name]["wado"].append(res.nbytes / res.seconds / MB)
                finally:
                    client.close()
                    if name != "orthanc":
                        pv.stop()
                print(f"round {r} {name} done", file=sys.stderr)
            for _ in range(2):
                mbps["ceiling"]["cget"].append(
                    ceilings._get_once("get_pyn_16k", files, study, work / "ceilings"))
            mbps["ceiling"]["wado"] += ceilings._web_once("web_https", files, work / "ceilings", 2)
    finally:
        orth.stop()
    print("| server | C-GET MB/s | C-GET server CPU s | C-MOVE MB/s | C-MOVE server CPU s "
          "| WADO-RS series MB/s | WADO-RS server CPU s |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for n in names:
        m, c = mbps[n], cpu[n]
        print(f"| {n} | " + " | ".join(f"{statistics.median(m[k]):.1f} | "
                                        f"{statistics.median(c[k]):.2f}" for k in kinds) + " |")
    m = mbps["ceiling"]
    print(f"| wire ceiling (bare pynetdicom C-GET SCP / bare uvicorn HTTPS, from memory) | "
          f"{statistics.median(m['cget']):.1f} | | | | {statistics.median(m['wado']):.1f} | |")
    # Same-run shares (issue 17): each pacsvault variant against Orthanc and the ceiling.
    for n in variants:
        for kind in kinds:
            own = statistics.median(mbps[n][kind])
            ceiling = (f", {own / statistics.median(m[kind]):.2f} of the ceiling"
                       if m[kind] else "")
            print(f"{n} {kind}: {own / statistics.median(mbps['orthanc'][kind]):.2f} of "
                  f"Orthanc{ceiling}; CPU "
                  f"{statistics.median(cpu[n][kind]) / statistics.median(cpu['orthanc'][kind]):.1f}"
                  "x Orthanc's")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
