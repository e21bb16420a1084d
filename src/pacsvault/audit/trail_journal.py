"""A store batch's record made durable by the index's commit (issue 17), on the embedded index.

Why: each store batch wrote its record to the trail and fsync'ed it, then committed the
index's WAL, a second fsync, both under the one writer every other store waits for (the
"commit chain": half of an association's cycle in the profile of bench/RESULTS.md). Here
the batch's lines, and every line this process wrote before them since the trail's last
fsync, are also written into the index (``audit_lines``, the table a shared index keeps
its copies in, empty otherwise) in the transaction that commits the rows and moves the
anchor: that one WAL fsync makes the record durable. The trail file gets the same bytes
at the same moment (every reader sees them at once, in order) and its own fsync later
(the flusher, within ``DEFER_SECONDS``, or the next synced append of any process), after
which the rows are pruned.

Never weaker: the record is durable before any store it names is acknowledged (in the
index, which a crash keeps as it keeps the rows); the anchor never names a line that is
durable nowhere. A power loss can take the file's unsynced tail; the next append, the
server's start (``repair_at_start``) or ``audit verify`` first puts those lines back,
byte for byte, from the index (``restore``), and only then checks the file against the
anchor. A torn tail that is not a prefix of those bytes is not completed: the usual
repair record and truncation alarm follow, as for any other damage.

Only when the chain under the batch is known durable or journaled: the file exactly as
this process left it, and nothing unsynced of another process under it (``trail``
otherwise writes the batch's record with its own fsync, as before).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from sqlalchemy import Connection

from pacsvault.audit.trail_format import Tip, parse_line

log = logging.getLogger("pacsvault.audit")

_INSERT = "INSERT OR REPLACE INTO audit_lines (instance, seq, line) VALUES (?, ?, ?)"
_PRUNE = "DELETE FROM audit_lines WHERE instance = ? AND seq <= ?"
_AFTER = "SELECT seq, line FROM audit_lines WHERE instance = ? AND seq > ? ORDER BY seq"


def _cursor(conn: Connection) -> Any:
    return conn.connection.cursor()


def insert(conn: Connection, instance: str, lines: Sequence[tuple[int, bytes]]) -> None:
    """``lines`` (seq, line with its newline) into the index, in ``conn``'s transaction.
    A seq already there is replaced by the same bytes (a batch retried)."""
    cursor = _cursor(conn)
    try:
        cursor.executemany(_INSERT, [(instance, seq, line[:-1].decode("ascii"))
                                     for seq, line in lines])
    finally:
        cursor.close()


def prune(driver: Any, instance: str, upto: int) -> None:
    """Forget the lines up to ``upto``: the trail file holds them, fsync'ed. ``driver``:
    the DB-API connection of the anchor's transaction."""
    driver.execute(_PRUNE, (instance, upto))


def restore_bytes(conn: Connection, instance: str, tip: Tip) -> tuple[bytes, int]:
    """What to append after the file's ``tip`` to put back the lines only the index holds
    (a power loss took them from the file), and how many records that is; (b"", 0) when
    there are none, or when they do not continue the file exactly (their first line does
    not chain to the tip, the seqs have a gap, or the torn bytes after the tip are not the
    beginning of those lines): that damage is reported as any other."""
    cursor = _cursor(conn)
    try:
        rows = cursor.execute(_AFTER, (instance, tip.seq)).fetchall()
    finally:
        cursor.close()
    if not rows:
        return b"", 0
    seqs = [int(seq) for seq, _line in rows]
    first = parse_line(str(rows[0][1]).encode("ascii"))
    if (seqs != list(range(tip.seq + 1, tip.seq + 1 + len(rows))) or first is None
            or first.get("prev") != tip.chain):
        log.error("audit trail: %d record(s) held in the index do not continue the file "
                  "(after record %d); not restored", len(rows), tip.seq)
        return b"", 0
    data = b"".join(str(line).encode("ascii") + b"\n" for _seq, line in rows)
    if tip.needs_newline:  # the tip's own newline was cut
        return b"\n" + data, len(rows)
    if not data.startswith(tip.region):
        log.error("audit trail: the bytes after record %d are not the beginning of the "
                  "%d record(s) held in the index; not restored", tip.seq, len(rows))
        return b"", 0
    return data[len(tip.region):], len(rows)
