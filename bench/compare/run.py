"""``python -m bench compare``: pacsvault vs Orthanc on the same machine, in the same run.

Order of a run: generate the dataset (or reuse it), measure the physical limits, then
1. ingest cells (plain/TLS x 1/4 associations): a fresh server of each kind per cell and
   round, alternating which one goes first (A B, then B A) so drift hits both;
2. one "loaded" instance of each, plain DICOM + DICOMweb, holding the dataset:
   C-FIND (findscu) and QIDO-RS latency, WADO-RS series and frames, C-GET of a study,
   every repetition alternating the servers; what comes back is checked against the files;
3. the same loaded instances filled up to the large index (10,000 studies; 200 with
   ``--small``) by really storing one small MR per extra study, and the queries again.
Every embedded pacsvault row runs ``serve --workers`` as ``--pv-workers`` says: the
product's default ``auto`` (one process on the embedded index, ``cli/workers.count``)
unless told otherwise, since that is what a practice runs; the run description names it.
Output: ``OUT/results.json``, ``OUT/results.md`` and the table on stdout.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from pydicom import dcmread

from bench.compare import (
    ceilings,
    dataset,
    limits,
    profile,
    query_ceilings,
    report,
    scaleout,
)
from bench.compare.base import Target
from bench.compare.orthanc import OrthancTarget, ensure_installed
from bench.compare.orthanc import version as orthanc_version
from bench.compare.pacsvault_server import PacsvaultTarget
from bench.compare.procs import dcmtk, free_port, rmtree
from bench.compare.report import SERVERS, Row
from bench.compare.workloads import (
    FRAME_ACCEPT,
    SERIES_ACCEPT,
    cget,
    cmove,
    durability_syscalls,
    findscu,
    http_client,
    ingest,
    qido,
    qido_body,
    wado,
)
from bench.ingest import make_peer_pki
from pacsvault.cli.common import CommandError
from pacsvault.cli.workers import AUTO
from pacsvault.cli.workers import count as worker_count

BENCH = Path(__file__).resolve().parent.parent
MB = 1e6


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def order(i: int) -> tuple[str, ...]:
    """A B, B A, A B ...: neither server always goes first."""
    return SERVERS if i % 2 == 0 else SERVERS[::-1]


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.small: bool = args.small
        self.size = dataset.SIZES["small" if args.small else args.size]
        self.rounds: int = args.rounds or (1 if self.small else 3)
        # the other ingest shapes' ceilings: ~2.5 min a round at full size (12 ceilings, the
        # pynetdicom ones at ~50 MB/s and the filler's 9,569 files), so 2 rounds (both
        # receiver orders) unless told otherwise
        self.shape_rounds: int = args.shape_ceiling_rounds or min(self.rounds, 2)
        self.reps: int = args.reps or (4 if self.small else 20)
        self.out: Path = args.out
        self.work = self.out / "work"
        self.kept = self.out / "data"  # dataset + retrieved copies, with --keep-data
        self.rows: dict[str, Row] = {}
        self.limits: dict[str, float] = {}
        self.ceilings: dict[str, float] = {}
        self.pki = self.work / "orthanc-pki"
        self.info: dict[str, Any] = {}
        # ``serve --workers`` of every embedded pacsvault row, and how many processes that
        # is here (``auto``: the cores, as the product resolves it)
        self.pv_workers: str = args.pv_workers
        self.pv_processes = worker_count(args.pv_workers, shared_index=False)  # embedded

    # --- helpers --------------------------------------------------------------------------

    def row(self, workload: str, metric: str, higher: bool, stat: str = "median",
            limit: str | None = None, informational: bool = False,
            ceiling: str | None = None) -> Row:
        key = f"{workload}|{metric}"
        if key not in self.rows:
            self.rows[key] = Row(workload, metric, higher, stat, limit,
                                 informational=informational, ceiling=ceiling)
        return self.rows[key]

    def check(self, row: Row, server: str, ok: bool, what: str) -> None:
        prev = row.checks.get(server, "")
        if not ok:
            row.checks[server] = f"MISMATCH: {what}"
            log(f"check failed: {server} {row.workload}: {what}")
        elif not prev.startswith("MISMATCH"):
            row.checks[server] = f"ok: {what}"

    def target(self, server: str, root: Path, tls: bool) -> Target:
        if server == "pacsvault":
            template = self.work / "templates" / f"pacsvault-{'tls' if tls else 'plain'}"
            if not (template / "token").exists():
                PacsvaultTarget(template, tls)
            return PacsvaultTarget(root, tls, template, workers=self.pv_workers)
        return OrthancTarget(root, tls, self.pki)

    def profiling(self, server: str, first: bool) -> bool:
        return bool(self.args.profile) and server == "pacsvault" and first

    def prof_path(self, label: str) -> Path:
        return self.out / "profiles" / f"{label}.txt"

    # --- phases ---------------------------------------------------------------------------

    def run(self) -> None:
        ensure_installed()
        for tool in ("storescu", "findscu", "getscu"):
            dcmtk(tool)
        if self.args.profile and not profile.available():
            sys.exit("error: --profile needs py-spy (.venv/bin/pip install py-spy)")
        self.work.mkdir(parents=True, exist_ok=True)
        data_dir = self.args.dataset or (self.kept / "dataset" if self.args.keep_data
                                         else self.work / "dataset")
        t0 = time.perf_counter()
        self.corpus = dataset.generate(data_dir, self.size)
        c = self.corpus
        log(f"dataset {self.size.name}: {len(c.main)} instances, {c.main_bytes / MB:.1f} MB "
            f"(+{len(c.filler)} index filler), {time.perf_counter() - t0:.1f} s")
        log(f"pacsvault: {self.serve_description}")
        self.limits = limits.measure(self.work, self.small)
        log("limits: " + ", ".join(f"{k}={v:.0f}" for k, v in self.limits.items()))
        if not self.args.scale_out_only:
            self.measure_ceilings()
        if not self.args.scale_out_only:
            self.ingest_cells()
            self.loaded_phase()
        if self.args.scale_out:
            scaleout.phase(self)

    def measure_ceilings(self) -> None:
        """Issue 17, part 3: the wire's ceilings, same run, same files and clients as the
        ingest (all files, one association) and C-GET (the CT study) rows; then those of
        every other ingest row's shape (4 associations, TLS, the filler), each row read
        against its own shape's."""
        c = self.corpus
        ct = c.of_kind("CT")
        study, series = ct[0].study, ct[0].series
        t0 = time.perf_counter()
        self.ceilings = ceilings.measure(
            self.work, c.files(c.main), c.files([i for i in ct if i.study == study]), study,
            self.rounds, c.files([i for i in ct if i.series == series]),
            3 if self.small else 5)
        log("wire ceilings (MB/s): " + ", ".join(f"{k}={v:.1f}"
                                                 for k, v in self.ceilings.items())
            + f" in {time.perf_counter() - t0:.1f} s")
        # every other ingest row's shape: 4 associations, TLS 1 and 4, the filler; TLS with
        # the PKI the Orthanc TLS rows use (made here if this comes first)
        if not (self.pki / "ca.crt").exists():
            make_peer_pki(self.pki)
        t0 = time.perf_counter()
        shaped = ceilings.measure_shapes(self.work, c.files(c.main), c.files(c.filler),
                                         self.shape_rounds, self.pki)
        self.ceilings.update(shaped)
        log("wire ceilings of the other ingest shapes (MB/s): "
            + ", ".join(f"{k}={v:.1f}" for k, v in shaped.items())
            + f" in {time.perf_counter() - t0:.1f} s")

    @property
    def ceiling_images(self) -> dict[str, float]:
        """The store ceilings in images/s (the ceiling table's last column)."""
        c = self.corpus
        return ceilings.images_per_s(self.ceilings, {
            "main": (len(c.main), c.main_bytes),
            "filler": (len(c.filler), sum(i.bytes for i in c.filler))})

    def ingest_cells(self) -> None:
        c = self.corpus
        files, nbytes, n = c.files(c.main), c.main_bytes, len(c.main)
        fp_row = self.row("disk footprint (all ingest cells)", "stored / raw bytes", False)
        for r in range(self.rounds):
            for tls in (False, True):
                for nassoc in (1, 4):
                    cell = f"{'TLS' if tls else 'plain'}, {nassoc} assoc."
                    for s in order(r + nassoc):
                        root = self.work / "runs" / f"{s}-{'tls' if tls else 'plain'}-{nassoc}-{r}"
                        t = self.target(s, root, tls)
                        t.start()
                        try:
                            label = f"ingest-{'tls' if tls else 'plain'}-{nassoc}"
                            with profile.record(t.pid, self.prof_path(label),
                                                self.profiling(s, r == 0)):
                                res = ingest(t, files, nassoc, root / "logs")
                        finally:
                            t.stop()
                        _apparent, allocated = t.footprint()
                        self.row(f"ingest {cell}", "images/s", True).samples[s].append(
                            n / res.seconds)
                        self.row(f"ingest {cell}", "MB/s", True,
                                 limit="disk_write_fsync_MBps",
                                 ceiling=ceilings.kind(tls, nassoc)).samples[s].append(
                            nbytes / res.seconds / MB)
                        self.row(f"peak RSS, ingest {cell}", "MB", False).samples[s].append(
                            res.rss_peak / MB)
                        if res.pss_peak:
                            self.pss_row(cell).samples[s].append(res.pss_peak / MB)
                        fp_row.samples[s].append(allocated / nbytes)
                        log(f"round {r} ingest {cell} {s}: {res.seconds:.2f} s, "
                            f"RSS {res.rss_peak / MB:.0f} MB, PSS {res.pss_peak / MB:.0f} MB, "
                            f"disk {allocated / nbytes:.3f}x")
                        rmtree(root)
            self.ingest_workers(r, files, nbytes)

    def pss_row(self, cell: str) -> Row:
        """Beside each peak RSS row: the tree's peak PSS, what it really costs the machine
        (shared pages counted once, not once per process; bench/README.md). A fact for
        reading the RSS row, not the issue's target."""
        return self.row(f"peak PSS, ingest {cell}", "MB", False, informational=True)

    @property
    def serve_description(self) -> str:
        n = self.pv_processes
        return (f"serve --workers {self.pv_workers} ({n} worker process{'es' if n > 1 else ''}"
                f" on {os.cpu_count()} cores)")

    def ingest_workers(self, r: int, files: list[Path], nbytes: int) -> None:
        """The same-run contrast of the rows' worker count (issue 16 part 4, issue 17):
        plain DICOM, 4 associations, with ``serve --workers 2`` when the rows run one
        process, else with ``--workers 1``; beside the row of the same cell above."""
        other = 2 if self.pv_processes == 1 else 1
        cell = f"plain, 4 assoc., serve --workers {other}"
        root = self.work / "runs" / f"pacsvault-workers{other}-{r}"
        template = self.work / "templates" / "pacsvault-plain"
        if not (template / "token").exists():
            PacsvaultTarget(template, False)
        t = PacsvaultTarget(root, False, template, workers=other)
        t.start()
        try:
            res = ingest(t, files, 4, root / "logs")
        finally:
            t.stop()
        rows = (self.row(f"ingest {cell}", "images/s", True),
                self.row(f"ingest {cell}", "MB/s", True, limit="disk_write_fsync_MBps",
                         ceiling=ceilings.kind(False, 4)),
                self.row(f"peak RSS, ingest {cell}", "MB", False))
        for row, value in zip(rows, (len(files) / res.seconds, nbytes / res.seconds / MB,
                                     res.rss_peak / MB), strict=True):
            row.samples["pacsvault"].append(value)
        pss, peer_pss = self.pss_row(cell), self.pss_row("plain, 4 assoc.")
        if res.pss_peak:
            pss.samples["pacsvault"].append(res.pss_peak / MB)
            if peer_pss.samples["orthanc"]:
                pss.samples["orthanc"].append(peer_pss.samples["orthanc"][-1])
        # Orthanc's figure is its own run of the same workload (plain, 4 associations) in
        # this round: the ratio says how the workers compare with the peer, like every row
        base = "plain, 4 assoc."
        for row, peer in zip(rows, (self.row(f"ingest {base}", "images/s", True),
                                    self.row(f"ingest {base}", "MB/s", True),
                                    self.row(f"peak RSS, ingest {base}", "MB", False)),
                             strict=True):
            if peer.samples["orthanc"]:
                row.samples["orthanc"].append(peer.samples["orthanc"][-1])
        log(f"round {r} ingest {cell}: {res.seconds:.2f} s, RSS {res.rss_peak / MB:.0f} MB, "
            f"PSS {res.pss_peak / MB:.0f} MB")
        rmtree(root)

    def loaded_phase(self) -> None:
        c = self.corpus
        targets = {s: self.target(s, self.work / "loaded" / s, False) for s in SERVERS}
        self.move_ports = {s: free_port() for s in SERVERS}  # (``workloads.cmove``)
        try:
            for s, t in targets.items():
                t.allow_move(self.move_ports[s])
                t.start()
            probe = c.of_kind("CT")[:50]
            sync_row = self.row(f"fsync-like calls per stored image (strace, {len(probe)} CT)",
                                "calls/image", False, informational=True)
            for s in SERVERS:
                logs = self.work / "loaded" / f"{s}-logs"
                calls = durability_syscalls(targets[s], c.files(probe), logs / "strace")
                if calls is not None:
                    sync_row.samples[s].append(sum(calls.values()) / len(probe))
                    log(f"{s}: durability calls while storing {len(probe)} images: {calls}")
                rest = [i for i in c.main if i not in probe]
                res = ingest(targets[s], c.files(rest), 4, logs)
                log(f"loaded {s}: {res.seconds:.1f} s")
            clients = {s: http_client(targets[s]) for s in SERVERS}
            loaded_label = f"{len(c.studies(c.main))} studies"
            self.queries(targets, clients, c.main, loaded_label, "query-loaded")
            self.retrieval(targets, clients)
            fill_row = self.row("ingest index filler (64x64 MR), 4 assoc.", "images/s", True,
                                ceiling="store_fill4")
            if c.filler:
                # its ceilings are MB/s of the same files: images per MB
                fill_row.per_mb = len(c.filler) / (sum(i.bytes for i in c.filler) / MB)
                for s in order(1):
                    with profile.record(targets[s].pid, self.prof_path("ingest-filler"),
                                        self.profiling(s, True)):
                        res = ingest(targets[s], c.files(c.filler), 4,
                                     self.work / "loaded" / f"{s}-fill-logs")
                    fill_row.samples[s].append(len(c.filler) / res.seconds)
                    log(f"filled {s}: {len(c.filler)} in {res.seconds:.1f} s")
            all_items = c.main + c.filler
            self.queries(targets, clients, all_items, f"{len(c.studies(all_items))} studies",
                         "query-large")
            for cl in clients.values():
                cl.close()
        finally:
            for t in targets.values():
                t.stop()

    def queries(self, targets: dict[str, Target], clients: dict[str, Any],
                items: list[dataset.Item], label: str, prof: str) -> None:
        c = self.corpus
        warm = 2
        archive = query_ceilings.DcmtkArchive(self.work / "query-ceilings" / f"{prof}-dcmqrscp",
                                              c.files(items))
        fits = len(c.studies(items)) < archive.MAX_STUDIES
        with archive if fits else contextlib.nullcontext(archive):
            for fname, filt in c.filters().items():
                self.query_set(targets, clients, items, label, prof, warm, archive, fname,
                               filt)

    def query_set(self, targets: dict[str, Target], clients: dict[str, Any],
                  items: list[dataset.Item], label: str, prof: str, warm: int,
                  archive: query_ceilings.DcmtkArchive, fname: str,
                  filt: dict[str, str]) -> None:
        c = self.corpus
        expected = c.expected_matches(items, name="PatientName" in filt,
                                      week="StudyDate" in filt)
        rows = {
            kind: (self.row(f"{kind} {fname}, {label}", "p50 ms", False, "p50"),
                   self.row(f"{kind} {fname}, {label}", "p95 ms", False, "p95"))
            for kind in ("C-FIND (findscu)", "QIDO-RS /studies")
        }
        prof_file = self.prof_path(f"{prof}-{fname}".replace(" ", "-"))
        with profile.record(targets["pacsvault"].pid, prof_file, bool(self.args.profile)):
            self.query_reps(targets, clients, filt, expected, rows, warm)
        self.query_ceilings(targets, clients, filt, rows, warm,
                            f"{prof}-{fname}".replace(" ", "-"), archive)
        log(f"queries {fname} ({label}) done, expected {expected} matches")

    def query_ceilings(self, targets: dict[str, Target], clients: dict[str, Any],
                       filt: dict[str, str], rows: dict[str, tuple[Row, Row]], warm: int,
                       name: str, archive: query_ceilings.DcmtkArchive) -> None:
        """The rows' own ceilings: pacsvault's answers (its last findscu output, its QIDO-RS
        body) sent from memory by bare stacks to the same clients (``query_ceilings``)."""
        body = qido_body(clients["pacsvault"], targets["pacsvault"], filt)
        got = query_ceilings.measure(self.work / "query-ceilings" / name,
                                     self.work / "findscu" / "pacsvault", body, filt,
                                     self.reps, warm, archive)
        for kind, keys in (("C-FIND (findscu)", query_ceilings.FIND),
                           ("QIDO-RS /studies", query_ceilings.QIDO)):
            for row in rows[kind]:
                row.wire = {k: got[k] for k in keys if k in got}

    def query_reps(self, targets: dict[str, Target], clients: dict[str, Any],
                   filt: dict[str, str], expected: int, rows: dict[str, tuple[Row, Row]],
                   warm: int) -> None:
            for rep in range(warm + self.reps):
                for s in order(rep):
                    t = targets[s]
                    secs, got = findscu(t, filt, self.work / "findscu" / s)
                    qsecs, qgot = qido(clients[s], t, filt)
                    if rep < warm:
                        continue
                    for kind, (sec, n) in (("C-FIND (findscu)", (secs, got)),
                                           ("QIDO-RS /studies", (qsecs, qgot))):
                        p50, p95 = rows[kind]
                        p50.samples[s].append(sec * 1000)
                        p95.samples[s].append(sec * 1000)
                        what = f"{n} matches, expected {expected}"
                        self.check(p50, s, n == expected, what)
                        self.check(p95, s, n == expected, what)

    def keep_dir(self, server: str, what: str) -> Path | None:
        if not self.args.keep_data:
            return None
        d: Path = self.kept / "retrieved" / server / what
        rmtree(d)
        d.mkdir(parents=True)
        return d

    def retrieval(self, targets: dict[str, Target], clients: dict[str, Any]) -> None:
        c = self.corpus
        ct = c.of_kind("CT")
        study, series = ct[0].study, ct[0].series
        in_series = {i.sop: i for i in ct if i.series == series}
        series_mb = sum(i.bytes for i in in_series.values()) / MB
        n_series = max(self.rounds, 3 if self.small else 5)
        wrow = self.row(f"WADO-RS series ({len(in_series)} CT, {series_mb:.0f} MB)", "MB/s",
                        True, limit="loopback_tcp_MBps", ceiling="web")
        wp95 = self.row(wrow.workload, "p95 s", False, "p95")
        for rep in range(n_series):
            for s in order(rep):
                keep = rep == 0
                with profile.record(targets[s].pid, self.prof_path("wado-series"),
                                    self.profiling(s, rep == 0)):
                    res = wado(clients[s], targets[s], f"studies/{study}/series/{series}",
                               SERIES_ACCEPT, keep)
                wrow.samples[s].append(res.nbytes / res.seconds / MB)
                wp95.samples[s].append(res.seconds)
                if keep:
                    ok, what = self.same_instances(res.parts, in_series, self.keep_dir(s, "wado"))
                    self.check(wrow, s, ok, what)
        log("WADO-RS series done")
        for kind, items in (("CT 512x512", ct), ("CR 2048x2500", c.of_kind("CR"))):
            sample = items[:: max(1, len(items) // (8 if self.small else 20))][:20]
            frow = self.row(f"WADO-RS single frame ({kind})", "MB/s", True,
                            limit="loopback_tcp_MBps")
            fp95 = self.row(frow.workload, "p95 ms", False, "p95")
            kept = {s: self.keep_dir(s, f"frames-{kind.split()[0]}") for s in SERVERS}
            rounds = 2 if len(sample) < 8 else 1
            for rep, it in enumerate(sample * rounds):
                for s in order(rep):
                    path = f"studies/{it.study}/series/{it.series}/instances/{it.sop}/frames/1"
                    with profile.record(targets[s].pid, self.prof_path(f"wado-frame-{kind[:2]}"),
                                        self.profiling(s, rep == 0)):
                        res = wado(clients[s], targets[s], path, FRAME_ACCEPT, True)
                    frow.samples[s].append(res.nbytes / res.seconds / MB)
                    fp95.samples[s].append(res.seconds * 1000)
                    want = dcmread(c.root / it.path).PixelData
                    ok = len(res.parts) == 1 and res.parts[0] == want
                    self.check(frow, s, ok, "frame bytes equal the file's pixel data")
                    if (d := kept[s]) is not None:
                        (d / f"{it.sop}.raw").write_bytes(res.parts[0] if res.parts else b"")
        log("WADO-RS frames done")
        study_items = {i.sop: i for i in ct}
        study_mb = sum(i.bytes for i in ct) / MB
        grow = self.row(f"C-GET study (getscu, {len(ct)} CT, {study_mb:.0f} MB)", "MB/s", True,
                        limit="loopback_tcp_MBps", ceiling="get")
        for rep in range(n_series):
            for s in order(rep):
                d = self.work / "cget" / s
                with profile.record(targets[s].pid, self.prof_path("cget"),
                                    self.profiling(s, rep == 0)):
                    res = cget(targets[s], study, d)
                grow.samples[s].append(res.nbytes / res.seconds / MB)
                if rep == 0:
                    parts = [p.read_bytes() for p in sorted(d.iterdir())]
                    ok, what = self.same_instances(parts, study_items, self.keep_dir(s, "cget"))
                    self.check(grow, s, ok, what)
        log("C-GET done")
        mrow = self.row(f"C-MOVE study (movescu to a storescp, {len(ct)} CT, "
                        f"{study_mb:.0f} MB)", "MB/s", True, limit="loopback_tcp_MBps",
                        ceiling="move")
        for rep in range(n_series):
            for s in order(rep):
                d = self.work / "cmove" / s
                with profile.record(targets[s].pid, self.prof_path("cmove"),
                                    self.profiling(s, rep == 0)):
                    res = cmove(targets[s], study, d, self.move_ports[s])
                mrow.samples[s].append(res.nbytes / res.seconds / MB)
                if rep == 0:
                    parts = [p.read_bytes() for p in sorted(d.iterdir())]
                    ok, what = self.same_instances(parts, study_items,
                                                   self.keep_dir(s, "cmove"))
                    self.check(mrow, s, ok, what)
        log("C-MOVE done")

    def same_instances(self, parts: list[bytes], want: dict[str, dataset.Item],
                       keep: Path | None) -> tuple[bool, str]:
        """Every expected instance came back once, with the pixel data that was sent."""
        import io

        seen: dict[str, bool] = {}
        for raw in parts:
            ds = dcmread(io.BytesIO(raw))
            sop = str(ds.SOPInstanceUID)
            item = want.get(sop)
            seen[sop] = item is not None and bytes(ds.PixelData) == dcmread(
                self.corpus.root / item.path).PixelData
            if keep is not None:
                (keep / f"{sop}.dcm").write_bytes(raw)
        ok = set(seen) == set(want) and all(seen.values()) and len(parts) == len(want)
        return ok, f"{sum(seen.values())}/{len(want)} instances identical ({len(parts)} received)"

    # --- output ---------------------------------------------------------------------------

    def machine(self) -> dict[str, Any]:
        def cmd(*a: str) -> str:
            p = subprocess.run(list(a), capture_output=True, text=True, check=False)
            return (p.stdout or p.stderr).strip()

        import cryptography
        import pydicom
        import pynetdicom

        import pacsvault

        lscpu = {k.strip(): v.strip() for k, _, v in
                 (ln.partition(":") for ln in cmd("lscpu").splitlines())}
        return {
            "cpu": lscpu.get("Model name", platform.processor()),
            "cpus": lscpu.get("CPU(s)", ""),
            "memory": cmd("sh", "-c", "free -g | awk '/Mem:/{print $2\" GiB\"}'"),
            "disk": cmd("sh", "-c", f"df -hT {self.out} | tail -1"),
            "kernel": platform.release(),
            "python": platform.python_version(),
            "orthanc": orthanc_version() + " + " + cmd(
                "sh", "-c", "dpkg-query -W -f '${Package} ${Version}' orthanc-dicomweb"),
            "dcmtk": cmd(dcmtk("storescu"), "--version").splitlines()[0],
            "pacsvault": cmd("git", "-C", str(BENCH.parent), "describe", "--always", "--dirty")
            + f" (imported from {Path(pacsvault.__file__).parent.parent})",
            "pydicom": pydicom.__version__, "pynetdicom": pynetdicom.__version__,
            "cryptography": cryptography.__version__,
        }

    def write(self) -> str:
        rows = list(self.rows.values())
        c = self.corpus
        table = report.markdown(rows, self.limits, self.ceilings)
        mach = self.machine()
        ds = (f"{len(c.main)} instances, {c.main_bytes / MB:.0f} MB: "
              f"{len(c.of_kind('CT'))} CT 512x512, {len(c.of_kind('CR'))} CR 2048x2500, "
              f"{len(c.of_kind('MR'))} MR 64x64 in {self.size.mr_studies} studies; "
              f"{len(c.studies(c.main))} studies loaded, "
              f"{len(c.studies(c.main + c.filler))} in the large index")
        md = "\n".join([
            f"# pacsvault vs Orthanc ({dt.datetime.now(dt.UTC):%Y-%m-%d %H:%M} UTC, "
            f"size {self.size.name})", "",
            f"Dataset: {ds}. Rounds: {self.rounds} (wire ceilings of the other ingest "
            f"shapes: {self.shape_rounds}); query repetitions: {self.reps}. "
            f"Embedded pacsvault rows: `{self.serve_description}`.", "",
            table, "", scaleout.targets_markdown(rows, self.args.scale_out), "",
            report.limits_markdown(self.limits), "",
            *([ceilings.markdown(self.ceilings, self.ceiling_images), ""]
              if self.ceilings else []),
            "Machine: " + "; ".join(f"{k}: {v}" for k, v in mach.items()), ""])
        (self.out / "results.md").write_text(md)
        (self.out / "results.json").write_text(json.dumps({
            "size": self.size.name, "rounds": self.rounds, "reps": self.reps,
            "shape_ceiling_rounds": self.shape_rounds,
            "pv_workers": {"option": self.pv_workers, "processes": self.pv_processes},
            "dataset": {"instances": len(c.main), "bytes": c.main_bytes,
                        "filler": len(c.filler), "description": ds},
            "limits": self.limits, "ceilings": self.ceilings,
            "ceilings_images_per_s": self.ceiling_images,
            "ceiling_shapes": {k: ceilings.shape_label(k) for k in self.ceilings},
            "machine": mach,
            "rows": [r.to_json(self.limits, self.ceilings) for r in rows]}, indent=1))
        return table


def pv_workers(value: str) -> str:
    """``--pv-workers``: ``auto`` or a positive number, checked as ``serve`` checks it."""
    try:
        worker_count(value)
    except CommandError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return value


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench compare",
                                 description=__doc__.splitlines()[0])
    ap.add_argument("--small", action="store_true", help="CI size: a few MB, seconds per workload")
    ap.add_argument("--size", choices=sorted(dataset.SIZES), default="full",
                    help="dataset size (default full, ~1 GB)")
    ap.add_argument("--out", type=Path, help="output dir (default bench/out/<timestamp>)")
    ap.add_argument("--rounds", type=int, help="ingest/retrieval rounds (default 3, small 1)")
    ap.add_argument("--reps", type=int, help="timed repetitions per query (default 20, small 4)")
    ap.add_argument("--shape-ceiling-rounds", type=int, metavar="N",
                    help="rounds of the wire ceilings of the 4-association, TLS and filler "
                         "ingest shapes (default: --rounds, at most 2)")
    ap.add_argument("--dataset", type=Path, help="dataset dir to reuse (generated if missing)")
    ap.add_argument("--keep-data", action="store_true",
                    help="keep the dataset and the retrieved copies under OUT/data")
    ap.add_argument("--keep-work", action="store_true", help="keep OUT/work (servers' dirs)")
    ap.add_argument("--profile", action="store_true",
                    help="py-spy pacsvault during the first round of each workload")
    ap.add_argument("--pv-workers", type=pv_workers, default=AUTO, metavar="N|auto",
                    help="serve --workers of every embedded pacsvault row (default auto, "
                         "the product's default: one process on the embedded index)")
    ap.add_argument("--scale-out", choices=scaleout.SHAPES,
                    help="also pacsvault on PostgreSQL + SeaweedFS (scripts/postgres.sh, "
                         "scripts/seaweed.sh): 2 instances (instances add) or serve "
                         "--workers 2; its own column (issue 16)")
    ap.add_argument("--scale-out-only", action="store_true",
                    help="with --scale-out: skip the embedded pacsvault and Orthanc rows")
    args = ap.parse_args(argv)
    if args.scale_out_only and not args.scale_out:
        ap.error("--scale-out-only needs --scale-out")
    args.out = (args.out or BENCH / "out" / time.strftime("%Y%m%d-%H%M%S")).resolve()
    args.out.mkdir(parents=True, exist_ok=True)
    bench = Bench(args)
    ok = False
    try:
        bench.run()
        ok = True
    finally:
        if bench.rows and hasattr(bench, "corpus"):
            table = bench.write()
            print(table)
            print(f"\nresults: {args.out}/results.md, results.json", file=sys.stderr)
        if ok and not args.keep_work:
            shutil.rmtree(bench.work, ignore_errors=True)
        elif not ok:
            print(f"work dir kept for inspection: {bench.work}", file=sys.stderr)
    return 0



