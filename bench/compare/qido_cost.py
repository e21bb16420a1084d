"""``python -m bench.compare.qido_cost OUT [--studies N] [--hold S]``: in-process cost of
the unlimited study-level QIDO queries (every match answered) on a sealed PostgreSQL index
(issue 16), for profiling the per-answered-study path.

Why its own script: ``viewer_mix`` times pages and HTTPS rounds; this one sets up the same
deployment (the ``small`` dataset really stored, then :mod:`bench.compare.sealed_load` to
``--studies``), writes ``OUT/state.json`` (vault paths, filters) and keeps PostgreSQL up for
``--hold`` seconds, so that ``measure`` (another process, the code under test imported
fresh) can time old and new engines alternately on the same rows.

    python -m bench.compare.qido_cost measure OUT [--reps 20] [--old FILE]

``--old FILE`` is a previous ``index/query.py`` (e.g. ``git show HEAD~1:...``) loaded as a
module of its own: both engines answer the same identifiers, alternating, answers compared.
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from pydicom.dataset import Dataset
from sqlalchemy.orm import sessionmaker

from bench.compare import dataset, sealed_load
from bench.compare.scaleout import Components, ScaleOutTarget, ingest
from bench.compare.viewer_mix import identifier


def setup(out: Path, studies: int, hold: float) -> None:
    work = out / "work"
    corpus = dataset.generate(work / "dataset", dataset.SIZES["small"])
    corpus = sealed_load.with_patients(corpus, studies)
    items = sealed_load.extra_items(corpus, studies)
    # What ``bench compare`` asks, without a limit: its name prefix, and the full size's
    # one-week range (the small size's own range is two years: 40,000 answers).
    unlimited = {"name prefix": corpus.filters()["name prefix"],
                 "date range": {"StudyDate": "-".join(dataset.WEEK)}}
    with Components() as comp:
        t = ScaleOutTarget(work / "deployment", comp, "instances")
        t.quiet_scrub()
        t.start()
        try:
            ingest(t, corpus.files(corpus.main), 4, work / "ingest-logs")
        finally:
            t.stop()
        vault, engine = sealed_load.engine_of(t.data, t.key)
        try:
            secs = sealed_load.load(engine, corpus, items, print)
        finally:
            vault.close()
        (out / "state.json").write_text(json.dumps(
            {"data": str(t.data), "key": str(t.key), "filters": unlimited,
             "load_s": secs}))
        print("ready", flush=True)
        deadline = time.monotonic() + hold
        while time.monotonic() < deadline and not (out / "stop").exists():
            time.sleep(1)


def _engine_class(path: Path | None) -> Any:
    if path is None:
        from pacsvault.index.query import QueryEngine

        return QueryEngine
    spec = importlib.util.spec_from_file_location("pacsvault.index._query_old", path)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod.QueryEngine


def measure(out: Path, reps: int, old: Path | None) -> None:
    state = json.loads((out / "state.json").read_text())
    vault, engine = sealed_load.engine_of(Path(state["data"]), Path(state["key"]))
    sessions = sessionmaker(engine, expire_on_commit=False)
    engines = {"new": _engine_class(None)(sessions, "BENCH", time_budget=60)}
    if old is not None:
        engines["old"] = _engine_class(old)(sessions, "BENCH", time_budget=60)
    gc.collect()
    gc.freeze()
    try:
        for name, filt in state["filters"].items():
            ident: Dataset = identifier(filt)
            cpu: dict[str, list[float]] = {k: [] for k in engines}
            wall: dict[str, list[float]] = {k: [] for k in engines}
            answers: dict[str, Any] = {}
            for rep in range(reps + 1):
                order = list(engines) if rep % 2 == 0 else list(engines)[::-1]
                for kind in order:
                    c0, w0 = time.process_time(), time.perf_counter()
                    got = list(engines[kind].find_json("STUDY", ident))
                    if rep:
                        cpu[kind].append((time.process_time() - c0) * 1000)
                        wall[kind].append((time.perf_counter() - w0) * 1000)
                    answers[kind] = got
            same = all(a == answers["new"] for a in answers.values())
            for kind in engines:
                print(f"{name}: {kind} {len(answers[kind])} answers; CPU median "
                      f"{statistics.median(cpu[kind]):.1f} ms, wall median "
                      f"{statistics.median(wall[kind]):.1f} ms, wall p95 "
                      f"{sorted(wall[kind])[int(0.95 * (len(wall[kind]) - 1))]:.1f} ms;"
                      f" answers identical: {same}", flush=True)
    finally:
        vault.close()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("what", choices=("setup", "measure"))
    ap.add_argument("out", type=Path)
    ap.add_argument("--studies", type=int, default=100_000)
    ap.add_argument("--hold", type=float, default=3600)
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--old", type=Path)
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    if args.what == "setup":
        setup(args.out, args.studies, args.hold)
    else:
        measure(args.out, args.reps, args.old)


if __name__ == "__main__":
    main()
