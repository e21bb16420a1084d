"""The syslog export queue shared by several serve workers (issue 16, part 4): a worker
starting while another writes a record must not delete that record's half-written file."""

from __future__ import annotations

import fcntl
import os
import threading
from pathlib import Path

import pytest

from pacsvault.audit.syslog.queue import SyslogQueue

pytestmark = pytest.mark.quick


def test_a_starting_queue_waits_for_a_writer_before_sweeping_parts(tmp_path: Path) -> None:
    root = tmp_path / "queue"
    SyslogQueue(root, b"k" * 32).close()
    # another process in the middle of ``put``: queue lock held, its part on disk
    fd = os.open(root / "queue.lock", os.O_RDWR)
    fcntl.flock(fd, fcntl.LOCK_EX)
    part = root / f"{1:020d}.99999.part"
    part.write_bytes(b"half-written")
    opened: list[SyslogQueue] = []
    starting = threading.Thread(target=lambda: opened.append(SyslogQueue(root, b"k" * 32)))
    starting.start()
    starting.join(0.5)
    assert starting.is_alive() and part.exists()  # waits for the writer
    fcntl.flock(fd, fcntl.LOCK_UN)  # the writer is gone without publishing: now stale
    os.close(fd)
    starting.join(10)
    assert not starting.is_alive() and not part.exists()
    opened[0].close()
