"""Where one C-FIND association's server CPU goes, thread by thread (issue 17).

Why: ``bench.latency`` counts the serving process's CPU in 10 ms kernel ticks and py-spy
misreads waiting threads as busy on a loaded machine, so neither can split ~12 ms between
pynetdicom's threads. Here an in-process ``DicomService`` serves a copy of a vault and
``time.thread_time`` is read around each phase (per-thread CPU, ns resolution):
the request thread (association objects, thread starts), the association thread
(negotiation, the C-FIND request: search, audit record, encoding, sending; the reactor
loop's own rounds), the DUL thread (and its waits), plus the whole process.

Usage: ``python -m bench.assoc_cpu --data DATA --key KEY [--n 15]`` (one tree: the one
importable), or ``--ab OLD_SRC [--new NEW_SRC] [--rounds 6]``: children alternated, old
first, medians of the rounds. DATA: a vault with node BENCHSCU (e.g. a ``bench.latency``
server copy, ``WORKDIR/new/data`` and ``WORKDIR/new/keys/master.key``); it is written to
(audit records). ``findscu`` asks for the week of ``bench.query.WEEK``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tests.harness.peers import dcmtk_env

from bench.compare.workloads import RETURN_KEYS
from bench.ingest import dcmtk
from bench.query import WEEK

PHASES = ("process", "assoc.total", "assoc.negotiate", "negotiate.decide",
          "negotiate.restrict", "negotiate.accepted", "assoc.serve_request", "assoc.loop",
          "dul.total", "dul.wait", "request-thread.handle")


def _instrument(spent: dict[str, list[float]]) -> None:
    from pynetdicom import acse
    from pynetdicom.association import Association
    from pynetdicom.transport import RequestHandler

    from pacsvault.dicom import reactor
    from pacsvault.dicom.server import DicomService

    lock = threading.Lock()

    def wrap(cls: Any, name: str, key: str) -> None:
        orig: Callable[..., Any] = getattr(cls, name)

        def timed(self: Any, *args: Any, **kwargs: Any) -> Any:
            start = time.thread_time()
            try:
                return orig(self, *args, **kwargs)
            finally:
                with lock:
                    spent[key].append(time.thread_time() - start)

        setattr(cls, name, timed)

    wrap(reactor.FastAssociation, "run", "assoc.total")
    wrap(reactor.FastAssociation, "_run_reactor", "assoc.reactor")
    wrap(Association, "_serve_request", "assoc.serve_request")
    wrap(acse.ACSE, "negotiate_association", "assoc.negotiate")
    wrap(reactor.WakeableDUL, "run_reactor", "dul.total")
    wrap(reactor.WakeableDUL, "_pv_wait", "dul.wait")
    wrap(RequestHandler, "handle", "request-thread.handle")
    # inside the negotiation: node look-up and policy, context shaping, acceptance record
    wrap(DicomService, "decide", "negotiate.decide")
    wrap(DicomService, "restrict_contexts", "negotiate.restrict")
    wrap(DicomService, "_on_accepted", "negotiate.accepted")


def measure(data: Path, key: Path, n: int, get: str | None = None) -> dict[str, float]:
    """ms per association for each phase (and ``*.n``: calls per association). ``get``:
    each association is a dcmtk ``getscu`` of that study (its ~120 proposed contexts)
    instead of a ``findscu``."""
    from pacsvault.dicom.server import DicomService
    from pacsvault.vault import Vault

    spent: dict[str, list[float]] = defaultdict(list)
    _instrument(spent)
    vault = Vault.open(data, key)
    service = DicomService(vault)
    port = service.start("127.0.0.1", 0, None)["dicom_port"]
    keys = ["-k", "QueryRetrieveLevel=STUDY", "-k", "StudyInstanceUID"]
    for k in RETURN_KEYS:
        keys += ["-k", f"StudyDate={WEEK[0]}-{WEEK[1]}" if k == "StudyDate" else k]
    out = Path(tempfile.mkdtemp(prefix="pv-assoc-cpu-"))

    if get is not None:
        keys = ["-k", "QueryRetrieveLevel=STUDY", "-k", f"StudyInstanceUID={get}"]
    tool = [dcmtk("getscu"), "-S", "-aet", "BENCHSCU", "-aec", "PACSVAULT", *keys] if get \
        else [dcmtk("findscu"), "-S", "-aet", "BENCHSCU", "-aec", "PACSVAULT", *keys, "-X"]

    def one() -> None:
        shutil.rmtree(out, ignore_errors=True)
        out.mkdir()
        subprocess.run([*tool, "-od", str(out), "127.0.0.1", str(port)],
                       check=True, capture_output=True, timeout=120, env=dcmtk_env())

    try:
        for _ in range(3):  # warm: imports, caches
            one()
        time.sleep(0.5)
        spent.clear()
        cpu = time.process_time()
        for _ in range(n):
            one()
        time.sleep(0.3)  # the last association's threads end
        cpu = time.process_time() - cpu
    finally:
        service.stop()
        vault.close()
        shutil.rmtree(out, ignore_errors=True)
    result = {"process": cpu * 1000 / n}
    for name, values in spent.items():
        result[name] = sum(values) * 1000 / n
        result[name + ".n"] = len(values) / n
    result["assoc.loop"] = result["assoc.reactor"] - result["assoc.serve_request"]
    return result


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, required=True)
    ap.add_argument("--key", type=Path, required=True)
    ap.add_argument("--n", type=int, default=15)
    ap.add_argument("--ab", type=Path, default=None, help="the old tree's src directory")
    ap.add_argument("--new", type=Path, default=Path(__file__).resolve().parent.parent / "src")
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--get", default=None, metavar="STUDY_UID",
                    help="getscu of this study per association instead of findscu")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.ab is None:
        result = measure(args.data, args.key, args.n, args.get)
        if args.child:
            print(json.dumps(result))
        else:
            for name in PHASES:
                print(f"{name:24s} {result.get(name, 0.0):7.2f} ms/association")
        return 0
    runs: dict[str, list[dict[str, float]]] = {"old": [], "new": []}
    here = str(Path(__file__).resolve().parent.parent)
    for _ in range(args.rounds):
        for label, src in (("old", args.ab), ("new", args.new)):
            env = dict(os.environ, PYTHONPATH=f"{src.resolve()}{os.pathsep}{here}")
            proc = subprocess.run(
                [sys.executable, "-m", "bench.assoc_cpu", "--child", "--data", str(args.data),
                 "--key", str(args.key), "--n", str(args.n),
                 *(["--get", args.get] if args.get else [])],
                env=env, capture_output=True, text=True, check=True, timeout=900)
            runs[label].append(json.loads(proc.stdout.strip().splitlines()[-1]))
    print(f"{'phase (ms/association, median)':32s} {'old':>7s} {'new':>7s}")
    for name in (*PHASES, "dul.wait.n"):
        old = statistics.median(r.get(name, 0.0) for r in runs["old"])
        new = statistics.median(r.get(name, 0.0) for r in runs["new"])
        print(f"{name:32s} {old:7.2f} {new:7.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
