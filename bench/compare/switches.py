"""Issue 17: context switches and CPU per stored image, by thread, of a running server.

Why: under the index filler (4 associations of one-instance studies) `perf` puts about
half of the server's CPU in the kernel, most of it in the scheduler's switch and wake-up
paths, not in any of pacsvault's own steps. This counts, for ``--seconds`` of a running
``serve`` (Linux ``/proc``), each thread's voluntary switches (it blocked: a lock, the
GIL, a condition, I/O) and involuntary ones (preempted), and its CPU, divided by the
images committed meanwhile (the ``instances=`` of the serve log's ``dicom.store.committed``
lines); threads are grouped by name (``py-spy`` beside the interpreter or on the PATH),
with ``--frames`` by the pacsvault frame they were in at the end too.

    python -m bench.compare.embedded_ab --out /tmp/ab --rounds 1 --cells fill4 \\
        --filler 8000 --no-orthanc &      # then, while it stores:
    python -m bench.compare.switches --pid "$(pgrep -f 'pacsvault.*serve' | head -1)" \\
        --serve-log /tmp/ab/work/fill4-w1-0/serve.log
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

_TICK_MS = 1000 / os.sysconf("SC_CLK_TCK")


def _snapshot(pid: int) -> dict[str, tuple[int, int, int]]:
    """tid -> (voluntary, involuntary switches, CPU ticks)."""
    out: dict[str, tuple[int, int, int]] = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            status = (task / "status").read_text()
            stat = (task / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue  # the thread ended meanwhile
        switches = dict(re.findall(r"^(\w*ctxt_switches):\s+(\d+)", status, re.M))
        out[task.name] = (int(switches["voluntary_ctxt_switches"]),
                          int(switches["nonvoluntary_ctxt_switches"]),
                          int(stat[11]) + int(stat[12]))  # utime + stime
    return out


def _images(serve_log: Path) -> int:
    text = serve_log.read_text(errors="replace")
    return sum(int(n) for n in re.findall(
        r"dicom\.store\.committed .*?instances=(\d+)", text))


def _names(pid: int, frames: bool) -> dict[str, str]:
    """tid -> thread name (digits folded) and, with ``frames``, its innermost pacsvault
    frame at the end (py-spy)."""
    spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    if not Path(spy).exists():
        return {}
    dump = subprocess.run([spy, "dump", "--pid", str(pid)], capture_output=True,
                          text=True, check=False).stdout
    names: dict[str, str] = {}
    for block in re.split(r"\n(?=Thread )", dump):
        head = re.match(r'Thread (\d+) \(\w+\): "(.*)"', block)
        if head is None:
            continue
        frame = next((line.strip().split(" (")[0] for line in block.splitlines()[1:]
                      if "pacsvault/" in line), "")
        name = re.sub(r"[0-9]+", "#", head.group(2))[:24]
        names[head.group(1)] = f"{name} {frame}" if frames else name
    return names


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.compare.switches")
    ap.add_argument("--pid", type=int, required=True)
    ap.add_argument("--serve-log", type=Path, required=True)
    ap.add_argument("--seconds", type=float, default=6.0)
    ap.add_argument("--frames", action="store_true",
                    help="group threads by their innermost pacsvault frame too")
    args = ap.parse_args(argv)
    images0, before = _images(args.serve_log), _snapshot(args.pid)
    time.sleep(args.seconds)
    if not Path(f"/proc/{args.pid}").exists():
        print("the server ended meanwhile: measure earlier in the run", file=sys.stderr)
        return 1
    after, images = _snapshot(args.pid), _images(args.serve_log) - images0
    names = _names(args.pid, args.frames)
    if images <= 0:
        print("no image committed meanwhile", file=sys.stderr)
        return 1
    groups: dict[str, list[float]] = collections.defaultdict(lambda: [0, 0, 0, 0])
    for tid, (vol1, invol1, ticks1) in after.items():
        vol0, invol0, ticks0 = before.get(tid, (0, 0, 0))
        group = groups[names.get(tid, "?")]
        for k, value in enumerate((vol1 - vol0, invol1 - invol0, (ticks1 - ticks0) * _TICK_MS)):
            group[k] += value
        group[3] += 1
    print(f"{images} images in {args.seconds:.0f} s ({images / args.seconds:.0f}/s)")
    print("| threads | n | voluntary / image | involuntary / image | CPU ms / image |")
    print("|---|---:|---:|---:|---:|")
    total = [0.0, 0.0, 0.0]
    for name, (vol, invol, cpu, count) in sorted(groups.items(), key=lambda kv: -kv[1][0]):
        total = [total[0] + vol, total[1] + invol, total[2] + cpu]
        if vol or cpu:
            print(f"| {name} | {count:.0f} | {vol / images:.1f} | {invol / images:.1f} | "
                  f"{cpu / images:.2f} |")
    print(f"| all | | {total[0] / images:.1f} | {total[1] / images:.1f} | "
          f"{total[2] / images:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
