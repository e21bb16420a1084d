"""C-GET only A/B of two pacsvault source trees (issue 17): more samples, less time.

``python -m bench.compare.ab_cget --old DIR --new DIR [--slices N] [--rounds R] [--per N]``:
DIR as in ``ab_retrieval`` (a tree holding ``pacsvault/``). One vault, the two trees served
in turn (order swapped every round), one untimed warm-up C-GET after each start, then
``--per`` timed getscu C-GETs of the CT study; per tree: median MB/s and median server CPU
seconds per C-GET (``psutil``, user + system), and every sample. No Orthanc, no ceilings:
``ab_retrieval`` gives those in the same run.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

from bench.compare import dataset
from bench.compare.ab_retrieval import _cpu, _start_pv
from bench.compare.pacsvault_server import PacsvaultTarget
from bench.compare.procs import rmtree
from bench.compare.workloads import cget, ingest

MB = 1e6


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.compare.ab_cget")
    ap.add_argument("--old", type=Path, required=True)
    ap.add_argument("--new", type=Path, required=True)
    ap.add_argument("--slices", type=int, default=60, help="CT slices 512x512 (one series)")
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--per", type=int, default=3, help="timed C-GETs per tree per round")
    ap.add_argument("--out", type=Path, default=Path("/tmp/ab_cget"))
    args = ap.parse_args(argv)
    rmtree(args.out / "work")
    work = args.out / "work"
    work.mkdir(parents=True)
    corpus = dataset.generate(args.out / "dataset", dataset.Size("ab", 1, args.slices, 0, 1,
                                                                 1, 0))
    ct = corpus.of_kind("CT")
    study = ct[0].study
    trees = {"old": args.old.resolve(), "new": args.new.resolve()}
    pv = PacsvaultTarget(work / "pv", False)
    _start_pv(pv, trees["new"])
    try:
        ingest(pv, corpus.files(ct), 4, work / "logs")
    finally:
        pv.stop()
    mbps: dict[str, list[float]] = {name: [] for name in trees}
    cpu: dict[str, list[float]] = {name: [] for name in trees}
    for r in range(args.rounds):
        for name in (["old", "new"] if r % 2 == 0 else ["new", "old"]):
            _start_pv(pv, trees[name])
            try:
                cget(pv, study, work / "get")  # warm-up: the process's first C-GET
                for _ in range(args.per):
                    c0 = _cpu(pv.pid)
                    got = cget(pv, study, work / "get")
                    cpu[name].append(_cpu(pv.pid) - c0)
                    mbps[name].append(got.nbytes / got.seconds / MB)
            finally:
                pv.stop()
        print(f"round {r} done", file=sys.stderr)
    for name in trees:
        print(f"{name}: C-GET {statistics.median(mbps[name]):.1f} MB/s, server CPU "
              f"{statistics.median(cpu[name]):.3f} s (samples MB/s "
              f"{[round(x) for x in mbps[name]]}, CPU {[round(x, 3) for x in cpu[name]]})")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
