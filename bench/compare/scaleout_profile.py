"""Where a scale-out serve's CPU per image goes (issue 16, attribution of the receive path).

Why: ``bench.compare.scaleout_ab`` measures 12–16 ms of server CPU per image for
``serve --workers 2`` on PostgreSQL + SeaweedFS, of which ``Archive.store`` is only
4.5–6 ms; this records py-spy samples of every serve process (``--subprocesses``, non-idle
samples only) during one push with 4 ``storescu`` associations and sorts each sample into
a bucket by the first frame of its stack that names one (innermost wins), so the rest is
attributed instead of guessed. ``--gil`` (default) keeps only the thread holding the GIL:
py-spy's idle detection counts threads blocked in ``select``/``Condition.wait`` as active,
which without it puts ~60 % of the samples on waits. Also prints each process's CPU per
image (worker balance) and the tree's.

Usage: ``python -m bench.compare.scaleout_profile [--ct 120] [--mr 40] [--rate 200]``.
Needs py-spy (``.venv/bin/py-spy``) and ptrace rights on the children.
"""

from __future__ import annotations

import argparse
import collections
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.compare.scaleout import Components, ScaleOutTarget, ingest
from bench.compare.scaleout_ab import _files, _tree_cpu

# (bucket, substring of a "function (file:line)" frame); checked innermost frame first
BUCKETS: tuple[tuple[str, str], ...] = (
    ("trail flock", "_file_held"),
    ("pool pre-ping", "_do_ping_w_event"),
    ("pool pre-ping", "do_ping"),
    ("S3 PUT (botocore)", "botocore/"),
    ("TLS/ssl", "ssl.py"),
    ("PostgreSQL driver (psycopg)", "psycopg/"),
    ("SQLAlchemy", "sqlalchemy/"),
    ("crypto (cryptography/pyrage)", "cryptography/"),
    ("trail / audit", "pacsvault/audit/"),
    ("archive (storage/)", "pacsvault/storage/"),
    ("index (index/)", "pacsvault/index/"),
    ("pydicom", "pydicom/"),
    ("pynetdicom", "pynetdicom/"),
    ("dicom receive (pacsvault/dicom)", "pacsvault/dicom/"),
)
# the frames that say which part of the server a sample belongs to (innermost wins)
OWNERS: tuple[tuple[str, str], ...] = (
    ("trail (audit/trail.py)", "audit/trail.py"),
    ("audit, other (events, instances, stores)", "pacsvault/audit/"),
    ("Archive.store", "storage/archive.py"),
    ("storage, other (S3 store, rows, key choice)", "pacsvault/storage/"),
    ("index (index/)", "pacsvault/index/"),
    ("DICOM receive (dicom/: server, reactor)", "pacsvault/dicom/"),
    ("serve (workers, scheduler)", "pacsvault/serve"),
    ("web", "pacsvault/web/"),
)


def _bucket(frames: list[str], table: tuple[tuple[str, str], ...], inner: bool) -> str:
    order = reversed(frames) if inner else iter(frames)
    for frame in order:
        if frame.startswith("process "):
            continue
        for name, needle in table:
            if needle in frame:
                return name
    return "other"


def _own_cpu(pid: int) -> float:
    import psutil

    try:
        t = psutil.Process(pid).cpu_times()
    except psutil.Error:
        return 0.0
    return t.user + t.system


def _children(pid: int) -> list[int]:
    import psutil

    return [c.pid for c in psutil.Process(pid).children(recursive=True)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--ct", type=int, default=120)
    ap.add_argument("--mr", type=int, default=40)
    ap.add_argument("--assoc", type=int, default=4)
    ap.add_argument("--rate", type=int, default=200)
    ap.add_argument("--warm", type=int, default=16,
                    help="images pushed before recording (each worker's first S3 client, "
                         "imports and caches are one-off costs, not per image)")
    ap.add_argument("--no-gil", action="store_true", help="every non-idle thread, not the GIL's")
    args = ap.parse_args()
    spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    work = Path(tempfile.mkdtemp(prefix="pv-soprof-"))
    try:
        files = _files(work / "files", args.ct, args.mr)
        with Components() as comp:
            target = ScaleOutTarget(work / "cell", comp, "workers")
            target.start()
            try:
                time.sleep(2.0)  # workers up, first scrub slice done
                if args.warm:
                    warm = _files(work / "warm", args.warm, 0)
                    ingest(target, warm, args.assoc, work / "warm-logs")
                pid = target.services[0].pid
                out = work / "spy.txt"
                spy_proc = subprocess.Popen(
                    [spy, "record", "--pid", str(pid), "--subprocesses", "--format", "raw",
                     "--rate", str(args.rate), "--output", str(out), "--nonblocking",
                     *([] if args.no_gil else ["--gil"])],
                    stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
                time.sleep(1.5)
                pids = [pid, *_children(pid)]
                own0 = [_own_cpu(p) for p in pids]
                cpu0 = _tree_cpu(pid)
                wall = ingest(target, files, args.assoc, work / "logs")
                cpu = _tree_cpu(pid) - cpu0
                own = [_own_cpu(p) - c for p, c in zip(pids, own0, strict=True)]
                spy_proc.send_signal(2)
                spy_proc.wait(timeout=60)
            finally:
                target.stop()
        print(f"{len(files)} images, {args.assoc} associations, {wall:.1f} s, "
              f"serve tree CPU {1000 * cpu / len(files):.1f} ms/image; per process (parent, "
              f"workers) {', '.join(f'{1000 * c / len(files):.1f}' for c in own)} ms/image")
        inner: collections.Counter[str] = collections.Counter()
        owner: collections.Counter[str] = collections.Counter()
        procs: collections.Counter[str] = collections.Counter()
        total = 0
        for line in out.read_text().splitlines():
            stack, _, count = line.rpartition(" ")
            if not stack:
                continue
            n = int(count)
            frames = stack.split(";")
            total += n
            inner[_bucket(frames, BUCKETS, True)] += n
            owner[_bucket(frames, OWNERS, True)] += n
            procs[next((f.split(":")[0] for f in reversed(frames) if f.startswith("process ")),
                       "?")] += n
        ms = 1000 * cpu / len(files)
        for title, counter in (("innermost library/part", inner), ("owning server part", owner),
                               ("process", procs)):
            print(f"\n| {title} | share of samples | ≈ ms CPU/image |\n|---|---:|---:|")
            for name, n in counter.most_common(20):
                print(f"| {name} | {100 * n / total:.1f} % | {ms * n / total:.2f} |")
        keep = os.environ.get("PV_PROFILE_KEEP")
        if keep:
            shutil.copy(out, keep)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
