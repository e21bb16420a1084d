"""Where a scale-out store's time goes (issue 16, ingest): in-process ``Archive.store`` into
a sealed PostgreSQL index + SeaweedFS S3 bucket, from 4 threads (4 associations' worth).

Why in process: the machine is shared and loaded, so wall times say little; what this
counts is deterministic or CPU: this process's CPU per image, SQL statements and commits
per image (at the psycopg level: one ``execute``/``executemany`` is one round trip, a
pipeline counted as one), and the wall time spent inside S3 PUTs and PostgreSQL commits
(summed over threads). A/B: ``--tree old=DIR`` runs the same measurement with another
source tree first on ``PYTHONPATH`` (e.g. ``git archive HEAD src | tar -x -C /tmp/old``),
alternated with the working tree, same PostgreSQL and SeaweedFS, a fresh database and
bucket per run.

Usage: ``python -m bench.scaleout_ingest [--rounds 3] [--tree old=/tmp/old/src]
[--workload ct] [--ct-size 512]``
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
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
WORKLOADS = ("ct", "mr")


def _dataset(kind: str, out: Path, ct_size: int = 256) -> list[bytes]:
    """ct: 200 CT slices ``ct_size``² (256; 512 is what ``scaleout_ab`` sends to serve)
    of one study; mr: 60 studies x 2 images 64x64, a new patient every third study (the
    bench dataset's 0.3 patients per study)."""
    from pydicom import dcmread
    from pydicom.uid import generate_uid
    from tests import corpus

    if kind == "ct":
        return [p.read_bytes() for p in corpus.synthetic_ct_series(out, 200, size=ct_size)]
    files = corpus.synthetic_ct_series(out, 120, size=64)
    raws = []
    study = series = patient = ""
    for i, f in enumerate(files):
        ds = dcmread(f)
        if i % 2 == 0:
            study, series = generate_uid(), generate_uid()
            if i % 6 == 0:
                patient = f"BENCH{generate_uid()[-10:]}"
        ds.PatientID, ds.PatientName = patient, f"BENCH^{patient}"
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
        ds.Modality = "MR"
        ds.save_as(f, enforce_file_format=True)
        raws.append(f.read_bytes())
    return raws


class Counter:
    """Round trips and time, patched onto psycopg and the S3 store (this process only)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.n: dict[str, int] = {}
        self.t: dict[str, float] = {}
        self.cpu: dict[str, float] = {}  # thread CPU inside the wrapped calls
        self.shapes: dict[str, int] = {}  # statement text (start) -> times run

    def wrap(self, owner: Any, name: str, label: str) -> None:
        original: Callable[..., Any] = getattr(owner, name)

        def counted(*args: Any, **kwargs: Any) -> Any:
            start, cpu = time.perf_counter(), time.thread_time()
            try:
                return original(*args, **kwargs)
            finally:
                spent = time.perf_counter() - start
                used = time.thread_time() - cpu
                with self.lock:
                    self.n[label] = self.n.get(label, 0) + 1
                    self.t[label] = self.t.get(label, 0.0) + spent
                    self.cpu[label] = self.cpu.get(label, 0.0) + used
                    if label == "sql" and len(args) > 1:
                        shape = " ".join(str(args[1]).split())[:90]
                        self.shapes[shape] = self.shapes.get(shape, 0) + 1

        setattr(owner, name, counted)


def child(kind: str, pg: dict[str, Any], s3: dict[str, Any], threads: int,
          ct_size: int = 256) -> dict[str, Any]:
    """One measurement (run in a subprocess: its own tree on ``sys.path``)."""
    from concurrent.futures import ThreadPoolExecutor

    import psycopg
    from tests.helpers import VaultDir

    from pacsvault import config
    from pacsvault.storage.s3 import S3Store
    from pacsvault.vault import Vault, create

    work = Path(tempfile.mkdtemp(prefix="pv-soi-"))
    raws = _dataset(kind, work / "files", ct_size)
    key = work / "keys" / "master.key"
    create(work / "data", key_file=key, ae_title="PVBENCH",
           index=config.IndexSettings(url=pg["url"], password_file=pg["password_file"]))
    vd = VaultDir(work, key, "")
    for name, value in s3.items():
        vd.set_toml("storage", name, value)
    vault = Vault.open(work / "data", key)
    counter = Counter()
    counter.wrap(psycopg.Cursor, "execute", "sql")
    counter.wrap(psycopg.Cursor, "executemany", "sql")
    counter.wrap(psycopg.Connection, "commit", "commit")
    counter.wrap(S3Store, "stage_spare", "put")
    try:
        vault.archive.store(raws[0], source_ae="WARM")  # first connections, key caches
        with counter.lock:
            counter.n.clear()
            counter.t.clear()
            counter.cpu.clear()
            counter.shapes.clear()
        rest = raws[1:]
        wall0, cpu0 = time.perf_counter(), time.process_time()
        with ThreadPoolExecutor(threads) as pool:
            results = list(pool.map(lambda r: vault.archive.store(r, source_ae="M"), rest))
        wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
        assert all(r.status.value == "stored" for r in results), results[:3]
        vault.archive.settle()
        counts = vault.archive.counts()
    finally:
        vault.close()
        shutil.rmtree(work, ignore_errors=True)
    n = len(rest)
    if os.environ.get("PV_SOI_SHAPES"):  # which statements, most frequent first
        for shape, times in sorted(counter.shapes.items(), key=lambda kv: -kv[1])[:25]:
            print(f"{times / n:6.2f}  {shape}", file=sys.stderr)
    return {"images": n, "indexed": counts.get("instances"), "cpu_ms": 1000 * cpu / n,
            "wall_s": wall, "images_s": n / wall,
            "sql_per_image": counter.n.get("sql", 0) / n,
            "commits_per_image": counter.n.get("commit", 0) / n,
            "put_ms": 1000 * counter.t.get("put", 0.0) / n,
            "put_cpu_ms": 1000 * counter.cpu.get("put", 0.0) / n,
            "commit_ms": 1000 * counter.t.get("commit", 0.0) / n,
            "sql_ms": 1000 * counter.t.get("sql", 0.0) / n}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=4)
    parser.add_argument("--ct-size", type=int, default=256,
                        help="CT slice size (512: the size scaleout_ab sends to serve)")
    parser.add_argument("--workload", choices=WORKLOADS, action="append")
    parser.add_argument("--tree", action="append", default=[],
                        help="label=SRC_DIR, measured alternately with 'new' (this tree)")
    parser.add_argument("--only-trees", action="store_true",
                        help="measure the --tree trees only (not this working tree)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        spec = json.loads(args.child)
        print(json.dumps(child(spec["kind"], spec["pg"], spec["s3"], args.threads,
                               args.ct_size)))
        return
    from tests.harness.components import owned_tempdir
    from tests.harness.postgres import create_database, start_postgres, stop_postgres
    from tests.harness.seaweed import create_bucket, start_seaweed, stop_seaweed

    given = [tuple(t.split("=", 1)) for t in args.tree]
    trees = given if args.only_trees else [("new", str(ROOT / "src")), *given]
    pg_dir = owned_tempdir("pv-soi-pg-", stop_postgres)
    s3_dir = owned_tempdir("pv-soi-s3-", stop_seaweed)
    server = start_postgres(pg_dir)
    s3 = start_seaweed(s3_dir)
    results: dict[tuple[str, str], list[dict[str, Any]]] = {}
    try:
        for rnd in range(args.rounds):
            for kind in args.workload or list(WORKLOADS):
                order = trees if rnd % 2 == 0 else trees[::-1]
                for label, src in order:
                    db = create_database(server)
                    bucket = create_bucket(s3)
                    storage = {"url": f'"{bucket.url}/pv"', "endpoint": f'"{s3.endpoint}"',
                               "region": f'"{s3.region}"',
                               "credentials_file": f'"{s3.credentials_file}"',
                               "ca_file": f'"{s3.ca_file}"', "path_style": "true"}
                    spec = {"kind": kind, "s3": storage,
                            "pg": {"url": db.url, "password_file": str(server.password_file)}}
                    env = {**os.environ, "PYTHONPATH": os.pathsep.join([src, str(ROOT)])}
                    out = subprocess.run(
                        [sys.executable, "-m", "bench.scaleout_ingest", "--child",
                         json.dumps(spec), "--threads", str(args.threads),
                         "--ct-size", str(args.ct_size)],
                        cwd=ROOT, env=env, capture_output=True, text=True, timeout=900,
                        check=False)
                    if out.returncode != 0:
                        raise RuntimeError(f"{label} {kind} failed:\n{out.stderr[-3000:]}")
                    found = json.loads(out.stdout.strip().splitlines()[-1])
                    results.setdefault((kind, label), []).append(found)
                    print(rnd, kind, label, json.dumps(found), flush=True)
    finally:
        stop_seaweed(s3_dir)
        stop_postgres(pg_dir)
    fields = ("cpu_ms", "sql_per_image", "commits_per_image", "put_ms", "put_cpu_ms",
              "commit_ms", "sql_ms", "images_s")
    print("| workload | tree | " + " | ".join(fields) + " |")
    print("|---|---|" + "---:|" * len(fields))
    for (kind, label), runs in results.items():
        cells = [f"{statistics.median(r[f] for r in runs):.2f}" for f in fields]
        print(f"| {kind} | {label} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
