"""Per-patient data keys, created on first sight of a patient and cached unwrapped in memory."""

from __future__ import annotations

import threading
import uuid
from typing import Protocol

from sqlalchemy.orm import Session

from pacsvault.crypto import datakeys


class KeyDestroyed(Exception):
    """The data key was crypto-shredded: the objects under it are gone for good."""


class WrappedKeys(Protocol):
    """Where wrapped data keys are kept (the index's ``data_keys`` rows:
    ``index.keyrows.DataKeyRows``). Why a protocol: crypto sits below the index and must
    not import its ORM; the keyring only needs these three operations."""

    def has(self, session: Session, key_id: uuid.UUID) -> bool: ...

    def wrapped(self, session: Session, key_id: uuid.UUID) -> bytes | None: ...

    def add(self, session: Session, key_id: uuid.UUID, wrapped: bytes) -> None: ...


class Keyring:
    def __init__(self, kek: bytes, store: WrappedKeys) -> None:
        self._kek = kek
        self._store = store
        self._also: bytes | None = None  # a key rotation's next KEK (``also_accept``)
        self._cache: dict[uuid.UUID, bytes] = {}
        self._lock = threading.Lock()

    def create(self, session: Session) -> uuid.UUID:
        """Add a new wrapped data key to the session's transaction."""
        key_id, key = datakeys.new_data_key()
        self._store.add(session, key_id, datakeys.wrap(self._kek, key_id, key))
        with self._lock:
            self._cache[key_id] = key
        return key_id

    def mint(self) -> tuple[uuid.UUID, bytes]:
        """A new data key, *not* stored: the caller inserts its row (``wrap``) in the
        transaction that first uses it (the archive's group commit, so a new patient
        costs no transaction of its own). Cached like ``create``'s."""
        key_id, key = datakeys.new_data_key()
        with self._lock:
            self._cache[key_id] = key
        return key_id, key

    def wrap(self, key_id: uuid.UUID, key: bytes) -> bytes:
        """A minted key's row value under the KEK *of the moment*: called inside the
        commit that writes it (the archive's write lock, which a key rotation holds), never
        earlier — a key wrapped before a rotation and written after it would be wrapped
        under the retired KEK and open with nothing."""
        with self._lock:
            return datakeys.wrap(self._kek, key_id, key)

    def adopt(self, session: Session, key_id: uuid.UUID, key: bytes) -> None:
        """Add a data key made elsewhere (sealed mode: it arrived HPKE-wrapped) under this
        vault's KEK, as an ordinary algorithm-1 key; nothing if it is there already."""
        if not self._store.has(session, key_id):
            self._store.add(session, key_id, datakeys.wrap(self._kek, key_id, key))
        with self._lock:
            self._cache[key_id] = key

    def cached(self, key_id: uuid.UUID) -> bytes | None:
        """The data key if it is held already (no index read), else None."""
        with self._lock:
            return self._cache.get(key_id)

    def get(self, session: Session, key_id: uuid.UUID) -> bytes:
        with self._lock:
            cached = self._cache.get(key_id)
        if cached is not None:
            return cached
        wrapped = self._store.wrapped(session, key_id)
        if wrapped is None:
            raise KeyDestroyed(f"data key {key_id} was destroyed")
        try:
            key = datakeys.unwrap(self._kek, key_id, wrapped)
        except datakeys.DataKeyError:
            if self._also is None:
                raise
            key = datakeys.unwrap(self._also, key_id, wrapped)
        with self._lock:
            self._cache[key_id] = key
        return key

    def forget(self, key_id: uuid.UUID) -> None:
        with self._lock:
            self._cache.pop(key_id, None)

    def also_accept(self, kek: bytes) -> None:
        """During a master key rotation: rows already re-wrapped open with ``kek``."""
        self._also = kek

    def replace_kek(self, kek: bytes) -> None:
        """The rotation is done: wrap and unwrap with ``kek`` only; no unwrapped key of
        the old hierarchy stays cached."""
        with self._lock:
            self._kek, self._also = kek, None
            self._cache.clear()

    def forget_all(self) -> None:
        """Drop every unwrapped key: after a removal one of them may have been destroyed
        (crypto-shredded), and it must not live on in this process's memory."""
        with self._lock:
            self._cache.clear()
