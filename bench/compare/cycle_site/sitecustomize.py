"""Marks for ``bench.compare.cycle`` (issue 17), imported by the measured ``serve`` process
at start when ``PV_CYCLE_OUT`` names a file; nothing otherwise. Not product code.

Each mark is (name, ``perf_counter_ns``), appended under a lock: ``pdu`` (the DUL thread
starts reading a PDU), ``deliver`` (a complete C-STORE request handed to the association
thread), ``store0``/``store1`` (``Archive.store``), ``parse``, ``desc`` (describe), ``stg``
(encrypt, hash, write), ``commit``, ``rec`` (the store record, with its fsync), ``ofs``/``xfs``
(an fsync on a stage worker / any other thread), each with 0 (start) and 1 (end), and
``resp`` (a response of under 400 bytes written). Flushed as one JSON line per ~2,000.
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Callable
from typing import Any

_marks: list[tuple[str, int]] = []
_lock = threading.Lock()
_OUT = os.environ.get("PV_CYCLE_OUT", "")


def _mark(name: str) -> None:
    with _lock:
        _marks.append((name, time.perf_counter_ns()))
        if name == "resp" and len(_marks) >= 2000:
            with open(_OUT, "a") as f:
                f.write(json.dumps(_marks) + "\n")
            _marks.clear()


def _wrap(owner: Any, attr: str, before: str, after: str | None = None,
          when: Callable[..., bool] | None = None) -> None:
    original = getattr(owner, attr)

    def marked(*args: Any, **kwargs: Any) -> Any:
        if before:
            _mark(before)
        try:
            return original(*args, **kwargs)
        finally:
            if after and (when is None or when(*args, **kwargs)):
                _mark(after)

    setattr(owner, attr, marked)


def _small(_sock: Any, pieces: list[bytes | memoryview], *_: Any) -> bool:
    return sum(len(p) for p in pieces) < 400


def _install() -> None:
    from pacsvault.audit import stores
    from pacsvault.dicom import reactor, sendpath
    from pacsvault.dicomfile import parse
    from pacsvault.storage import archive

    _wrap(reactor.WakeableDUL, "_read_pdu_data", "pdu")
    _wrap(reactor.WakeableDUL, "_pv_deliver", "deliver")
    _wrap(archive.Archive, "store", "store0", "store1")
    _wrap(parse, "read_received", "parse0", "parse1")
    _wrap(parse, "describe", "desc0", "desc1")
    _wrap(archive.Archive, "_stage", "stg0", "stg1")
    _wrap(archive.Archive, "_commit", "commit0", "commit1")
    _wrap(stores.JournalBatch, "write", "rec0", "rec1")
    _wrap(sendpath, "_send_gathered", "", "resp", _small)
    _wrap(sendpath, "_send_joined", "", "resp", _small)
    fsync = os.fsync

    def marked_fsync(fd: Any) -> None:
        tag = "o" if threading.current_thread().name.startswith("archive-stage") else "x"
        _mark(tag + "fs0")
        try:
            fsync(fd)
        finally:
            _mark(tag + "fs1")

    os.fsync = marked_fsync


if _OUT:
    _install()
