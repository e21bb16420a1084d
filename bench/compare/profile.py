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
import sys
from collections.abc import Iterator
from pathlib import Path


def exe() -> str | None:
    """py-spy beside the interpreter (the venv) or on PATH."""
    beside = Path(sys.executable).parent / "py-spy"
    return str(beside) if beside.exists() else shutil.which("py-spy")


def available() -> bool:
    return exe() is not None


@contextlib.contextmanager
def record(pid: int, out: Path, enabled: bool) -> Iterator[None]:
    if not enabled:
        yield
        return
    out.parent.mkdir(parents=True, exist_ok=True)
    spy = exe()
    assert spy
    proc = subprocess.Popen(
        [spy, "record", "--pid", str(pid), "--rate", "200", "--format", "raw", "--subprocesses",
         "--threads", "--nonblocking", "-o", str(out)],
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


IDLE = {"select", "poll", "wait", "accept", "sleep", "get", "recv", "recv_into",
        "_wait_for_tstate_lock",
        "serve_forever", "run_forever", "_run_once"}


# ``time.sleep`` is a builtin, so py-spy shows the calling line: pynetdicom 3.0's reactors
# poll with 1 ms sleeps at these lines.
# (A thread pool's idle worker blocks in ``queue.get`` at thread.py:81.)
SLEEP_LINES = ("pynetdicom/dul.py:403)", "pynetdicom/association.py:714)",
               "concurrent/futures/thread.py:81)")


def idle(frame: str) -> bool:
    """A leaf that is waiting, not working (py-spy counts some waits as busy)."""
    name = frame.split(" (")[0].rsplit(".", 1)[-1]
    return name in IDLE or name.endswith("_wait") or frame.endswith(SLEEP_LINES)


# Where the time under these functions goes, line by line (the call each line makes).
BREAKDOWN = ("Archive.store", "Archive._stage", "GroupCommit._commit", "Archive._choose",
             "GroupCommit._index_batch", "DicomService._store", "QueryRetrieve._send",
             "Archive.read")


def by_line(path: Path, func: str) -> tuple[int, collections.Counter[str]]:
    """Busy samples under ``func`` (outermost occurrence), by its line and the callee there."""
    lines: collections.Counter[str] = collections.Counter()
    total = 0
    for line in path.read_text(errors="replace").splitlines():
        stack, _, count = line.rpartition(" ")
        if not count.isdigit():
            continue
        frames = stack.split(";")
        if idle(frames[-1]):
            continue
        idx = next((i for i, f in enumerate(frames) if f.startswith(func + " (")), None)
        if idx is None:
            continue
        n = int(count)
        total += n
        here = frames[idx].rsplit(":", 1)[-1].rstrip(")")
        callee = frames[idx + 1].split(" (")[0] if idx + 1 < len(frames) else "(self)"
        lines[f"line {here}: {callee}"] += n
    return total, lines


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
        if idle(leaf):
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
    for func in BREAKDOWN:
        sub, lines = by_line(path, func)
        if sub:
            out += ["", f"under {func} ({100 * sub / total:.1f} % of busy samples), by line:"]
            out += [f"  {100 * n / total:5.1f} %  {k}" for k, n in lines.most_common(12)]
    return "\n".join(out) + "\n"
