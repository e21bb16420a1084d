"""Opening a PostgreSQL index (issue 16): the scale-out alternative to ``index.db``.

Why it differs from the SQLCipher index (``index.db``): PostgreSQL cannot encrypt itself,
so the engine gets the vault's column ``Sealer`` (``index.sealing``) before any statement
runs; every column that identifies a patient then reaches the server as ciphertext. The
database is shared by every instance, so there is no file lock and no re-keying gate: the
engine only hands out pooled connections (``pool_pre_ping``: a connection the server
closed while idle, a restart, is replaced instead of failing a store).

The password never travels in the url (``config.index.check_url`` refuses one): it is read
from ``[index] password_file`` (0600, ``fsutil.read_private_text``) and handed to psycopg
as a keyword, or libpq finds it itself (``passfile``, ``service``, ``~/.pgpass``). TLS
options (``sslmode``, ``sslrootcert``, ``sslcert``, ``sslkey``) pass through the url's
query to libpq unchanged; ``verify-full`` is the recommended mode.

``pacsvault_index_owner`` (one row: the vault id and its value sealed with the vault's
deterministic column key) says which vault made the database: a vault pointed at another
vault's database, or opened with another master key, is refused at open with one line
instead of failing later on the first sealed column.
"""

from __future__ import annotations

import hmac
import logging
from pathlib import Path
from typing import Any

from sqlalchemy import (
    Column,
    Engine,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Table,
    create_engine,
    inspect,
    select,
    text,
)
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import DBAPIError
from sqlalchemy.pool import NullPool

from pacsvault.config.index import IndexSettings, IndexUrlError, check_url
from pacsvault.fsutil import PrivateFileError, read_private_text
from pacsvault.index.db import IndexOpenError
from pacsvault.index.sealing import Sealer, attach

log = logging.getLogger("pacsvault.index")

OWNER_TABLE = "pacsvault_index_owner"
_OWNER_LABEL = "pacsvault_index_owner.check"
_owner = Table(OWNER_TABLE, MetaData(),
               Column("id", Integer, primary_key=True),
               Column("vault_id", String(36), nullable=False),
               Column("key_check", LargeBinary, nullable=False))


class IndexUnreachable(IndexOpenError):
    """The database did not answer or refused the connection (the server, the network,
    TLS, authentication): unlike a database of another vault or another key, a state of
    the deployment that ``pacsvault status`` reports as its red line."""


def engine_url(settings: IndexSettings) -> URL:
    """The SQLAlchemy url of ``settings.url`` on psycopg 3 (no password in it)."""
    try:
        url = make_url(check_url(settings.url))
    except IndexUrlError as exc:
        raise IndexOpenError(str(exc)) from None
    except Exception:  # sqlalchemy's ArgumentError: never repeat the url
        raise IndexOpenError("the index url is not a valid url") from None
    return url.set(drivername="postgresql+psycopg")


def where(url: URL) -> str:
    """The database named in messages and logs: host, port, database; never user or
    password, never the query (it may name key files)."""
    return f"{url.host or 'local socket'}:{url.port or 5432}/{url.database}"


def tls_weakness(url: URL) -> str | None:
    """Why the connection to ``url`` is not protected as recommended (None: it is): a
    server reached over the network without ``sslmode=verify-full`` can be impersonated
    or read on the wire. A Unix socket (no host, or a path) and loopback are local."""
    host = url.host or ""
    if not host or host.startswith("/") or host in ("localhost", "127.0.0.1", "::1"):
        return None
    mode = str(url.query.get("sslmode", "prefer"))
    if mode == "verify-full":
        return None
    return (f"the PostgreSQL index at {where(url)} is reached with sslmode={mode}: use "
            "sslmode=verify-full (and sslrootcert) so the server is authenticated")


def _password(settings: IndexSettings) -> str | None:
    if not settings.password_file:
        return None
    try:
        return read_private_text(Path(settings.password_file), first_line=True)
    except PrivateFileError as exc:
        raise IndexOpenError(exc.explain("index password file")) from None


def _first_line(exc: DBAPIError) -> str:
    lines = [line.strip() for line in str(exc.orig).splitlines() if line.strip()]
    return lines[0] if lines else type(exc.orig).__name__


