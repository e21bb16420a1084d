"""Where one association's C-STORE cycle goes, by wall clock (issue 17).

``python -m bench.compare.cycle --out DIR [--cell plain1] [--ct 1200] [--variant
NAME=1[@SRC]]`` runs one ``embedded_ab`` cell (no Orthanc) with the marks of
``cycle_site/sitecustomize.py`` in the ``serve`` process, then prints the median of each
phase of the cycle (the response sent, the next request's first PDU read, the request
delivered to the association thread, the store, the response written) and of each step
inside the store, by consecutive marks.

Why: ``embedded_ab`` gives images/s and CPU per image, which the busy machine blurs by
±15 %; one association's cycle is a chain, and a phase's median moves only when that phase
does (a change that moves work from one thread to another shows as such: the digest
hashed while receiving shortened the store by 0.3 ms and lengthened the receive by as
much). The marks cost ~1 µs each.
"""

from __future__ import annotations

import argparse
import collections
import itertools
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

SITE = Path(__file__).resolve().parent / "cycle_site"
_PHASES = (
    ("turnaround (response -> next 1st PDU)", "resp", "pdu"),
    ("receive (1st PDU -> delivered)", "pdu", "deliver"),
    ("hand-over (delivered -> store)", "deliver", "store0"),
    ("store", "store0", "store1"),
    ("respond (store -> response written)", "store1", "resp"),
)


def cycles(path: Path) -> list[list[tuple[str, int]]]:
    """The marks of each cycle, from the mark after a response to the next response."""
    marks: list[tuple[str, int]] = []
    for line in path.read_text().splitlines():
        marks += [(str(n), int(t)) for n, t in json.loads(line)]
    found, current = [], []
    for mark in marks:
        current.append(mark)
        if mark[0] == "resp":
            found.append(current)
            current = []
    return found


def report(path: Path) -> str:
    found = cycles(path)
    phases: dict[str, list[int]] = collections.defaultdict(list)
    steps: dict[tuple[str, str], list[int]] = collections.defaultdict(list)
    previous: int | None = None
    counted = 0
    for cycle in found:
        names = [n for n, _ in cycle]
        if names.count("store0") != 1 or "pdu" not in names or "deliver" not in names:
            previous = cycle[-1][1]
            continue
        first = {n: t for n, t in reversed(cycle)}
        last = {n: t for n, t in cycle}
        at = dict(first, resp=last["resp"])
        if previous is not None:
            phases["cycle"].append(last["resp"] - previous)
            phases[_PHASES[0][0]].append(first["pdu"] - previous)
        for label, start, end in _PHASES[1:]:
            phases[label].append(at[end] - at[start])
        inside = cycle[names.index("store0"):names.index("store1") + 1]
        for (a, ta), (b, tb) in itertools.pairwise(inside):
            steps[(a, b)].append(tb - ta)
        previous = last["resp"]
        counted += 1
    lines = [f"{counted} cycles (median ms)"]
    for label in [p[0] for p in _PHASES] + ["cycle"]:
        if phases[label]:
            lines.append(f"  {label:42s} {statistics.median(phases[label]) / 1e6:7.3f}")
    lines.append("inside the store (consecutive marks in at least a fifth of the cycles; "
                 "median ms, ms per cycle)")
    for (a, b), values in sorted(steps.items(), key=lambda kv: -sum(kv[1])):
        if counted and len(values) >= counted / 5:
            lines.append(f"  {a:>8s} -> {b:<8s} {statistics.median(values) / 1e6:7.3f} "
                         f"{sum(values) / counted / 1e6:7.3f}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--cell", default="plain1", help="an embedded_ab cell (plain1, tls1)")
    parser.add_argument("--ct", type=int, default=1200)
    parser.add_argument("--variant", default="this=1")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    marks = args.out / "marks.jsonl"
    marks.unlink(missing_ok=True)
    env = dict(os.environ, PV_CYCLE_OUT=str(marks),
               PYTHONPATH=os.pathsep.join(p for p in (str(SITE), os.environ.get("PYTHONPATH"))
                                          if p))
    subprocess.run([sys.executable, "-m", "bench.compare.embedded_ab", "--out",
                    str(args.out / "run"), "--rounds", "1", "--variant", args.variant,
                    "--cells", args.cell, "--ct", str(args.ct), "--mr", "2", "--no-orthanc"],
                   env=env, check=True)
    print(report(marks))


if __name__ == "__main__":
    main()
