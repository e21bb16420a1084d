"""glibc's allocator settings for the serving processes (issue 17: peak RSS during ingest).

Why: glibc's ``malloc`` serves a block of 128 KB or more with its own ``mmap`` and
returns it to the system on ``free``, but it then *raises* that threshold to the size of
the block just freed (up to 32 MB). After the first large image (a 10 MB CR: the received
bytes, the parsed element, the ciphertext...) every later buffer of that size comes from
the heap arenas, which keep the freed pages: measured on the bench's mix with 20 CR
images over 4 associations, each worker ended ingest ~45 MB above where it started and
the process tree's peak RSS was 30-50 MB higher than with a fixed threshold, for no CPU
we could measure (a 10 MB copy pays ~4 % more in page faults). A fixed threshold of 1 MiB
(``M_MMAP_THRESHOLD``, which also stops the dynamic adjustment) gives large buffers back
as soon as they are freed; CT slices (~0.5 MB) and everything smaller keep coming from
the heap as before.

Workers get it as glibc's ``MALLOC_MMAP_THRESHOLD_`` environment variable (in force from
their first allocation); a one-process ``serve`` sets it with ``mallopt`` as it starts
serving. A value the administrator set (the service unit's ``Environment=``) wins.
Standard library only: the lean supervisor imports this module.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

MMAP_THRESHOLD = 1 << 20
ENV = "MALLOC_MMAP_THRESHOLD_"
_M_MMAP_THRESHOLD = -3  # <malloc.h>


def worker_env(environ: Mapping[str, str]) -> dict[str, str]:
    """The environment a worker is started with: ``environ`` plus the threshold, unless
    ``environ`` already names one."""
    env = dict(environ)
    env.setdefault(ENV, str(MMAP_THRESHOLD))
    return env


def _glibc() -> bool:
    try:
        return os.confstr("CS_GNU_LIBC_VERSION") is not None
    except (ValueError, OSError):
        return False


def tune() -> bool:
    """Set the fixed threshold in this process (glibc only); whether it was set here.

    Not when the environment names one: glibc read it when the process started (a worker,
    or the administrator's own value)."""
    if ENV in os.environ or not _glibc():
        return False
    import ctypes  # only here: the supervisor never needs it

    libc = ctypes.CDLL(None)
    mallopt = libc.mallopt
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    return bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD))