def open_postgres(settings: IndexSettings, sealer: Sealer, vault_id: str, *,
                  create: bool = False) -> Engine:
    """The vault's PostgreSQL engine, its sealer attached, the owner checked (or, with
    ``create``, the database found empty and claimed for this vault). Raises
    ``IndexOpenError`` with a one-line user-facing reason."""
    url = engine_url(settings)
    weakness = tls_weakness(url)
    if weakness is not None:
        log.warning("%s", weakness)
    connect_args: dict[str, Any] = {"application_name": "pacsvault", "connect_timeout": 10}
    password = _password(settings)
    if password is not None:
        connect_args["password"] = password
    engine = create_engine(
        url, pool_size=settings.pool_size, max_overflow=settings.max_overflow,
        pool_pre_ping=True, connect_args=connect_args,
        # bound values are ciphertext anyway; keep them out of exception texts too
        hide_parameters=True,
    )
    attach(engine, sealer)
    try:
        with engine.begin() as conn:
            conn.execute(text("SELECT 1"))
            if create:
                _claim(conn, url, sealer, vault_id)
            else:
                _check_owner(conn, url, sealer, vault_id)
    except DBAPIError as exc:
        engine.dispose()
        raise IndexUnreachable(
            f"the PostgreSQL index at {where(url)} cannot be used: {_first_line(exc)}"
        ) from None
    except BaseException:
        engine.dispose()
        raise
    return engine


def _claim(conn: Any, url: URL, sealer: Sealer, vault_id: str) -> None:
    names = set(inspect(conn).get_table_names())
    if names & {OWNER_TABLE, "alembic_version", "instances"}:
        raise IndexOpenError(
            f"the PostgreSQL database {where(url)} already holds a pacsvault index: give "
            "a new, empty database")
    _owner.create(conn)
    conn.execute(_owner.insert().values(
        id=1, vault_id=vault_id, key_check=sealer.fix(_OWNER_LABEL, vault_id)))


def _check_owner(conn: Any, url: URL, sealer: Sealer, vault_id: str) -> None:
    if not inspect(conn).has_table(OWNER_TABLE):
        raise IndexOpenError(
            f"the PostgreSQL database {where(url)} holds no pacsvault index (wrong "
            "database in [index] url?)")
    row = conn.execute(select(_owner.c.vault_id, _owner.c.key_check)
                       .where(_owner.c.id == 1)).first()
    if row is None or not hmac.compare_digest(str(row[0]), vault_id):
        raise IndexOpenError(
            f"the PostgreSQL index at {where(url)} belongs to another vault; nothing was "
            "changed")
    if not hmac.compare_digest(bytes(row[1]), sealer.fix(_OWNER_LABEL, vault_id)):
        raise IndexOpenError(
            f"the PostgreSQL index at {where(url)} does not open with this key (wrong key "
            "file?); nothing was changed")


def owner_sealed_with(conn: Any, sealer: Sealer, vault_id: str) -> bool:
    """Whether the owner row is under ``sealer``'s keys (a master key rotation moves it
    last: it then tells that the whole index is under the new keys)."""
    found = conn.execute(select(_owner.c.key_check).where(_owner.c.id == 1)).scalar()
    return found is not None and hmac.compare_digest(bytes(found),
                                                     sealer.fix(_OWNER_LABEL, vault_id))


def reseal_owner(conn: Any, sealer: Sealer, vault_id: str) -> None:
    """The owner row under ``sealer``'s keys (the last write of a key rotation's index
    step): from then on the index opens with the new master key only."""
    conn.execute(_owner.update().where(_owner.c.id == 1).values(
        key_check=sealer.fix(_OWNER_LABEL, vault_id)))


def drop_claim(engine: Engine) -> None:
    """Undo what a failed ``init`` made in the database (its tables), so a retry finds it
    empty again. Only ever called on a database this ``init`` claimed."""
    with engine.begin() as conn:
        _drop_all(conn)


def _drop_all(conn: Any) -> None:
    from pacsvault.index.models import Base

    Base.metadata.drop_all(conn)
    conn.exec_driver_sql("DROP TABLE IF EXISTS alembic_version")
    _owner.drop(conn, checkfirst=True)


def release(settings: IndexSettings, vault_id: str) -> bool:
    """Drop every table of the index ``vault_id`` claimed, in one transaction (PostgreSQL
    DDL is transactional: all or nothing), when and only when the owner row names that
    vault: an ``init`` that failed after its schema step (or before its first
    administrator) leaves the database empty for a retry, and never touches another
    vault's index. True when something was dropped."""
    url = engine_url(settings)
    connect_args: dict[str, Any] = {"application_name": "pacsvault", "connect_timeout": 10}
    password = _password(settings)
    if password is not None:
        connect_args["password"] = password
    engine = create_engine(url, poolclass=NullPool, connect_args=connect_args,
                           hide_parameters=True)
    try:
        with engine.begin() as conn:
            if not inspect(conn).has_table(OWNER_TABLE):
                return False
            conn.exec_driver_sql(f"LOCK TABLE {OWNER_TABLE} IN ACCESS EXCLUSIVE MODE")
            row = conn.execute(select(_owner.c.vault_id).where(_owner.c.id == 1)).first()
            if row is None or not hmac.compare_digest(str(row[0]), vault_id):
                return False
            _drop_all(conn)
            return True
    finally:
        engine.dispose()
