"""Trail retention: the oldest records replaced by one signed ``seal`` record.

Why its own module: it is the only code that rewrites the trail file instead of appending
to it. The seal keeps the hash of the last removed record (so the chain still verifies
from the seal on) and a digest of the removed lines; the file is replaced by rename, and
the caller holds the trail's lock file (a separate file, so no other process appends to
the replaced one).
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import json
import os
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from pacsvault.audit.trail_format import FORMAT, GENESIS, canonical, parse_line, record_hash
from pacsvault.fsutil import write_durably


def seal_before(path: Path, signer: Ed25519PrivateKey, cutoff: dt.datetime,
                reason: str) -> int:
    """Replace records older than ``cutoff`` by one signed seal; returns how many.
    The caller holds the trail exclusively."""
    cutoff_text = cutoff.astimezone(dt.UTC).isoformat(timespec="microseconds")
    lines = path.read_bytes().splitlines()
    old: list[bytes] = []
    for line in lines:
        body = parse_line(line)
        if body is None:
            break  # a torn run stays, with the repair record that describes it
        if body.get("kind") == "seal" or str(body["time"]) < cutoff_text:
            old.append(line)
        else:
            break
    purged = [ln for ln in old if json.loads(ln).get("kind") != "seal"]
    if not purged:
        return 0
    last = json.loads(old[-1])
    last.pop("sig")
    first = json.loads(old[0])
    earlier = first["detail"] if first.get("kind") == "seal" else {}
    seal: dict[str, Any] = {
        "v": FORMAT, "seq": int(last["seq"]), "prev": GENESIS,
        "time": str(last["time"]), "kind": "seal", "action": "audit.retention",
        "outcome": "success", "code": "110101", "ae": "", "address": "", "user": "",
        "message": reason,
        "detail": {
            "sealed_records": len(purged) + int(earlier.get("sealed_records", 0)),
            "first_sealed_seq": int(earlier.get("first_sealed_seq", first["seq"])),
        },
        "sealed_last_hash": (
            str(last["sealed_last_hash"]) if last.get("kind") == "seal" else record_hash(last)
        ),
        "sealed_digest": hashlib.sha256(b"\n".join(old)).hexdigest(),
    }
    seal["sig"] = base64.b64encode(signer.sign(bytes.fromhex(record_hash(seal)))).decode()
    rest = lines[len(old):]
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        write_durably(fd, [b"\n".join([canonical(seal), *rest]) + b"\n"])
    finally:
        os.close(fd)
    os.replace(tmp, path)
    return len(purged)
