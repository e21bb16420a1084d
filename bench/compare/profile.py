"""Optional py-spy sampling of the pacsvault server during a workload (``--profile``).

``py-spy record --format raw`` writes collapsed stacks ("frame;frame;... count"); the summary
gives each function's share of samples, inclusive (on the stack) and self (at the top).
``--nonblocking`` keeps the server running while sampled, so the figures barely move.
"""

from __future__ import annotations

import collections
import contextlib
import shutil
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path


def available() -> bool:
    return shutil.which("py-spy") is not None


@contextlib.contextmanager
def record(pid: int, out: Path, enabled: bool) -> Iterator[None]:
    if not enabled:
        yield
        return
    out.parent.mkdir(parents=True, exist_ok=True)
    exe = shutil.which("py-spy")
    assert exe
    proc = subprocess.Popen(
        [exe, "record", "--pid", str(pid), "--rate", "200", "--format", "raw", "--subprocesses",
         "--threads", "--nonblocking", "--idle", "-o", str(out)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        yield
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        if out.exists():
            (out.with_suffix(".top.txt")).write_text(summary(out))


IDLE = ("select", "poll", "wait", "accept", "_recv_into", "sleep", "recv", "epoll")


def summary(path: Path, top: int = 25) -> str:
    """Top functions by inclusive and by self share, busy samples only (idle waits dropped)."""
    incl: collections.Counter[str] = collections.Counter()
    self_: collections.Counter[str] = collections.Counter()
    total = 0
    for line in path.read_text(errors="replace").splitlines():
        stack, _, count = line.rpartition(" ")
        if not count.isdigit() or not stack:
            continue
        frames = [f for f in stack.split(";") if not f.startswith(("process ", "thread "))]
        if not frames:
            continue
        leaf = frames[-1]
        if any(leaf.startswith(w + " ") or leaf.startswith(w + "(") for w in IDLE):
            continue
        n = int(count)
        total += n
        self_[leaf] += n
        for f in set(frames):
            incl[f] += n
    if not total:
        return "no busy samples\n"
    out = [f"busy samples: {total}", "", "inclusive share:"]
    out += [f"  {100 * n / total:5.1f} %  {f}" for f, n in incl.most_common(top)]
    out += ["", "self share:"]
    out += [f"  {100 * n / total:5.1f} %  {f}" for f, n in self_.most_common(top)]
    return "\n".join(out) + "\n"
