"""Issue 17: what one-instance studies (the "index filler" row) cost per image in process.

Why: the filler row stores 64x64 MR images, each a new study (a new patient for about a
quarter), so fixed per-image and per-study costs dominate, not bytes. In process, without
the wire, ``Archive.store`` from ``--threads`` threads (as associations would) into a
fresh embedded vault: process CPU per image, and with ``--profile`` a cProfile of the
stores (top functions by cumulative and own time). ``--tree NAME=SRC`` runs the same in a
child per tree (``SRC`` first on ``PYTHONPATH``), alternated for ``--rounds``: an A/B of
CPU per image, which a loaded machine disturbs least.

    python -m bench.compare.filler_cpu --out /tmp/fill --n 400 --threads 4 --profile
    python -m bench.compare.filler_cpu --out /tmp/fill --tree old=/tmp/old/src --tree new=src
    python -m bench.compare.filler_cpu --out /tmp/ct --kind ct --n 150 --threads 1 ...

``--kind ct`` stores CT 512x512 slices of one series instead (the "plain" cells' usual
image: known study and series); ``FILLER_CPU_TIMER=1`` makes ``--profile`` count each
thread's CPU time instead of wall time (waits for the GIL and the disk left out).
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import io
import json
import os
import pstats
import shutil
import statistics
import tempfile
import threading
import time
from pathlib import Path

from bench.compare.procs import tree_child


def files_for(out: Path, n: int, kind: str = "filler") -> list[Path]:
    """``n`` filler images, or with ``kind="ct"`` ``n`` CT 512x512 slices of one series
    (what the "plain" ingest cells mostly store: a known study and series each time)."""
    from bench.compare import dataset

    if kind == "ct":
        c = dataset.generate(out / "data-ct", dataset.Size("ctcpu", 1, n, 0, 0, 1, 1))
        return c.files([i for i in c.main if i.kind == "CT"])[:n]
    size = dataset.Size("fillcpu", 0, 0, 0, 0, 1, n + 1)
    c = dataset.generate(out / "data", size)
    return c.files(c.filler)[:n]


def _profiler() -> cProfile.Profile:
    """Wall time by default; the thread's CPU time with ``FILLER_CPU_TIMER=1`` (what the
    thread itself spent, waits for the GIL and the disk left out)."""
    if os.environ.get("FILLER_CPU_TIMER"):
        return cProfile.Profile(time.thread_time)
    return cProfile.Profile()


def run_once(out: Path, n: int, threads: int, profile: Path | None,
             kind: str = "filler") -> dict[str, float]:
    """One fresh vault, ``n`` filler images stored from ``threads`` threads; CPU/image."""
    from pacsvault.vault import Vault, create

    raws = [f.read_bytes() for f in files_for(out, n, kind)]
    root = Path(tempfile.mkdtemp(dir=out))
    quiet = io.StringIO()  # the in-process recorder echoes events (no patient data)
    try:
        with contextlib.redirect_stdout(quiet), contextlib.redirect_stderr(quiet):
            create(root / "data", key_file=root / "key")
            vault = Vault.open(root / "data", root / "key")
        try:
            archive = vault.archive
            for raw in raws[:threads]:  # warm-up: imports, caches, first statements
                archive.store(raw, source_ae="BENCHSCU")
            todo = raws[threads:]
            profs: list[cProfile.Profile] = []

            def work(k: int) -> None:
                prof = _profiler() if profile is not None else None
                if prof is not None:
                    profs.append(prof)
                    prof.enable()
                for raw in todo[k::threads]:
                    archive.store(raw, source_ae="BENCHSCU")
                if prof is not None:
                    prof.disable()

            c0, t0 = time.process_time(), time.perf_counter()
            pool = [threading.Thread(target=work, args=(k,)) for k in range(threads)]
            for t in pool:
                t.start()
            for t in pool:
                t.join()
            cpu, wall = time.process_time() - c0, time.perf_counter() - t0
            archive.settle()
        finally:
            vault.close()
    finally:
        shutil.rmtree(root, ignore_errors=True)
    if profs and profile is not None:  # the store threads' profiles (not the stagers')
        text = io.StringIO()
        stats = pstats.Stats(*profs, stream=text)
        stats.sort_stats("cumulative").print_stats(45)
        stats.sort_stats("tottime").print_stats(30)
        profile.write_text(text.getvalue())
    return {"cpu_ms": 1000 * cpu / len(todo), "images_s": len(todo) / wall}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--n", type=int, default=400)
    ap.add_argument("--threads", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--tree", action="append", default=[], help="NAME=SRC (alternated)")
    ap.add_argument("--profile", action="store_true",
                    help="cProfile of the storing threads (the archive's stager and publisher "
                         "threads are not in it)")
    ap.add_argument("--kind", choices=("filler", "ct"), default="filler",
                    help="one-instance studies (default) or CT slices of one series")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    out: Path = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    if args.child or not args.tree:
        got = run_once(out, args.n, args.threads,
                       out / f"{args.kind}.prof.txt" if args.profile else None, args.kind)
        print(json.dumps(got), flush=True)
        return
    trees = [(name, src) for name, _, src in (t.partition("=") for t in args.tree)]
    files_for(out, args.n, args.kind)  # generated once, before the children
    results: dict[str, list[dict[str, float]]] = {name: [] for name, _ in trees}
    for r in range(args.rounds):
        for name, src in (trees if r % 2 == 0 else trees[::-1]):
            got = tree_child(src, "bench.compare.filler_cpu", [
                "--out", str(out), "--n", str(args.n), "--threads", str(args.threads),
                "--kind", args.kind])
            results[name].append(got)
            print(f"round {r} {name}: {got['cpu_ms']:.2f} ms CPU/image, "
                  f"{got['images_s']:.0f} images/s, load {os.getloadavg()[0]:.1f}", flush=True)
    for name, runs in results.items():
        print(f"{name}: CPU ms/image median {statistics.median(x['cpu_ms'] for x in runs):.2f}"
              f" ({', '.join(format(x['cpu_ms'], '.2f') for x in runs)})")


if __name__ == "__main__":
    main()
