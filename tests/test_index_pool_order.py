"""The embedded index's pool hands out the connection returned last (issue 17).

Why it matters: SQLCipher decrypts and HMAC-checks every page a connection reads into its
own cache, and a commit by another connection empties that cache. Handing out the
connection idle longest (first in, first out) gave nearly every store a cold cache; the
one returned last is most often the group commit's, still warm. Speed is not asserted
here, only the order the pool follows, and that a connection taken that way still reads
what another one committed.
"""

from __future__ import annotations

import secrets
from pathlib import Path

from sqlalchemy import text

from pacsvault.index.db import open_index


def test_the_connection_returned_last_is_taken_next(tmp_path: Path) -> None:
    engine = open_index(tmp_path / "index.db", secrets.token_bytes(32), create=True)
    try:
        first, second = engine.connect(), engine.connect()
        first_dbapi = first.connection.dbapi_connection
        second_dbapi = second.connection.dbapi_connection
        assert first_dbapi is not second_dbapi
        first.close()
        second.close()  # returned last
        with engine.connect() as again:
            assert again.connection.dbapi_connection is second_dbapi
        with engine.begin() as writer:  # the same (warm) connection writes
            writer.execute(text("CREATE TABLE t (v INTEGER)"))
            writer.execute(text("INSERT INTO t VALUES (1)"))
        with engine.begin() as other:  # held while another connection commits
            held = engine.connect()
            assert held.connection.dbapi_connection is not other.connection.dbapi_connection
            other.execute(text("INSERT INTO t VALUES (2)"))
        assert held.execute(text("SELECT count(*) FROM t")).scalar() == 2
        held.close()
    finally:
        engine.dispose()
