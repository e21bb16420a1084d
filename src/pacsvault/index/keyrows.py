"""The index rows holding wrapped data keys, as ``crypto.keyring`` needs them.

Why apart from the keyring: crypto sits below the index, so the keyring only knows the
narrow ``WrappedKeys`` protocol and the index implements it over its ORM.
"""

from __future__ import annotations

import uuid

from sqlalchemy.orm import Session

from pacsvault.index.models import DataKey


class DataKeyRows:
    """``crypto.keyring.WrappedKeys`` over the ``data_keys`` table."""

    def has(self, session: Session, key_id: uuid.UUID) -> bool:
        """A row exists, even a destroyed one (its wrapped key erased)."""
        return session.get(DataKey, str(key_id)) is not None

    def wrapped(self, session: Session, key_id: uuid.UUID) -> bytes | None:
        """The wrapped key; None when there is no row or the key was destroyed."""
        row = session.get(DataKey, str(key_id))
        return None if row is None else row.wrapped

    def add(self, session: Session, key_id: uuid.UUID, wrapped: bytes) -> None:
        """A new row in the session's transaction."""
        session.add(DataKey(key_id=str(key_id), wrapped=wrapped))
