"""The scale-out deployment under test (issue 16): pacsvault on PostgreSQL + SeaweedFS S3.

Shapes (``--scale-out``): ``instances`` = two data directories of one vault (``pacsvault
instances add``), each its own ``serve``, one sealed PostgreSQL index and one bucket;
``workers`` = one ``serve --workers 2`` on the same backends. PostgreSQL and SeaweedFS are
the real components, started and stopped only through ``scripts/postgres.sh`` and
``scripts/seaweed.sh`` (via ``tests/harness``), on 127.0.0.1, TLS verified, secrets in
0600 files (never on argv).

Ingest spreads the associations over the instances (association k to instance k mod 2,
as a DICOM load balancer would); queries and retrievals go to the first instance.
Large indexes (10,000 and 100,000 studies) are loaded by :mod:`bench.compare.sealed_load`
(the sealed row writers and blind tokens, no files), with the servers stopped.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from itertools import zip_longest
from pathlib import Path
from typing import Any

from tests.harness.components import owned_tempdir
from tests.harness.postgres import (
    PostgresServer,
    create_database,
    start_postgres,
    stop_postgres,
)
from tests.harness.seaweed import S3Bucket, S3Server, create_bucket, start_seaweed, stop_seaweed

from bench.compare.base import SCU_AE
from bench.compare.pacsvault_server import PacsvaultTarget, pv
from bench.compare.procs import Service, wait_port
from bench.ingest import push

SHAPES = ("instances", "workers")
NAME = "scale-out"
PAGE = 101  # a QIDO-RS first page, as OHIF asks for it


class Components:
    """One PostgreSQL cluster and one SeaweedFS endpoint for the whole scale-out phase."""

    def __init__(self) -> None:
        self.pg_dir = owned_tempdir("pacsvault-bench-pg-", stop_postgres)
        self.s3_dir = owned_tempdir("pacsvault-bench-s3-", stop_seaweed)
        self.pg: PostgresServer | None = None
        self.s3: S3Server | None = None

    def __enter__(self) -> Components:
        try:
            self.pg = start_postgres(self.pg_dir)
            self.s3 = start_seaweed(self.s3_dir)
            self.bucket: S3Bucket = create_bucket(self.s3, "pv-bench")
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        import shutil

        if self.pg is not None:
            stop_postgres(self.pg_dir)
        if self.s3 is not None:
            stop_seaweed(self.s3_dir)
        shutil.rmtree(self.pg_dir, ignore_errors=True)
        shutil.rmtree(self.s3_dir, ignore_errors=True)


class ScaleOutTarget(PacsvaultTarget):
    """A fresh vault on a new database and a new bucket prefix; two serve processes
    (``instances``) or one with two workers (``workers``). Plain DICOM only."""

    name = NAME

    def __init__(self, root: Path, comp: Components, shape: str) -> None:
        assert comp.pg is not None and comp.s3 is not None
        if shape not in SHAPES:
            raise ValueError(f"unknown scale-out shape {shape!r}")
        self.shape = shape
        root.mkdir(parents=True, exist_ok=True)
        self.root, self.tls = root, False
        self.service = None
        self.services: list[Service] = []
        self.dicom_ports: list[int] = []
        self.dicom_port = self.https_port = 0
        self.data, self.key = root / "data", root / "keys" / "master.key"
        self.token = ""
        pg, s3 = comp.pg, comp.s3
        db = create_database(pg, "pv_bench")
        self.db_url = db.url
        common = ("--data", self.data, "--key-file", self.key)
        pv("init", *common, "--ae-title", self.called_ae, "--admin", "admin",
           "--index-url", db.url, "--index-password-file", pg.password_file,
           "--storage-url", f"{comp.bucket.url}/{root.name}", "--storage-endpoint",
           s3.endpoint, "--storage-region", s3.region, "--storage-credentials-file",
           s3.credentials_file, "--storage-ca-file", s3.ca_file, "--storage-path-style")
        pv("node", "add", SCU_AE, "--host", "127.0.0.1", "--roles", "store,query,retrieve",
           *common)
        self.data_dirs = [self.data]
        if shape == "instances":
            b = root / "b" / "data"
            pv("instances", "add", "b", "--to", b, "--host", "127.0.0.1", *common)
            self.data_dirs.append(b)
        self._make_token()

    def start(self) -> None:
        tmp = self.root / "tmp"
        tmp.mkdir(exist_ok=True)
        extra = ["--workers", "2" if self.shape == "workers" else "1"]  # default: cores
        self.services, self.dicom_ports = [], []
        for i, data in enumerate(self.data_dirs):
            (data / "serve.json").unlink(missing_ok=True)
            self.services.append(Service(
                [sys.executable, "-m", "pacsvault", "serve", "--data", str(data),
                 "--key-file", str(self.key), "--bind", "127.0.0.1", "--dicom-port", "0",
                 "--dicom-tls-port", "0", "--https-port", "0", *extra],
                self.root / f"serve-{i}.log", env={**os.environ, "TMPDIR": str(tmp)}))
        for i, (data, svc) in enumerate(zip(self.data_dirs, self.services, strict=True)):
            deadline = time.monotonic() + 120
            while True:
                try:
                    ports = json.loads((data / "serve.json").read_text())
                    break
                except (FileNotFoundError, json.JSONDecodeError) as exc:
                    if svc.proc.poll() is not None or time.monotonic() > deadline:
                        self.stop()
                        raise RuntimeError(f"serve did not start; log {svc.log}") from exc
                    time.sleep(0.05)
            self.dicom_ports.append(int(ports["dicom_port"]))
            wait_port(self.dicom_ports[-1], svc.proc, svc.log)
            if i == 0:
                self.https_port = int(ports["https_port"])
        self.dicom_port = self.dicom_ports[0]
        self.service = self.services[0]

    def quiet_scrub(self) -> None:
        """The loaded deployment's index gets rows whose objects were never written
        (:mod:`bench.compare.sealed_load`): a year between scrubs keeps serve's scrub
        slices from reading (and alerting on) them while queries are timed."""
        for data in self.data_dirs:
            path = data / "pacsvault.toml"
            text = path.read_text()
            if "\nscrub_every_hours = 24.0\n" not in text:
                raise RuntimeError(f"no scrub_every_hours line in {path}")
            path.write_text(text.replace("\nscrub_every_hours = 24.0\n",
                                         "\nscrub_every_hours = 8760.0\n"))

    def stop(self) -> None:
        for svc in self.services:
            svc.stop()
        self.services = []
        self.service = None


def ingest(target: ScaleOutTarget, files: list[Path], nassoc: int, logs: Path) -> float:
    """``nassoc`` storescu associations, association k to instance k mod n (a balancer's
    round robin; with one instance all go to it); wall seconds to the last exit."""
    logs.mkdir(parents=True, exist_ok=True)
    ports = target.dicom_ports
    groups: list[tuple[int, list[Path], int]] = []
    for i, port in enumerate(ports[:nassoc]):
        assocs = list(range(i, nassoc, len(ports)))
        # interleaved: push() hands association j every len(assocs)-th file of this list
        mine = [f for row in zip_longest(*(files[k::nassoc] for k in assocs))
                for f in row if f is not None]
        groups.append((port, mine, len(assocs)))
    errors: list[BaseException] = []

    def run(port: int, mine: list[Path], n: int, sub: Path) -> None:
        try:
            sub.mkdir(parents=True, exist_ok=True)
            push(port, target.called_ae, mine, n, [], sub)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(p, m, n, logs / f"instance-{i}"))
               for i, (p, m, n) in enumerate(groups)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - start
    if errors:
        raise RuntimeError(f"scale-out ingest failed: {errors[0]!r}")
    return elapsed


def large_sizes(index_studies: int) -> tuple[int, ...]:
    """Index sizes of the scale-out query rows: the embedded rows' large index (10,000
    studies; 200 with ``--small``), beside them, and ten times that (100,000)."""
    return (index_studies, 10 * index_studies)


def phase(bench: Any) -> None:
    """Every scale-out row, into ``bench``'s rows under the ``scale-out`` column: ingest
    (plain, 1 and 4 associations, fresh deployment per cell and round), then one loaded
    deployment: the dataset, C-FIND/QIDO-RS, WADO-RS series, then the index loaded to each
    of :func:`large_sizes` and the queries again, with encrypted vs plaintext matching."""
    from bench.compare import sealed_load
    from bench.compare.run import log
    from bench.compare.workloads import http_client

    c, shape, work = bench.corpus, bench.args.scale_out, bench.work / "scale-out"
    files, n = c.files(c.main), len(c.main)
    bench.info["scale_out_shape"] = shape
    with Components() as comp:
        log(f"scale-out ({shape}): PostgreSQL and SeaweedFS started")
        for r in range(bench.rounds):
            for nassoc in (1, 4):
                cell = f"plain, {nassoc} assoc."
                root = work / f"ingest-{nassoc}-{r}"
                t = ScaleOutTarget(root, comp, shape)
                t.start()
                try:
                    secs = ingest(t, files, nassoc, root / "logs")
                finally:
                    t.stop()
                bench.row(f"ingest {cell}", "images/s", True).samples[NAME].append(n / secs)
                bench.row(f"ingest {cell}", "MB/s", True, limit="disk_write_fsync_MBps"
                          ).samples[NAME].append(c.main_bytes / secs / 1e6)
                log(f"round {r} ingest {cell} scale-out: {secs:.2f} s")
        t = ScaleOutTarget(work / "loaded", comp, shape)
        t.quiet_scrub()
        t.start()
        try:
            secs = ingest(t, files, 4, work / "loaded-logs")
            log(f"loaded scale-out: {secs:.1f} s")
            client = http_client(t)
            try:
                queries(bench, t, client, c.main, f"{len(c.studies(c.main))} studies")
                wado_series(bench, t, client)
            finally:
                client.close()
        finally:
            t.stop()
        have: list[Any] = list(c.main)
        for size in large_sizes(bench.size.index_studies):
            items = sealed_load.extra_items(c, size)[len(have) - len(c.main):]
            vault, engine = sealed_load.engine_of(t.data, t.key)
            try:
                secs = sealed_load.load(engine, c, items, log)
                have += items
                label = f"{len(c.studies(have))} studies"
                bench.row(f"load sealed index to {label} (row writers + tokens, no files)",
                          "s", False, informational=True).samples[NAME].append(secs)
                sealed_load.write_baseline(engine)
                cost = sealed_load.matching_cost(engine, c.filters(), bench.reps)
            finally:
                vault.close()
            for fname, res in cost.items():
                w = f"in-process first page {fname}, {label}"
                for kind in ("sealed", "plain"):
                    ms = res[f"{kind}_ms"]
                    assert isinstance(ms, list)
                    what = "encrypted index (PostgreSQL)" if kind == "sealed" else \
                        "plaintext baseline table (same DB)"
                    bench.row(w, f"p50 ms, {what}", False, "p50", informational=True
                              ).samples[NAME].extend(ms)
                    bench.row(w, f"p95 ms, {what}", False, "p95", informational=True
                              ).samples[NAME].extend(ms)
                ok = res["sealed_n"] == res["plain_n"]
                bench.check(bench.row(w, "p95 ms, encrypted index (PostgreSQL)", False,
                                      "p95", informational=True), NAME, ok,
                            f"{res['sealed_n']} answers, plaintext {res['plain_n']}")
            t.start()
            client = http_client(t)
            try:
                queries(bench, t, client, have, label, first_page=True)
            finally:
                client.close()
                t.stop()
        log("scale-out done")


def queries(bench: Any, t: ScaleOutTarget, client: Any, items: list[Any], label: str,
            first_page: bool = False) -> None:
    """C-FIND (findscu) and QIDO-RS, the embedded rows' filters, workload names and
    checks, so that the scale-out column sits beside theirs; ``first_page`` adds QIDO-RS
    with ``limit=101`` (how OHIF pages a study list: what the 100 ms target is about when
    a filter matches hundreds of studies)."""
    from bench.compare.run import log
    from bench.compare.workloads import findscu, qido

    c, warm = bench.corpus, 2
    for fname, filt in c.filters().items():
        expected = c.expected_matches(items, name="PatientName" in filt,
                                      week="StudyDate" in filt)
        for rep in range(warm + bench.reps):
            found = {"C-FIND (findscu)": findscu(t, filt, bench.work / "findscu" / NAME),
                     "QIDO-RS /studies": qido(client, t, filt)}
            if first_page:
                found[f"QIDO-RS /studies?limit={PAGE}"] = qido(
                    client, t, {**filt, "limit": str(PAGE)})
            if rep < warm:
                continue
            for kind, (sec, n) in found.items():
                want = min(expected, PAGE) if "limit" in kind else expected
                for metric, stat in (("p50 ms", "p50"), ("p95 ms", "p95")):
                    row = bench.row(f"{kind} {fname}, {label}", metric, False, stat)
                    row.samples[NAME].append(sec * 1000)
                    bench.check(row, NAME, n == want, f"{n} matches, expected {want}")
        log(f"scale-out queries {fname} ({label}) done, expected {expected} matches")


def wado_series(bench: Any, t: ScaleOutTarget, client: Any) -> None:
    """WADO-RS of the CT series from the bucket, checked once against the files."""
    from bench.compare.workloads import SERIES_ACCEPT, wado

    ct = bench.corpus.of_kind("CT")
    study, series = ct[0].study, ct[0].series
    in_series = {i.sop: i for i in ct if i.series == series}
    series_mb = sum(i.bytes for i in in_series.values()) / 1e6
    wrow = bench.row(f"WADO-RS series ({len(in_series)} CT, {series_mb:.0f} MB)", "MB/s",
                     True, limit="loopback_tcp_MBps")
    wp95 = bench.row(wrow.workload, "p95 s", False, "p95")
    for rep in range(max(bench.rounds, 3 if bench.small else 5)):
        res = wado(client, t, f"studies/{study}/series/{series}", SERIES_ACCEPT, rep == 0)
        wrow.samples[NAME].append(res.nbytes / res.seconds / 1e6)
        wp95.samples[NAME].append(res.seconds)
        if rep == 0:
            ok, what = bench.same_instances(res.parts, in_series, None)
            bench.check(wrow, NAME, ok, what)


def targets_markdown(rows: list[Any], shape: str | None) -> str:
    """Issue 16's targets against this run's scale-out rows ('' without them)."""
    if not any(r.samples[NAME] for r in rows):
        return ""
    by = {(r.workload, r.metric): r for r in rows}
    lines = [f"Scale-out targets (issue 16; shape: {shape}, PostgreSQL + SeaweedFS on this "
             "machine):", ""]
    ing = by.get(("ingest plain, 4 assoc.", "images/s"))
    if ing is not None:
        so, orth = ing.value(NAME), ing.value("orthanc")
        verdict = "not measured (no Orthanc row)" if so is None or orth is None else \
            f"{so:.1f} vs {orth:.1f} images/s: {'met' if so >= orth else '**not met**'}"
        lines.append(f"- ingest, 4 associations, scale-out >= Orthanc: {verdict}")
    size = max((int(r.workload.rsplit(", ", 1)[1].split()[0]) for r in rows
                if r.workload.startswith("QIDO-RS") and r.samples[NAME]), default=0)
    for r in rows:
        if r.workload.startswith("QIDO-RS") and r.workload.endswith(f", {size} studies") \
                and r.metric == "p95 ms" and (v := r.value(NAME)) is not None:
            met = "met" if v < 100 else "**not met**"
            lines.append(f"- {r.workload}: p95 {v:.1f} ms < 100 ms: {met}"
                         + ("" if size >= 100_000 else " (target is at 100,000 studies)"))
    return "\n".join(lines)
