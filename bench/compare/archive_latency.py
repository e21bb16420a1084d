"""Issue 17: the latency of one image's store chain (``Archive.store``), A/B alternated.

Why: on one association ``storescu`` waits for each C-STORE-RSP, so that row measures
the chain parse -> stage (fsync) -> rows + trail record (fsync) -> commit (fsync), whose
waits (fsyncs, thread hand-offs) server CPU per image does not show, and which wall
figures over a whole ``storescu`` push bury under the load of a shared machine. Here each
tree (``--tree NAME=DIR``: ``DIR/src`` first on ``PYTHONPATH``) stores the same images
one after another into a fresh vault of its own, in a child process, in short blocks
alternated between the trees (``--rounds`` blocks each, the order reversed every round),
so that both see the same disk and neighbours. Reported per tree: the median and mean
wall time of one ``store`` call, and the process CPU per image.

Sets: ``ct`` (slices of one study: the cached-study path, staging in a worker) and
``filler`` (one-instance 64x64 MR studies: a study lookup and often a new patient each).

    python -m bench.compare.archive_latency --out /tmp/alat --tree old=/tmp/old \
        --tree new=/tmp/new --rounds 8 --set ct --set filler
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

from bench.compare import dataset

ROOT = Path(__file__).resolve().parents[2]

_CHILD = r"""
import json, shutil, sys, tempfile, time
from pathlib import Path
from pacsvault.vault import Vault, create

files = [Path(p) for p in json.loads(sys.argv[1])]
root = Path(tempfile.mkdtemp(dir=sys.argv[2]))
create(root / "data", key_file=root / "key")
vault = Vault.open(root / "data", root / "key")
try:
    archive = vault.archive
    blobs = [f.read_bytes() for f in files]
    archive.store(blobs[0], source_ae="BENCHSCU")  # warm-up: imports, first study
    walls = []
    c0 = time.process_time()
    for raw in blobs[1:]:
        t0 = time.perf_counter()
        archive.store(raw, source_ae="BENCHSCU")
        walls.append(time.perf_counter() - t0)
    cpu = time.process_time() - c0
    archive.settle()
finally:
    vault.close()
    shutil.rmtree(root, ignore_errors=True)
print(json.dumps({"walls": walls, "cpu": cpu}))
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--tree", action="append", required=True, help="NAME=DIR (DIR/src first)")
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--set", action="append", choices=("ct", "filler"), default=[])
    ap.add_argument("--count", type=int, default=60, help="images per block")
    args = ap.parse_args()
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    corpus = dataset.generate(out / "data", dataset.Size(
        "alat", 1, args.count + 1, 0, 0, 3, 1 + (args.count + 1) * args.rounds * 2))
    ct = [corpus.root / i.path for i in corpus.main if i.kind == "CT"]
    filler = [corpus.root / i.path for i in corpus.filler]
    trees = [(spec.partition("=")[0], Path(spec.partition("=")[2])) for spec in args.tree]
    results: dict[str, dict[str, list[float]]] = {}
    block = 0
    for r in range(args.rounds):
        for which in args.set or ["ct"]:
            order = trees if r % 2 == 0 else trees[::-1]
            for name, tree in order:
                if which == "ct":
                    files = ct
                else:  # new studies every block (a vault is fresh anyway: same cost)
                    files = filler[block * (args.count + 1):(block + 1) * (args.count + 1)]
                    block += 1
                env = {**os.environ, "PYTHONPATH": os.pathsep.join(
                    (str(tree / "src"), str(ROOT)))}
                proc = subprocess.run(
                    [sys.executable, "-c", _CHILD, json.dumps([str(f) for f in files]),
                     str(out)], env=env, capture_output=True, text=True, check=False)
                if proc.returncode != 0:
                    sys.exit(f"{name}: {proc.stderr[-3000:]}")
                got = json.loads(proc.stdout.strip().splitlines()[-1])
                row = results.setdefault(f"{which} {name}", {"walls": [], "cpu": []})
                row["walls"].extend(got["walls"])
                row["cpu"].append(1000 * got["cpu"] / len(got["walls"]))
                print(f"round {r} {which} {name}: median "
                      f"{1000 * statistics.median(got['walls']):.2f} ms, CPU "
                      f"{row['cpu'][-1]:.2f} ms/image", flush=True)
    (out / "results.json").write_text(json.dumps(results))
    print("\n| set | tree | store wall median ms | mean ms | CPU ms/image (median of rounds) |")
    print("|---|---|---:|---:|---:|")
    for key, row in results.items():
        which, name = key.split(" ", 1)
        print(f"| {which} | {name} | {1000 * statistics.median(row['walls']):.2f} | "
              f"{1000 * statistics.mean(row['walls']):.2f} | "
              f"{statistics.median(row['cpu']):.2f} |")


if __name__ == "__main__":
    main()
