"""Scale-out ingest A/B against Orthanc in the same run (issue 16, ingest target).

Why: the target is "the scale-out deployment's ingest with 4 associations >= Orthanc's on
the same machine", and this machine is shared and loaded, so absolute rates move 2x
between runs. Each round runs, alternated, the scale-out deployment (PostgreSQL +
SeaweedFS S3, ``serve --workers 2`` or two instances) from each source tree given and
Orthanc, on the same files with 4 dcmtk ``storescu`` associations, and reports the rate
as a ratio to Orthanc's in the same round and the servers' CPU per image (the whole
process tree: serve and its workers; Orthanc), and apart the CPU PostgreSQL and SeaweedFS
spent meanwhile (shared by every tree, counted per cell: on one machine they run on the
same cores as serve, which Orthanc's local files do not need).

Usage: ``python -m bench.compare.scaleout_ab [--rounds 3] [--tree old=/tmp/old/src]
[--shape workers|instances] [--ct 200] [--mr 60]``; ``old`` is e.g.
``git archive HEAD~1 src | tar -x -C /tmp/old``.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

import psutil

from bench.compare.orthanc import OrthancTarget, ensure_installed
from bench.compare.scaleout import Components, ScaleOutTarget, ingest
from bench.ingest import push

ROOT = Path(__file__).resolve().parents[2]


def _files(out: Path, ct: int, mr: int) -> list[Path]:
    """``ct`` CT slices 512x512 of one study, then ``mr`` two-image MR studies 64x64 with a
    new patient every third study (the bench dataset's mix of long series and many small
    studies), interleaved so every association sees both."""
    from pydicom import dcmread
    from pydicom.uid import generate_uid
    from tests import corpus

    cts = corpus.synthetic_ct_series(out / "ct", ct, size=512) if ct else []
    mrs = corpus.synthetic_ct_series(out / "mr", mr, seed=11, size=64) if mr else []
    study = series = patient = ""
    for i, f in enumerate(mrs):
        ds = dcmread(f)
        if i % 2 == 0:
            study, series = generate_uid(), generate_uid()
            if i % 6 == 0:
                patient = f"ABMR{generate_uid()[-10:]}"
        ds.PatientID, ds.PatientName = patient, f"AB^{patient}"
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
        ds.save_as(f, enforce_file_format=True)
    step = max(1, len(cts) // max(1, len(mrs)))
    mixed: list[Path] = []
    rest = list(mrs)
    for k, f in enumerate(cts):
        mixed.append(f)
        if k % step == step - 1 and rest:
            mixed.append(rest.pop(0))
    return mixed + rest


def _tree_cpu(pid: int) -> float:
    try:
        proc = psutil.Process(pid)
        procs = [proc, *proc.children(recursive=True)]
    except psutil.Error:
        return 0.0
    total = 0.0
    for p in procs:
        try:
            t = p.cpu_times()
            total += t.user + t.system
        except psutil.Error:
            continue
    return total


def _scaleout(comp: Components, work: Path, shape: str, src: str, files: list[Path],
              n: int) -> dict[str, float]:
    os.environ["PYTHONPATH"] = os.pathsep.join([src, str(ROOT)])
    target = ScaleOutTarget(work, comp, shape)
    try:
        target.start()
    except RuntimeError:
        for log in sorted(work.glob("serve-*.log")):
            print(log.read_text(errors="replace")[-3000:], file=sys.stderr)
        raise
    assert comp.pg is not None and comp.s3 is not None
    shared = [comp.pg.pid, comp.s3.pid]  # PostgreSQL (postmaster + backends), SeaweedFS
    try:
        pids = [svc.pid for svc in target.services]
        cpu0 = sum(_tree_cpu(p) for p in pids)
        back0 = sum(_tree_cpu(p) for p in shared)
        wall = ingest(target, files, n, work / "logs")
        cpu = sum(_tree_cpu(p) for p in pids) - cpu0
        back = sum(_tree_cpu(p) for p in shared) - back0
    finally:
        target.stop()
        os.environ.pop("PYTHONPATH", None)
    return {"images_s": len(files) / wall, "cpu_ms": 1000 * cpu / len(files),
            "backends_ms": 1000 * back / len(files)}


def _orthanc(work: Path, pki: Path, files: list[Path], n: int) -> dict[str, float]:
    target = OrthancTarget(work, False, pki)
    target.start()
    try:
        assert target.service is not None
        pid = target.service.pid
        cpu0 = _tree_cpu(pid)
        logs = work / "logs"
        logs.mkdir()
        wall = push(target.dicom_port, target.called_ae, files, n, [], logs)
        cpu = _tree_cpu(pid) - cpu0
    finally:
        target.stop()
    return {"images_s": len(files) / wall, "cpu_ms": 1000 * cpu / len(files)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--assoc", type=int, default=4)
    ap.add_argument("--shape", choices=("workers", "instances"), default="workers")
    ap.add_argument("--ct", type=int, default=200)
    ap.add_argument("--mr", type=int, default=60)
    ap.add_argument("--tree", action="append", default=[],
                    help="label=SRC_DIR (repeatable; default: this working tree as 'new')")
    args = ap.parse_args()
    ensure_installed()
    trees = ([tuple(t.split("=", 1)) for t in args.tree]  # only these when given
             or [("new", str(ROOT / "src"))])
    work = Path(tempfile.mkdtemp(prefix="pv-soab-"))
    files = _files(work / "files", args.ct, args.mr)
    results: dict[str, list[dict[str, float]]] = {}
    try:
        with Components() as comp:
            for rnd in range(args.rounds):
                order: list[Any] = [("orthanc", ""), *trees]
                if rnd % 2:
                    order.reverse()
                for label, src in order:
                    cell = work / f"r{rnd}-{label}"
                    cell.mkdir()
                    got = (_orthanc(cell, work / "pki", files, args.assoc) if label == "orthanc"
                           else _scaleout(comp, cell, args.shape, src, files, args.assoc))
                    results.setdefault(label, []).append(got)
                    ratio = ""
                    if label != "orthanc" and len(results.get("orthanc", [])) > rnd:
                        ratio = f" ({got['images_s'] / results['orthanc'][rnd]['images_s']:.2f}"
                        ratio += " of Orthanc's this round)"
                    backends = (f", PostgreSQL + SeaweedFS {got['backends_ms']:.1f} ms"
                                if "backends_ms" in got else "")
                    print(f"round {rnd} {label}: {got['images_s']:.1f} images/s, "
                          f"{got['cpu_ms']:.1f} ms CPU per image{backends}{ratio}",
                          flush=True)
                    shutil.rmtree(cell, ignore_errors=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"\n{len(files)} images, {args.assoc} associations, scale-out shape {args.shape}")
    print("| server | images/s (median) | ratio to Orthanc, per round | CPU ms/image | "
          "PostgreSQL + SeaweedFS CPU ms/image |")
    print("|---|---:|---|---:|---:|")
    for label, runs in results.items():
        ratios = [r["images_s"] / o["images_s"]
                  for r, o in zip(runs, results["orthanc"], strict=False)]
        spent = [r["backends_ms"] for r in runs if "backends_ms" in r]
        print(f"| {label} | {statistics.median(r['images_s'] for r in runs):.1f} | "
              f"{', '.join(f'{x:.2f}' for x in ratios)} | "
              f"{statistics.median(r['cpu_ms'] for r in runs):.1f} | "
              f"{f'{statistics.median(spent):.1f}' if spent else '-'} |")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
