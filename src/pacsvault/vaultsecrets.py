"""A vault's named secrets: random keys the server makes once and keeps, wrapped by the
master key (``keys.wrap_secret``: rotation re-wraps them in one place).

Apart from ``vault`` (which composes it) to keep that module small. Two homes: this data
directory's ``vault.json["secrets"]``, and, for the deployment-wide ones
(``deployment_state.SHARED_SECRETS``: what they key is read by every instance), the index,
sealed, so that several data directories on one index agree.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

from sqlalchemy.orm import Session, sessionmaker

from pacsvault import vaultfile
from pacsvault.crypto import keys
from pacsvault.index import deployment_state


class NamedSecrets:
    def __init__(self, meta: Path, master: keys.MasterKey, vault_id: str,
                 sessions: sessionmaker[Session]) -> None:
        self._meta, self._master, self._vault_id = meta, master, vault_id
        self._sessions = sessions
        self.lock = threading.Lock()  # also held by a key rotation (``crypto.rotation``)
        self._shared: dict[str, bytes] = {}  # deployment-wide, from the index
        # The "secrets" table as last read, with the update generation and the file's
        # signature then: an open asks for several named secrets and reads the file once.
        self._cache: tuple[int, tuple[int, ...], object] | None = None

    def get(self, name: str, *, size: int = 32) -> bytes:
        """``name``, made at random on first use. A deployment-wide one's first use takes
        ``vault.json``'s value if this directory has one (a vault from before), else a
        random one; the index keeps whichever value it was given first."""
        if name in deployment_state.SHARED_SECRETS:
            cached = self._shared.get(name)
            if cached is None:
                offer = self.file_secret(name) or os.urandom(size)
                cached = deployment_state.agree_secret(self._sessions, name, offer)
                self._shared[name] = cached
            return cached
        with self.lock:
            found = self._unwrapped(name)
            if found is not None:
                return found
            secret = os.urandom(size)
            self._put(name, secret)
            return secret

    def file_secret(self, name: str) -> bytes | None:
        """``name`` as this data directory's ``vault.json`` holds it, None if absent (the
        value a shared secret had before it moved to the index)."""
        with self.lock:
            return self._unwrapped(name)

    def set(self, name: str, secret: bytes) -> None:
        """Store or replace a named secret whose value is not random: the backup
        repositories' recovery password, derived from the recovery code (issue 14)."""
        if name in deployment_state.SHARED_SECRETS:
            deployment_state.replace_secret(self._sessions, name, secret)
            self._shared[name] = secret
            return
        with self.lock:
            self._put(name, secret)

    def publish_shared(self) -> None:
        """This directory's deployment-wide secrets from before they moved to the index
        (``vault.json``), offered at open: the index keeps the first value it was given, so
        an upgraded vault keeps its keys whichever instance uses them first."""
        for name in sorted(deployment_state.SHARED_SECRETS):
            local = self.file_secret(name)
            if local is not None and name not in self._shared:
                self._shared[name] = deployment_state.agree_secret(self._sessions, name,
                                                                   local)

    def _unwrapped(self, name: str) -> bytes | None:
        stored = self._table()
        if isinstance(stored, dict) and isinstance(stored.get(name), str):
            return keys.unwrap_secret(self._master, self._vault_id, name, stored[name])
        return None

    def _put(self, name: str, secret: bytes) -> None:
        blob = keys.wrap_secret(self._master, self._vault_id, name, secret)

        def put(meta: dict[str, object]) -> None:
            table = meta.setdefault("secrets", {})
            assert isinstance(table, dict)
            table[name] = blob

        vaultfile.update(self._meta, put)

    def _table(self) -> object:
        """``vault.json``'s "secrets", read again only after a ``vaultfile.update`` of
        this process or a replacement of the file by another process."""
        seen, cached = vaultfile.signature(self._meta), self._cache
        if cached is not None and seen is not None and cached[:2] == (vaultfile.generation(), seen):
            return cached[2]
        generation, table = vaultfile.generation(), _read(self._meta).get("secrets")
        if seen is not None and seen == vaultfile.signature(self._meta):
            self._cache = (generation, seen, table)
        return table


def _read(meta: Path) -> dict[str, object]:
    """``vault.json`` read whole (its own function: a test counts the reads)."""
    return vaultfile.read(meta)
