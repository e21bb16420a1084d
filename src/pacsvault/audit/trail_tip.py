"""The end of the trail file as an appender finds it: read back, checked, repaired.

Why: before its first record (and whenever the file is not exactly as this process left
it) an appender must know where the chain goes on from, and whether what it finds there
is what the index anchored. That is this module: the last whole record read backwards
from the end (``read_tip``), the bytes a cut write left after it (the ``region``), the
check of that record against the anchor and its signature (``check_head``: flags a
mismatch for good), and the signed ``repair`` record describing a cut write
(``repair_body``). The appender (``trail.AuditTrail._append_locked``) holds the locks and
writes; nothing here writes to the file.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from sqlalchemy import Connection, Table, select, update

from pacsvault.audit import instances
from pacsvault.audit.trail_format import (
    FORMAT,
    GENESIS,
    ROTATED_ACTION,
    Tip,
    parse_line,
    public_of,
    raw_hex,
    record_hash,
    tip_of,
)
from pacsvault.index.models import AuditHead

_heads = cast(Table, AuditHead.__table__)
_READ_ANCHOR = "SELECT seq, digest, broken FROM audit_head WHERE instance = ?"


def file_identity(fd: int) -> tuple[int, int, int, int]:
    """(inode, size, mtime, ctime): the file is exactly as an append left it when equal."""
    st = os.fstat(fd)
    return st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns


def read_tip(path: Path, anchor: Callable[[], tuple[int, str] | None]) -> Tip:
    """The last whole record and whatever follows it, read backwards from the end.

    A line that is not JSON after the last record is the trace of a write that was cut
    (disk full, crash): it is the ``region`` a repair record will describe. ``anchor``
    gives the seq to go on from when that record is too damaged to say its own.
    """
    if not path.exists():
        return Tip(0, GENESIS, "", None, b"", b"", False)
    with open(path, "rb") as fh:
        pos = fh.seek(0, os.SEEK_END)
        block = b""
        while True:
            step = min(65536, pos)
            pos -= step
            fh.seek(pos)
            block = fh.read(step) + block
            pieces = block.split(b"\n")
            lowest = 0 if pos == 0 else 1  # the first piece may be a partial line
            for i in range(len(pieces) - 1, lowest - 1, -1):
                body = parse_line(pieces[i])
                if body is None:
                    continue
                region = b"\n".join(pieces[i + 1:])
                needs_newline = i == len(pieces) - 1
                return tip_of(body, region, needs_newline, anchor)
            if pos == 0:
                return Tip(0, GENESIS, "", None, b"", block, False)


def signed(public: Ed25519PublicKey, body: dict[str, Any] | None, sig: bytes) -> bool:
    """Whether ``body`` is signed by ``public`` (or, for the record handing over to it, by
    the key before it)."""
    if body is None:
        return True
    key = public
    detail = body.get("detail")
    if (body.get("action") == ROTATED_ACTION and isinstance(detail, dict)
            and detail.get("new_signing_key") == raw_hex(public)):
        # the last record hands over to our key: signed by the key before it (the full
        # verification checks that key against the records before)
        key = public_of(detail.get("old_signing_key")) or key
    try:
        key.verify(sig, bytes.fromhex(record_hash(body)))
    except (InvalidSignature, ValueError):
        return False
    return True


def check_head(conn: Connection, instance: str, public: Ed25519PublicKey, tip: Tip) -> str:
    """Compare the file's last record with the anchor and its signature; flag (once,
    for good) and return a mismatch."""
    head = read_head(conn, instance)
    if head is None or head.broken:
        return ""
    problem = ""
    if not signed(public, tip.body, tip.sig):
        problem = (f"record {tip.seq}, the last one in the file, was altered or forged: "
                   "its signature does not match")
    elif tip.seq < head.seq:
        problem = (f"the trail ended at record {tip.seq} when record {head.seq} had "
                   "been written: records were removed")
    elif tip.seq == head.seq and tip.chain != head.digest:
        problem = f"record {tip.seq} differs from the one anchored in the index"
    if problem:
        conn.execute(update(_heads).where(_heads.c.instance == instance)
                     .values(broken=problem))
    return problem


def read_head(conn: Connection, instance: str) -> Any:
    """``instances.read_head``; on the embedded index straight to the driver: with
    ``serve --workers`` every store batch that follows the other worker's reads it
    (issue 17: through SQLAlchemy's select it was half of that check's time)."""
    if conn.dialect.name != "sqlite":
        return instances.read_head(conn, instance)
    cursor = conn.connection.cursor()
    try:
        row = cursor.execute(_READ_ANCHOR, (instance,)).fetchone()
    finally:
        cursor.close()
    return (None if row is None
            else instances.AnchorRow(int(row[0]), str(row[1]), str(row[2] or "")))


def repair_body(conn: Connection, instance: str, tip: Tip, seq: int,
                time: str) -> dict[str, Any]:
    """The (unsigned) ``repair`` record describing the bytes a cut write left after
    ``tip``, and any whole records the anchor says are missing."""
    cut = tip.region[:-1] if tip.region.endswith(b"\n") else tip.region
    head = conn.execute(select(_heads.c.seq).where(_heads.c.instance == instance)).first()
    anchored = int(head.seq) if head is not None else 0
    lost = max(0, anchored - tip.seq)
    message = ("a write to the trail was cut short (disk full, I/O error or crash); the "
               "incomplete bytes were left in place and are described here")
    if lost:
        message += (f"; record {anchored} had been written: {lost} whole record(s) are "
                    "missing, which is not a cut write")
    return {
        "v": FORMAT, "seq": seq, "prev": tip.chain, "time": time, "kind": "repair",
        "action": "audit.repair", "outcome": "success" if not lost else "major_failure",
        "code": "110100", "ae": "", "address": "", "user": "", "message": message,
        "detail": {"cut_bytes": len(cut), "cut_sha256": hashlib.sha256(cut).hexdigest(),
                   "cut_lines": cut.count(b"\n") + 1, "after_seq": tip.seq,
                   "anchored_seq": anchored, "records_lost": lost},
    }
