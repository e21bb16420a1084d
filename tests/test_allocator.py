"""glibc's fixed mmap threshold for the serving processes (``cli/allocator``, issue 17:
peak RSS during ingest): what it sets and that glibc then really hands a large freed
buffer back. Behaviour, not timings: after a 10 MB block was freed, glibc by default
serves the next 2 MB block from its heap (``mallinfo2().hblkhd``, the bytes in mmapped
blocks, does not grow); with the fixed 1 MiB threshold that block is mmapped (and
unmapped at ``free``). Each case runs in a fresh interpreter: the setting is per process.
The workers' environment is checked on a running ``serve --workers 2`` in
tests/test_serve_lean_parent.py."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from pacsvault.cli import allocator

PROBE = """
import ctypes, sys
from pacsvault.cli import allocator
class Info(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks",
                "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]
libc = ctypes.CDLL(None)
libc.mallinfo2.restype = Info
tuned = allocator.tune() if sys.argv[1] == "tune" else False
big = bytearray(10_000_000)
del big  # the default raises the threshold to ~10 MB here
before = libc.mallinfo2().hblkhd
mid = bytearray(2_000_000)
print(int(tuned), libc.mallinfo2().hblkhd - before)
"""

glibc = pytest.mark.skipif(not allocator._glibc(), reason="glibc's allocator only")


def _probe(env: dict[str, str] | None = None, tune: bool = True) -> tuple[bool, int]:
    base = {k: v for k, v in os.environ.items() if k != allocator.ENV}
    done = subprocess.run([sys.executable, "-c", PROBE, "tune" if tune else "no"],
                          capture_output=True, text=True,
                          env={**base, **(env or {})}, timeout=60)
    assert done.returncode == 0, done.stderr[-2000:]
    tuned, grew = done.stdout.split()
    return tuned == "1", int(grew)


def test_worker_env_adds_the_threshold_but_keeps_the_administrators() -> None:
    assert allocator.worker_env({"PATH": "/bin"}) == {
        "PATH": "/bin", allocator.ENV: str(allocator.MMAP_THRESHOLD)}
    assert allocator.worker_env({allocator.ENV: "4194304"})[allocator.ENV] == "4194304"


@glibc
def test_by_default_a_2_mb_block_comes_from_the_heap_after_a_10_mb_one() -> None:
    # the baseline the setting changes: if glibc stopped doing this, the setting is moot
    assert _probe(tune=False) == (False, 0)


@glibc
def test_tune_gives_large_blocks_back_in_a_one_process_serve() -> None:
    tuned, grew = _probe()
    assert tuned
    assert grew >= 2_000_000


@glibc
def test_the_workers_environment_does_the_same_without_mallopt() -> None:
    tuned, grew = _probe(allocator.worker_env({}))
    assert not tuned  # glibc read it at start: nothing to do, and nothing overridden
    assert grew >= 2_000_000
