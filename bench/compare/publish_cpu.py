"""Issue 17: what publishing a stored batch's event costs once its record is durable.

Why: after each commit the archive hands the batch's ``*.store.committed`` event to the
recorder's non-durable sinks (``Recorder.publish``, under the index's write lock): the
console line and the alert sink, as ``serve`` sets them up (INFO through the one-line
formatter, alerts on with their defaults). This times that alone: ``--n`` one-image
events published from ``--threads`` threads, then the alert worker drained; process CPU
(every thread, the alert worker's too) per event, ``--profile`` for a cProfile of the
publishing threads. ``--tree NAME=SRC`` runs the same in a child per tree (``SRC`` first
on ``PYTHONPATH``), alternated for ``--rounds``: an A/B of CPU per event.

    python -m bench.compare.publish_cpu --n 4000
    python -m bench.compare.publish_cpu --tree base=/tmp/base/src --tree new=src
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import logging
import os
import pstats
import statistics
import sys
import threading
import time

from bench.compare.procs import tree_child


def run_once(n: int, threads: int, profile: bool, level: str = "INFO") -> dict[str, float]:
    from pacsvault.audit.alerts import AlertSettings, AlertSink
    from pacsvault.audit.events import LogSink, Recorder
    from pacsvault.audit.stores import StoredRef, batch_events
    from pacsvault.logsafe import OneLineFormatter

    # As ``cli/common.setup_logging`` does for ``serve`` (INFO, one line per entry), into
    # /dev/null instead of the terminal.
    sink_file = open(os.devnull, "w")  # noqa: SIM115 (closed below)
    handler = logging.StreamHandler(sink_file)
    handler.setFormatter(OneLineFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=getattr(logging, level), handlers=[handler], force=True)
    recorder = Recorder([LogSink()])
    alerts = AlertSink(AlertSettings(), recorder, retry_delays=())
    recorder.add_sink(alerts)
    events = [batch_events([StoredRef(f"1.2.3.{i}", f"1.2.4.{i}", f"P{i}", "BENCHSCU",
                                      "127.0.0.1", "")])[0] for i in range(n)]
    profs: list[cProfile.Profile] = []

    def work(k: int) -> None:
        prof = cProfile.Profile(time.thread_time) if profile else None
        if prof is not None:
            profs.append(prof)
            prof.enable()
        for event in events[k::threads]:
            recorder.publish(event)
        if prof is not None:
            prof.disable()

    try:
        c0 = time.process_time()
        pool = [threading.Thread(target=work, args=(k,)) for k in range(threads)]
        for t in pool:
            t.start()
        for t in pool:
            t.join()
        alerts.flush()
        cpu = time.process_time() - c0
    finally:
        alerts.close()
        sink_file.close()
    if profs:
        text = io.StringIO()
        stats = pstats.Stats(*profs, stream=text)
        stats.sort_stats("cumulative").print_stats(25)
        print(text.getvalue(), file=sys.stderr)
    return {"us_per_event": 1e6 * cpu / n}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=4000)
    ap.add_argument("--threads", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--tree", action="append", default=[], help="NAME=SRC (alternated)")
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--level", default="INFO", choices=("INFO", "WARNING"),
                    help="the console's level (WARNING: what the line itself costs)")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child or not args.tree:
        print(json.dumps(run_once(args.n, args.threads, args.profile, args.level)),
              flush=True)
        return
    trees = [(name, src) for name, _, src in (t.partition("=") for t in args.tree)]
    results: dict[str, list[float]] = {name: [] for name, _ in trees}
    for r in range(args.rounds):
        for name, src in (trees if r % 2 == 0 else trees[::-1]):
            got = tree_child(src, "bench.compare.publish_cpu", [
                "--n", str(args.n), "--threads", str(args.threads),
                "--level", args.level])["us_per_event"]
            results[name].append(got)
            print(f"round {r} {name}: {got:.1f} us CPU/event, "
                  f"load {os.getloadavg()[0]:.1f}", flush=True)
    for name, runs in results.items():
        print(f"{name}: CPU us/event median {statistics.median(runs):.1f} "
              f"({', '.join(format(x, '.1f') for x in runs)})")


if __name__ == "__main__":
    main()
