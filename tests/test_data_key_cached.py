"""``Archive.data_key`` answers a held key without opening a session (issue 17: retrieval
asks once per object), and still reads the index for a key not held, or no longer held
(a shredded key is refused, not served from anywhere)."""

from __future__ import annotations

import uuid
from typing import Any

import pytest

from pacsvault.crypto.keyring import KeyDestroyed, Keyring


class _Store:
    def __init__(self) -> None:
        self.rows: dict[uuid.UUID, bytes | None] = {}
        self.reads = 0

    def has(self, session: Any, key_id: uuid.UUID) -> bool:
        return key_id in self.rows

    def wrapped(self, session: Any, key_id: uuid.UUID) -> bytes | None:
        self.reads += 1
        return self.rows.get(key_id)

    def add(self, session: Any, key_id: uuid.UUID, wrapped: bytes) -> None:
        self.rows[key_id] = wrapped


def test_keyring_cached_is_the_held_key_or_none() -> None:
    store = _Store()
    ring = Keyring(b"k" * 32, store)
    key_id = ring.create(None)  # type: ignore[arg-type]
    key = ring.cached(key_id)
    assert key is not None and len(key) == 32
    assert ring.get(None, key_id) == key  # type: ignore[arg-type]
    assert store.reads == 0
    ring.forget(key_id)
    assert ring.cached(key_id) is None
    assert ring.get(None, key_id) == key  # type: ignore[arg-type]  # unwrapped again
    assert store.reads == 1
    assert ring.cached(uuid.uuid4()) is None


def test_archive_data_key_opens_no_session_for_a_held_key(opened: Any) -> None:
    archive = opened.archive
    ring = archive._keyring
    key_id, key = ring.mint()
    sessions = archive._sessions

    def no_session(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("a session was opened for a held key")

    archive._sessions = no_session
    try:
        assert archive.data_key(key_id) == key
    finally:
        archive._sessions = sessions
    ring.forget(key_id)  # not held, never written: the index is asked, and refuses
    with pytest.raises(KeyDestroyed):
        archive.data_key(key_id)
