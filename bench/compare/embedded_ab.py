"""Issue 17: embedded ingest (SQLCipher index, local objects) vs Orthanc, same run, by
``serve --workers`` count and source tree.

Why: ``bench compare`` takes ~15 min and its rows move 2x with this shared machine's
load; deciding whether a worker count or a change helps needs the same cells alternated
with Orthanc in one short run. Each round runs every variant (``--variant
NAME=WORKERS[@SRC]``: ``serve --workers WORKERS``, ``SRC`` first on ``PYTHONPATH``) and
Orthanc on each cell, in alternating order, a fresh server each time; per cell and
variant it reports images/s as a ratio to Orthanc's in the same round, the server's CPU
per image (the whole process tree: serve and its workers), the peak RSS and the peak PSS
of that tree (every 50 ms, as ``bench compare``; PSS counts the pages the processes
share once: bench/README.md), how the CPU split over the processes, and the 1-minute
load average when the cell started.

``--ceilings`` adds the wire ceilings of each plain cell's own shape to every round
(``compare.ceilings``: dcmtk ``storescp --ignore --fork`` and the bare pynetdicom receiver
at 16 KB and unlimited PDUs, fed by the same ``storescu`` clients) and reports each
pacsvault variant as a share of them: "Done when" of issue 17 reads a row against those.

Cells (``--cells``): ``plain1``/``plain4``/``tls1``/``tls4`` = the CT slices and small MR
studies of ``bench compare``'s dataset over 1 or 4 ``storescu`` associations; ``fill4``
= one-instance MR 64x64 studies (the "index filler": a new study each, a new patient for
about a quarter) over 4 associations. Each cell first stores ``nassoc`` untimed images
(one per association: every server, Orthanc too, pays its first-association costs there).

    python -m bench.compare.embedded_ab --out /tmp/eab --rounds 3 \
        --variant w1=1 --variant w2=2 --cells plain1,plain4,fill4
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import psutil

from bench.compare import ceilings, dataset
from bench.compare.base import Target
from bench.compare.orthanc import OrthancTarget, ensure_installed
from bench.compare.pacsvault_server import PacsvaultTarget
from bench.compare.procs import RssSampler, free_port
from bench.compare.query_ceilings import Bare
from bench.ingest import push

ROOT = Path(__file__).resolve().parents[2]
CELLS = {"plain1": (False, 1, "main"), "plain4": (False, 4, "main"),
         "tls1": (True, 1, "main"), "tls4": (True, 4, "main"), "fill4": (False, 4, "filler")}


RECEIVERS = ("pyn_16k", "pyn_unlimited", "dcmtk")  # ``--ceilings`` (plain only)


def _ceiling(root: Path, receiver: str) -> Bare:
    """A started receiver that does no work of its own (``compare.ceilings``)."""
    root.mkdir(parents=True, exist_ok=True)
    log = root / "server.log"
    if receiver == "dcmtk":
        port = free_port()
        service = ceilings._storescp(port, log, ("--fork",))
    else:
        pdu = "16384" if receiver == "pyn_16k" else "0"
        service, port = ceilings._service(["discard", "--max-pdu", pdu], log)
    return Bare(root, service, port)


def _tree(pid: int) -> list[psutil.Process]:
    """``pid`` and its descendants (none if it is gone)."""
    try:
        return [psutil.Process(pid), *psutil.Process(pid).children(recursive=True)]
    except psutil.Error:
        return []


def tree_cpu(pid: int) -> dict[int, float]:
    """CPU seconds (user + system) of ``pid`` and each of its descendants, by pid."""
    out: dict[int, float] = {}
    for p in _tree(pid):
        try:
            t = p.cpu_times()
        except psutil.Error:
            continue
        out[p.pid] = t.user + t.system
    return out


def _switches_by_thread(pid: int) -> dict[int, int]:
    """Context switches (voluntary and not) so far of every thread of ``pid`` and its
    descendants, by thread id."""
    out: dict[int, int] = {}
    for p in _tree(pid):
        try:
            tasks = list(Path(f"/proc/{p.pid}/task").iterdir())
        except OSError:
            continue
        for task in tasks:
            try:
                status = (task / "status").read_text()
            except OSError:
                continue
            out[int(task.name)] = sum(
                int(line.split()[1]) for line in status.splitlines()
                if line.startswith(("voluntary_ctxt_switches", "nonvoluntary_ctxt_switches")))
    return out


class SwitchSampler:
    """Context switches of a server's threads over a run. Why: an image's hand-offs
    between threads (and the interpreter's lock taken back after each system call) cost
    CPU in the kernel that no Python profile shows, and the count is far steadier between
    rounds than images/s on a shared machine. The threads of an association end with it:
    each is read every 20 ms and its last reading counted (what it did in its last 20 ms
    is lost)."""

    def __init__(self, pid: int) -> None:
        self._pid = pid
        self._first = _switches_by_thread(pid)
        self._last = dict(self._first)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(0.02):
            self._last.update(_switches_by_thread(self._pid))

    def __enter__(self) -> SwitchSampler:
        self._thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self._last.update(_switches_by_thread(self._pid))

    @property
    def total(self) -> int:
        return sum(n - self._first.get(tid, 0) for tid, n in self._last.items())


def corpus(out: Path, ct: int, mr_studies: int, filler: int, cr: int = 0) -> dataset.Corpus:
    """``bench compare``'s generator at a size of our own: one CT series, ``cr`` CR
    images (2048x2500, ~10 MB each: what drives a server's peak memory), ``mr_studies``
    three-image MR studies, ``filler`` one-instance studies (0.3 patients per study: the
    first studies each get a patient of their own, as in the large-index phase)."""
    n_main = 1 + (cr + 1) // 2 + mr_studies
    size = dataset.Size("eab", 1, ct, cr, mr_studies, 3, n_main + filler)
    return dataset.generate(out / "data", size)


def _pacsvault(workers: str, src: str | None, root: Path, tls: bool,
               template: Path) -> PacsvaultTarget:
    env_path = os.environ.get("PYTHONPATH", "")
    if src:
        os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (src, str(ROOT), env_path) if p)
    try:
        if not (template / "token").exists():
            # in a child with this tree first on the path (the vault is opened in-process
            # to make the bench user: it must not be migrated by another checkout)
            subprocess.run([sys.executable, "-c",
                            "import sys; from pathlib import Path; "
                            "from bench.compare.pacsvault_server import PacsvaultTarget; "
                            "PacsvaultTarget(Path(sys.argv[1]), sys.argv[2] == '1')",
                            str(template), "1" if tls else "0"], check=True, cwd=ROOT)
        target = PacsvaultTarget(root, tls, template, workers=workers)
        target.start()
    finally:
        os.environ["PYTHONPATH"] = env_path
    return target


def one(target: Target, files: list[Path], nassoc: int,
        logs: Path) -> dict[str, Any]:
    logs.mkdir(parents=True, exist_ok=True)
    warm, timed = files[:nassoc], files[nassoc:]
    push(target.dicom_port, target.called_ae, warm, nassoc, target.scu_tls, logs)
    load = os.getloadavg()[0]
    before = tree_cpu(target.pid)
    with RssSampler(target.pid) as rss, SwitchSampler(target.pid) as switched:
        wall = push(target.dicom_port, target.called_ae, timed, nassoc, target.scu_tls, logs)
    after = tree_cpu(target.pid)
    per = {pid: after[pid] - before.get(pid, 0.0) for pid in after}
    cpu = sum(per.values())
    n = len(timed)
    return {"images_s": n / wall, "mb_s": sum(f.stat().st_size for f in timed) / wall / 1e6,
            "cpu_ms": 1000 * cpu / n, "rss_mb": rss.peak / 1e6,
            "pss_mb": rss.pss_peak / 1e6, "load": load, "switches": switched.total / n,
            "split": sorted((round(1000 * c / n, 2) for c in per.values()), reverse=True)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--cells", default="plain1,plain4,fill4")
    ap.add_argument("--variant", action="append", default=[],
                    help="NAME=WORKERS[@SRC] (default: w1=1 and w2=2 from this tree)")
    ap.add_argument("--ct", type=int, default=150, help="CT 512x512 slices (main cells)")
    ap.add_argument("--mr", type=int, default=40, help="3-image MR studies (main cells)")
    ap.add_argument("--filler", type=int, default=400, help="one-instance studies (fill4)")
    ap.add_argument("--cr", type=int, default=0,
                    help="CR 2048x2500 images (main cells), spread over the sequence")
    ap.add_argument("--no-orthanc", action="store_true")
    ap.add_argument("--ceilings", action="store_true",
                    help="the wire ceilings of each plain cell's shape, every round")
    args = ap.parse_args()
    out: Path = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    variants: list[tuple[str, str, str | None]] = []
    for spec in args.variant or ["w1=1", "w2=2"]:
        name, _, rest = spec.partition("=")
        workers, _, src = rest.partition("@")
        variants.append((name, workers, str(Path(src).resolve()) if src else None))
    cells = [c for c in args.cells.split(",") if c]
    if not args.no_orthanc:
        ensure_installed()
    c = corpus(out, args.ct, args.mr, args.filler, args.cr)
    # the CT slices and the MR studies interleaved, so that every association sees both
    cts, mrs = [i for i in c.main if i.kind == "CT"], [i for i in c.main if i.kind == "MR"]
    step = max(1, len(cts) // max(1, len(mrs)))
    mixed: list[dataset.Item] = []
    for k, item in enumerate(cts):
        mixed.append(item)
        if k % step == step - 1 and mrs:
            mixed.append(mrs.pop(0))
    mixed += mrs
    crs = c.of_kind("CR")
    for k, item in enumerate(crs):  # evenly spread, so each association gets its share
        mixed.insert((k * len(mixed)) // len(crs) + k, item)
    files = {"main": c.files(mixed), "filler": c.files(c.filler)}
    labels = [v[0] for v in variants] + ([] if args.no_orthanc else ["orthanc"])
    if args.ceilings:
        labels += list(RECEIVERS)
    results: dict[str, dict[str, list[dict[str, Any]]]] = {
        cell: {label: [] for label in labels} for cell in cells}
    work = out / "work"
    for r in range(args.rounds):
        for cell in cells:
            tls, nassoc, which = CELLS[cell]
            order = labels if (r + cells.index(cell)) % 2 == 0 else labels[::-1]
            for label in order:
                if label in RECEIVERS and tls:
                    continue  # (plain receivers only here: ``bench compare`` has the TLS ones)
                root = work / f"{cell}-{label}-{r}"
                shutil.rmtree(root, ignore_errors=True)
                target: Target
                if label == "orthanc":
                    target = OrthancTarget(root, tls, work / "orthanc-pki")
                    target.start()
                elif label in RECEIVERS:
                    target = _ceiling(root, label)
                else:
                    _name, workers, src = next(v for v in variants if v[0] == label)
                    template = work / f"template-{label}-{'tls' if tls else 'plain'}"
                    target = _pacsvault(workers, src, root, tls, template)
                try:
                    got = one(target, files[which], nassoc, root / "logs")
                finally:
                    target.stop()
                results[cell][label].append(got)
                peer = results[cell].get("orthanc", [])
                ratio = (f", {got['images_s'] / peer[r]['images_s']:.2f} of Orthanc"
                         if label != "orthanc" and len(peer) > r else "")
                print(f"round {r} {cell} {label}: {got['images_s']:.1f} images/s{ratio}, "
                      f"{got['cpu_ms']:.2f} ms CPU/image {got['split']}, "
                      f"{got['switches']:.1f} switches/image, "
                      f"RSS {got['rss_mb']:.0f} MB, PSS {got['pss_mb']:.0f} MB, "
                      f"load {got['load']:.1f}", flush=True)
                shutil.rmtree(root, ignore_errors=True)
    (out / "results.json").write_text(json.dumps(results, indent=1))
    print("\n| cell | server | images/s (median) | ratio to Orthanc, per round | "
          "CPU ms/image (median) | peak RSS MB (max) | peak PSS MB (max) "
          "| load avg at start |")
    print("|---|---|---:|---|---:|---:|---:|---|")
    for cell, by in results.items():
        for label, runs in by.items():
            if not runs:
                continue
            ratios = ("" if label == "orthanc" or not by.get("orthanc") else ", ".join(
                f"{a['images_s'] / b['images_s']:.2f}"
                for a, b in zip(runs, by["orthanc"], strict=False)))
            print(f"| {cell} | {label} | {statistics.median(x['images_s'] for x in runs):.1f} "
                  f"| {ratios} | {statistics.median(x['cpu_ms'] for x in runs):.2f} "
                  f"| {max(x['rss_mb'] for x in runs):.0f} "
                  f"| {max(x.get('pss_mb', 0) for x in runs):.0f} "
                  f"| {', '.join(format(x['load'], '.1f') for x in runs)} |")
    if args.ceilings:
        print("\n| cell | server | share of pynetdicom 16 KB / unlimited / dcmtk "
              "(median images/s over the ceiling's median) |")
        print("|---|---|---|")
        for cell, by in results.items():
            medians = {k: statistics.median(x["images_s"] for x in by[k])
                       for k in RECEIVERS if by.get(k)}
            if len(medians) < len(RECEIVERS):
                continue
            for label in (v[0] for v in variants):
                mine = statistics.median(x["images_s"] for x in by[label])
                print(f"| {cell} | {label} | " + " / ".join(
                    f"{100 * mine / medians[k]:.0f} % ({medians[k]:.0f})"
                    for k in RECEIVERS) + " |")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
