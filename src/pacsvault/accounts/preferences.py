"""Per-user preferences of the web pages (``models.UserPreference``): the language.

The ``user_preferences`` table is part of the index's schema baseline (``index.schema``:
made by ``init``, or when a vault from before schema versions is opened), so no page
creates it any more; ``ensure_table`` stays for callers holding a bare engine.
"""

from __future__ import annotations

import contextlib
import threading
import weakref
from typing import cast

from sqlalchemy import Engine, Table, select
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session, sessionmaker

from pacsvault.accounts.models import User, UserPreference, utcnow

LANGUAGES = ("fr", "en")
_ready: weakref.WeakSet[Engine] = weakref.WeakSet()
_lock = threading.Lock()


class PreferenceError(ValueError):
    """A value that is not one of the allowed choices."""


def ensure_table(engine: Engine) -> None:
    """Create ``user_preferences`` if missing (idempotent, cheap after the first call)."""
    if engine in _ready:
        return
    with _lock:
        if engine in _ready:
            return
        table = cast(Table, UserPreference.__table__)
        with contextlib.suppress(OperationalError):  # made by another process meanwhile
            table.create(engine, checkfirst=True)
        _ready.add(engine)


def language_of(session: Session, user_pk: int) -> str:
    """The user's language choice, "" when none (the browser decides)."""
    value = session.scalar(select(UserPreference.language)
                           .where(UserPreference.user_pk == user_pk))
    return value if value in LANGUAGES else ""


def set_language(sessions: sessionmaker[Session], user_name: str, language: str) -> None:
    """Store a user's language ("" = as the browser asks)."""
    if language and language not in LANGUAGES:
        raise PreferenceError(f"language must be one of {', '.join(LANGUAGES)} or empty")
    with sessions.begin() as s:
        user = s.scalar(select(User).where(User.name == user_name))
        if user is None:
            raise PreferenceError("no such user")
        row = s.scalar(select(UserPreference).where(UserPreference.user_pk == user.pk))
        if row is None:
            s.add(UserPreference(user_pk=user.pk, language=language, updated=utcnow()))
        else:
            row.language, row.updated = language, utcnow()
