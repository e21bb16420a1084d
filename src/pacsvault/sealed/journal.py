"""The sealed journals: what the index and the trail would have received, kept encrypted.

``DATA/sealed/journal/<session>.stores`` and ``<session>.events``: one file of each per
sealed run (a restart after kill -9 opens a new session and leaves the old files for the
merge). Each record is ``length (4 bytes, big-endian) || HPKE ciphertext`` (RFC 9180 base
mode, single shot: a 32-byte encapsulated key, then AES-256-GCM), sealed to the vault's
sealed-mode public key with ``info = "pacsvault-sealed-journal/1:<session>:<kind>:<seq>"``:
without the private key (wrapped by the master key) nothing in them is readable, and a
record moved to another place or order does not open. A record counts once its write is
fsync'ed: the C-STORE response is sent after that, so an acknowledged image survives
kill -9. A record cut short by a crash (never acknowledged) is ignored when reading.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import secrets
import struct
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import hpke
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey

from pacsvault.fsutil import fsync_dir, write_durably

log = logging.getLogger("pacsvault.sealed")

JOURNAL_DIR = "journal"
STORES = "stores"
EVENTS = "events"
_INFO = "pacsvault-sealed-journal/1"
_MAX_RECORD = 64 << 20


class JournalError(Exception):
    """A journal record does not open with this vault's key (message is user-facing)."""


def _suite() -> hpke.Suite:
    return hpke.Suite(hpke.KEM.X25519, hpke.KDF.HKDF_SHA256, hpke.AEAD.AES_256_GCM)


def _info(session: str, kind: str, seq: int) -> bytes:
    return f"{_INFO}:{session}:{kind}:{seq}".encode("ascii")


def journal_dir(sealed_root: Path) -> Path:
    return sealed_root / JOURNAL_DIR


def new_session() -> str:
    """Sortable by start time, unique: ``20261204T191500Z-1a2b3c4d``."""
    now = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%S%fZ")
    return f"{now}-{secrets.token_hex(4)}"



class JournalWriter:
    """Appends HPKE-sealed JSON records to one file, fsync'ed one by one."""

    def __init__(self, directory: Path, session: str, kind: str,
                 public: X25519PublicKey) -> None:
        self._dir = directory
        self.session = session
        self.kind = kind
        self._public = public
        self.path = directory / f"{session}.{kind}"
        self._lock = threading.Lock()
        self._seq = 0
        self._fd: int | None = None

    def append(self, record: dict[str, Any]) -> None:
        plain = json.dumps(record, separators=(",", ":"), sort_keys=True).encode("utf-8")
        with self._lock:
            sealed = _suite().encrypt(plain, self._public,
                                      info=_info(self.session, self.kind, self._seq))
            if self._fd is None:
                fresh = not self._dir.is_dir()
                self._dir.mkdir(parents=True, exist_ok=True, mode=0o700)
                if fresh:
                    fsync_dir(self._dir.parent)
                self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
                fsync_dir(self._dir)  # the file's name is durable with its first record
            data = struct.pack(">I", len(sealed)) + sealed
            write_durably(self._fd, [data])
            self._seq += 1

    def close(self) -> None:
        with self._lock:
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None


def sessions(directory: Path) -> list[str]:
    """Every session with a journal file, oldest first."""
    if not directory.is_dir():
        return []
    found = {p.name.rsplit(".", 1)[0] for p in directory.iterdir()
             if p.suffix in (f".{STORES}", f".{EVENTS}") and not p.name.startswith(".")}
    return sorted(found)


def pending(directory: Path) -> bool:
    return bool(sessions(directory))


def read(directory: Path, session: str, kind: str, private: X25519PrivateKey,
         on_damaged: Callable[[int], None] | None = None) -> Iterator[dict[str, Any]]:
    """The records in order. One that does not open raises ``JournalError``, or, with
    ``on_damaged``, is reported (its number) and skipped: a damaged record must not keep
    every other acknowledged image out of the index for good."""
    path = directory / f"{session}.{kind}"
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return
    offset = seq = 0
    while offset < len(data):
        if offset + 4 > len(data):
            log.warning("sealed journal %s: a record cut short by a crash was ignored "
                        "(never acknowledged)", path.name)
            return
        (length,) = struct.unpack(">I", data[offset:offset + 4])
        if length > _MAX_RECORD or offset + 4 + length > len(data):
            log.warning("sealed journal %s: a record cut short by a crash was ignored "
                        "(never acknowledged)", path.name)
            return
        blob = data[offset + 4:offset + 4 + length]
        offset += 4 + length
        seq += 1
        try:
            value = json.loads(_suite().decrypt(blob, private,
                                                info=_info(session, kind, seq - 1)))
            if not isinstance(value, dict):
                raise ValueError("not an object")
        except Exception:
            if on_damaged is None:
                raise JournalError(f"sealed journal {path.name}: record {seq - 1} does not "
                                   "open with this vault's key (damaged or tampered "
                                   "with)") from None
            on_damaged(seq - 1)
            continue
        yield value


def remove(directory: Path, session: str) -> None:
    for kind in (STORES, EVENTS):
        (directory / f"{session}.{kind}").unlink(missing_ok=True)
    if directory.is_dir():
        fsync_dir(directory)
