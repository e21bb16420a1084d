"""The trail's last records, for pages that show recent activity (sign-ins, security events).

Only the last ``window`` bytes of ``trail.jsonl`` are read (a page view must not scan a year
of trail). These records are shown, not trusted: nothing here checks the chain or the
signatures (``pacsvault audit verify`` does). No key is needed: the fields a page shows
(time, actor, action, outcome, address) are the readable part of each record.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

TRAIL_WINDOW = 512 * 1024


def tail_records(trail: Path, window: int = TRAIL_WINDOW) -> list[dict[str, Any]]:
    """The trail's last records (parsed JSON, not verified), newest first."""
    try:
        with open(trail, "rb") as fh:
            size = fh.seek(0, 2)
            start = max(0, size - window)
            fh.seek(start)
            data = fh.read()
    except OSError:
        return []
    lines = data.split(b"\n")
    if start > 0:
        lines = lines[1:]  # the first one is cut
    found: list[dict[str, Any]] = []
    for line in reversed(lines):
        try:
            body = json.loads(line)
        except ValueError:
            continue
        if isinstance(body, dict):
            found.append(body)
    return found
