"""The bench's memory sampler (``bench/compare/procs.RssSampler``, issue 17): the peak
RSS sum over a process tree counts a page the processes share once per process, the
peak PSS sum counts it once. A real tree shows it: a parent maps 32 MB of shared memory,
touches it, and forks two children that read every page of it."""

from __future__ import annotations

import os
import subprocess
import sys
import time

from bench.compare.procs import RssSampler, pss_bytes

SHARED = 32 << 20
TREE = f"""
import mmap, os, sys, time
area = mmap.mmap(-1, {SHARED})  # anonymous and shared: the children see the same pages
area.write(b"x" * {SHARED})
kids = []
done_r, done_w = os.pipe()
for _ in range(2):
    pid = os.fork()
    if pid == 0:
        sum(area[i] for i in range(0, {SHARED}, 4096))  # mapped in this child's page table
        os.write(done_w, b"r")
        time.sleep(30)
        os._exit(0)
    kids.append(pid)
got = b""
while len(got) < 2:  # both children have read it
    got += os.read(done_r, 2)
print("ready", flush=True)
sys.stdin.read()  # until the test closes it
for pid in kids:
    os.kill(pid, 9)
    os.waitpid(pid, 0)
"""


def test_pss_of_a_process_is_at_most_its_rss() -> None:
    pss = pss_bytes(os.getpid())
    assert pss is not None and pss > 0
    assert pss_bytes(2**22 + 12345) is None  # no such process: None, no error


def test_the_tree_peaks_count_shared_pages_once_per_process_and_once() -> None:
    proc = subprocess.Popen([sys.executable, "-c", TREE], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
        with RssSampler(proc.pid, period=0.05) as sampler:
            time.sleep(0.3)
        # RSS: the 32 MB in each of the three processes; PSS: a third in each
        assert sampler.peak >= 3 * SHARED
        assert SHARED <= sampler.pss_peak <= sampler.peak - SHARED
    finally:
        assert proc.stdin is not None
        proc.stdin.close()
        proc.wait(30)
