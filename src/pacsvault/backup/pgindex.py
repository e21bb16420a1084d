"""Backing up and restoring a PostgreSQL index (issue 16): ``pg_dump`` streamed into restic.

Why this shape:

- **A point in time shared with the rest of the run.** One ``REPEATABLE READ`` transaction
  exports its snapshot (``pg_export_snapshot``); the trail's anchor, the object ids and the
  ``data_keys`` rows are read in it, and ``pg_dump --snapshot`` dumps exactly that state.
  So the trail cut and the objects backed up match the dumped index, as ``VACUUM INTO``
  does for the embedded one.
- **No wrapped data key in a data snapshot.** ``data_keys``' rows are left out of the
  dump (``--exclude-table-data``) and carried without ``wrapped`` in the stream's header;
  the keys live only in the keystore snapshot, so a key destroyed by an erasure is gone
  from every older snapshot too. Ephemeral rows (web sessions, sign-in tickets, WebAuthn
  challenges) are left out: a restored backup signs nobody in.
- **Nothing on disk.** The stream ``MAGIC, 8-byte length, JSON header, pg_dump custom
  archive`` goes from pg_dump's stdout through this process into ``restic backup --stdin``
  (restic 0.14 has no ``--stdin-from-command``), and back from ``restic dump`` into
  ``pg_restore``'s stdin. A pg_dump that fails kills restic before the end of its input:
  no snapshot of a truncated dump. The patient columns are pacsvault ciphertext anyway.
- **Secrets never on argv.** The url holds no password (settings refuse one); the password
  of ``[index] password_file`` reaches libpq through ``PGPASSFILE`` naming a 0600 pgpass
  in a private temporary directory, deleted afterwards; otherwise libpq's own passfile /
  service / ``~/.pgpass`` apply unchanged.
- **Versions checked first**: pg_dump's major version must be at least the server's (an
  older one refuses or, worse, misses objects), pg_restore's at least the archive's.
"""

from __future__ import annotations

import base64
import contextlib
import datetime as dt
import json
import os
import re
import shutil
import subprocess
import tempfile
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pacsvault.backup.targets import BackupError
from pacsvault.config.index import IndexSettings

if TYPE_CHECKING:
    import psycopg

    from pacsvault.vault import Vault

MAGIC = b"pacsvault-pg-index/1\n"
HEADER_FORMAT = "pacsvault-backup-pg-index/1"
DUMP_FILE = "index.pgdump"
EPHEMERAL_TABLES = ("web_sessions", "sign_in_tickets", "webauthn_challenges")
_CHUNK = 1 << 20
_HEADER_LIMIT = 1 << 31  # a header longer than this is not ours


@dataclass(frozen=True)
class PgTools:
    """pg_dump / pg_restore of ``[backup] pg_bin_dir`` (empty: the PATH)."""

    bin_dir: str = ""

    def path(self, name: str) -> str:
        if self.bin_dir:
            return str(Path(self.bin_dir) / name)
        found = shutil.which(name)
        if found is None:
            raise BackupError(f"{name} was not found: install Debian's postgresql-client "
                              "(its major version at least the server's) or set [backup] "
                              "pg_bin_dir; nothing was changed")
        return found

    def major(self, name: str) -> int:
        """The tool's major version (``pg_dump (PostgreSQL) 15.18 ...`` -> 15)."""
        binary = self.path(name)
        try:
            out = subprocess.run([binary, "--version"], capture_output=True, timeout=30,
                                 check=False, env=_base_env())
        except (OSError, subprocess.TimeoutExpired):
            raise BackupError(f"{binary} cannot be run; nothing was changed") from None
        match = re.search(rb"\(PostgreSQL\)\s+(\d+)", out.stdout)
        if out.returncode != 0 or match is None:
            raise BackupError(f"{binary} --version gave no PostgreSQL version; nothing was "
                              "changed")
        return int(match[1])


def server_major(version_num: int) -> int:
    """``server_version_num`` -> major (150018 -> 15; 90624 -> 9)."""
    return version_num // 10000


def check_dump_version(tools: PgTools, server_version_num: int) -> int:
    """pg_dump's major version, refused when older than the server's."""
    dump_major = tools.major("pg_dump")
    server = server_major(server_version_num)
    if dump_major < server:
        raise BackupError(
            f"pg_dump {dump_major} cannot back up this PostgreSQL {server} server (pg_dump's "
            f"major version must be at least the server's): install postgresql-client-"
            f"{server} or set [backup] pg_bin_dir; nothing was backed up")
    return dump_major


# --- connections -------------------------------------------------------------------


def conninfo(settings: IndexSettings, database: str | None = None) -> str:
    """The libpq url of the index (``postgresql://``, never a password), optionally
    naming another database of the same server (the drill's scratch database)."""
    from pacsvault.index.postgres import engine_url

    url = engine_url(settings).set(drivername="postgresql")
    if database is not None:
        url = url.set(database=database)
    return url.render_as_string(hide_password=False)


def where(settings: IndexSettings, database: str | None = None) -> str:
    from pacsvault.index.postgres import engine_url
    from pacsvault.index.postgres import where as _where

    url = engine_url(settings)
    return _where(url.set(database=database) if database else url)


def _password(settings: IndexSettings) -> str | None:
    from pacsvault.index.db import IndexOpenError
    from pacsvault.index.postgres import _password as read_password

    try:
        return read_password(settings)
    except IndexOpenError as exc:
        raise BackupError(str(exc)) from None


def connect(settings: IndexSettings, database: str | None = None, *,
            autocommit: bool = False) -> psycopg.Connection[Any]:
    """A psycopg connection as the server makes them (password as a keyword)."""
    import psycopg

    kwargs: dict[str, Any] = {"application_name": "pacsvault-backup", "connect_timeout": 10,
                              "autocommit": autocommit}
    password = _password(settings)
    if password is not None:
        kwargs["password"] = password
    try:
        return psycopg.connect(conninfo(settings, database), **kwargs)
    except psycopg.Error as exc:
        raise BackupError(f"the PostgreSQL index at {where(settings, database)} cannot be "
                          f"reached: {_first_line(str(exc))}; nothing was changed") from None


def _to_backup_error(exc: Exception) -> BackupError:
    return BackupError(f"the PostgreSQL index could not be read: {_primary(exc)}")


def _first_line(text: str) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    line = lines[0] if lines else "no message"
    return line if len(line) <= 300 else line[:297] + "..."


def _base_env() -> dict[str, str]:
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LC_ALL": "C"}
    for name, value in os.environ.items():
        # libpq's own settings (service file, passfile, TLS files) apply as for psql; a
        # password in the environment never comes from us and is not passed on.
        if name == "HOME" or (name.startswith("PG") and name != "PGPASSWORD"):
            env[name] = value
    return env


def _pgpass_escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace(":", "\\:")


@contextlib.contextmanager
def client_env(settings: IndexSettings) -> Iterator[dict[str, str]]:
    """The environment of a pg_dump / pg_restore child: with ``password_file``, a 0600
    pgpass in a fresh 0700 directory (``PGPASSFILE``), deleted afterwards."""
    env = _base_env()
    password = _password(settings)
    if password is None:
        yield env
        return
    private = Path(tempfile.mkdtemp(prefix="pacsvault-pg-"))
    try:
        os.chmod(private, 0o700)
        passfile = private / "pgpass"
        fd = os.open(passfile, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as out:
            out.write(f"*:*:*:*:{_pgpass_escape(password)}\n")
        env["PGPASSFILE"] = str(passfile)
        yield env
    finally:
        shutil.rmtree(private, ignore_errors=True)


# --- backup --------------------------------------------------------------------------


@dataclass
class Exported:
    """The point in time of one backup run, held open while pg_dump reads it."""

    snapshot: str
    server_version_num: int
    anchor_seq: int
    object_ids: list[str]
    data_keys: list[list[str | None]]  # [key_id, created (sealed text), destroyed iso]


@contextlib.contextmanager
def exported(vault: Vault) -> Iterator[Exported]:
    """One REPEATABLE READ transaction exporting its snapshot; open until the block ends
    (pg_dump must import it while it lives)."""
    import psycopg

    from pacsvault import vaultfile

    settings = vault.settings.index
    conn = connect(settings)
    try:
        try:
            point = _read_point(conn, vaultfile.instance(vault.layout.meta))
        except psycopg.Error as exc:
            raise _to_backup_error(exc) from None
        yield point
    finally:
        with contextlib.suppress(Exception):
            conn.rollback()
        conn.close()


def _read_point(conn: psycopg.Connection[Any], instance: str) -> Exported:
    """Every read in the transaction whose snapshot pg_dump imports (psycopg opens it at
    the first statement, with the level set here)."""
    from psycopg import IsolationLevel

    conn.isolation_level = IsolationLevel.REPEATABLE_READ
    conn.read_only = True
    row = conn.execute("SELECT pg_export_snapshot(), current_setting("
                       "'server_version_num')::int").fetchone()
    assert row is not None
    head = conn.execute("SELECT seq FROM audit_head WHERE instance = %s",
                        (instance,)).fetchone()
    ids = [str(r[0]) for r in conn.execute("SELECT object_id FROM instances")]
    keys = [[str(k), _carry(c), None if d is None else d.isoformat()]
            for k, c, d in conn.execute(
                "SELECT key_id, created, destroyed FROM data_keys ORDER BY key_id")]
    return Exported(str(row[0]), int(row[1]), int(head[0]) if head else 0, ids, keys)


def dump_chunks(vault: Vault, point: Exported, tools: PgTools, dump_major: int
                ) -> Iterator[bytes]:
    """The stream (module docstring): header, then pg_dump's output as it comes. Raises
    ``BackupError`` after the last chunk when pg_dump did not succeed (the caller then
    kills restic before it commits)."""
    header = json.dumps({
        "format": HEADER_FORMAT, "vault_id": vault.vault_id,
        "taken": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "server_version_num": point.server_version_num, "pg_dump_major": dump_major,
        "anchor_seq": point.anchor_seq, "instances": len(point.object_ids),
        "data_keys": point.data_keys,
    }, sort_keys=True).encode("utf-8")
    yield MAGIC + len(header).to_bytes(8, "big") + header
    settings = vault.settings.index
    argv = [tools.path("pg_dump"), "--format=custom", "--no-password",
            f"--snapshot={point.snapshot}", "--exclude-table-data=data_keys",
            *(f"--exclude-table-data={t}" for t in EPHEMERAL_TABLES),
            "--dbname", conninfo(settings)]
    with client_env(settings) as env, _Child(argv, env, stdin=False) as child:
        stdout = child.proc.stdout
        assert stdout is not None
        while True:
            chunk = stdout.read(_CHUNK)
            if not chunk:
                break
            yield chunk
        if child.wait(3600) != 0:
            raise BackupError(f"pg_dump failed: {child.error()}; nothing was backed up")


class _Child:
    """A pg_* child whose stderr a thread drains; killed if still running at exit."""

    def __init__(self, argv: list[str], env: dict[str, str], *, stdin: bool) -> None:
        self.name = Path(argv[0]).name
        try:
            self.proc = subprocess.Popen(
                argv, stdin=subprocess.PIPE if stdin else subprocess.DEVNULL,
                stdout=subprocess.PIPE if not stdin else subprocess.DEVNULL,
                stderr=subprocess.PIPE, env=env)
        except OSError:
            raise BackupError(f"{argv[0]} cannot be run; nothing was changed") from None
        self._stderr = b""
        self._reader = threading.Thread(target=self._drain, daemon=True)
        self._reader.start()

    def _drain(self) -> None:
        assert self.proc.stderr is not None
        self._stderr = self.proc.stderr.read()

    def __enter__(self) -> _Child:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        self._reader.join(5)
        for stream in (self.proc.stdin, self.proc.stdout, self.proc.stderr):
            if stream is not None:
                with contextlib.suppress(OSError):
                    stream.close()

    def wait(self, timeout: float) -> int:
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            raise BackupError(f"{self.name} did not finish within "
                              f"{int(timeout)} s") from None
        self._reader.join(10)
        return code

    def error(self) -> str:
        """pg_*'s last error line (names tables and the server, never row values)."""
        lines = [ln.strip() for ln in self._stderr.decode("utf-8", "replace").splitlines()
                 if ln.strip()]
        errors = [ln for ln in lines if "error" in ln.lower()]
        return _first_line((errors or lines or ["no message"])[-1])


# --- restore --------------------------------------------------------------------------


def read_header(chunks: Iterator[bytes]) -> tuple[dict[str, Any], bytes]:
    """The stream's header and the first bytes of the archive after it."""
    buffer = b""
    need = len(MAGIC) + 8
    for chunk in chunks:
        buffer += chunk
        if len(buffer) >= need:
            if not buffer.startswith(MAGIC):
                raise BackupError("this snapshot's index dump is not a pacsvault PostgreSQL "
                                  "index backup")
            size = int.from_bytes(buffer[len(MAGIC):need], "big")
            if size > _HEADER_LIMIT:
                raise BackupError("the index dump's header is damaged")
            if len(buffer) >= need + size:
                header = json.loads(buffer[need:need + size])
                if not isinstance(header, dict) or header.get("format") != HEADER_FORMAT:
                    raise BackupError("the index dump's header is not one this version reads")
                return header, buffer[need + size:]
    raise BackupError("the index dump in this snapshot is truncated")


def check_empty(settings: IndexSettings, database: str | None = None) -> None:
    """A restore goes into an empty database only (no table, sequence or view of ours)."""
    with connect(settings, database) as conn:
        row = conn.execute(
            "SELECT count(*) FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
            "WHERE n.nspname NOT IN ('pg_catalog', 'information_schema') "
            "AND n.nspname NOT LIKE 'pg_toast%' AND c.relkind IN ('r','S','v','m','p')"
        ).fetchone()
    if row and int(row[0]):
        raise BackupError(f"the database {where(settings, database)} is not empty: restore "
                          "the index only into a new, empty database (createdb); nothing "
                          "was changed")


def pg_restore(settings: IndexSettings, database: str | None, tools: PgTools,
               sections: list[str], archive: Iterator[bytes]) -> None:
    """Feed ``archive`` (the pg_dump bytes) to pg_restore for ``sections``, in one
    transaction; owners and privileges of the old server are not restored (the url's role
    owns what it restores)."""
    argv = [tools.path("pg_restore"), "--no-password", "--no-owner", "--no-privileges",
            "--exit-on-error", "--single-transaction",
            *(f"--section={s}" for s in sections), "--dbname", conninfo(settings, database)]
    with client_env(settings) as env, _Child(argv, env, stdin=True) as child:
        stdin = child.proc.stdin
        assert stdin is not None
        try:
            for chunk in archive:
                stdin.write(chunk)
        except BrokenPipeError:
            pass  # pg_restore read what it needed (or failed: its status says)
        with contextlib.suppress(BrokenPipeError):
            stdin.close()
        if child.wait(24 * 3600) != 0:
            raise BackupError(f"pg_restore failed: {child.error()}")


def insert_data_keys(settings: IndexSettings, database: str | None,
                     rows: list[list[str | None]],
                     wrapped_for: Callable[[str], bytes | None]) -> tuple[int, int]:
    """The ``data_keys`` rows of the header, ``wrapped`` from the keystore (None: the key
    was destroyed, ``destroyed`` set now when it was not). Returns (restored, absent)."""
    import psycopg

    try:
        return _insert_data_keys(settings, database, rows, wrapped_for)
    except psycopg.Error as exc:
        raise BackupError(f"the data keys could not be restored: {_primary(exc)}") from None


def _primary(exc: Exception) -> str:
    """A PostgreSQL error's primary message only: its CONTEXT may quote a row's value."""
    diag = getattr(exc, "diag", None)
    primary = getattr(diag, "message_primary", None)
    return _first_line(str(primary)) if primary else type(exc).__name__


def _insert_data_keys(settings: IndexSettings, database: str | None,
                      rows: list[list[str | None]],
                      wrapped_for: Callable[[str], bytes | None]) -> tuple[int, int]:
    now = dt.datetime.now(dt.UTC)
    restored = absent = 0
    with connect(settings, database) as conn, conn.cursor() as cur:
        with cur.copy("COPY data_keys (key_id, wrapped, created, destroyed) FROM STDIN"
                      ) as copy:
            for key_id, created, destroyed in rows:
                assert key_id is not None
                wrapped = wrapped_for(key_id)
                when = dt.datetime.fromisoformat(destroyed) if destroyed else None
                if wrapped is None:
                    absent += 1
                    when = when or now
                else:
                    restored += 1
                copy.write_row((key_id, wrapped, _uncarry(created), when))
        conn.commit()
    return restored, absent


def _carry(value: object) -> str | None:
    """A column value for the JSON header: bytes (a sealed column is bytea on PostgreSQL)
    as ``b:`` + base64, text as ``t:`` + text."""
    if value is None:
        return None
    if isinstance(value, bytes | bytearray | memoryview):
        return "b:" + base64.b64encode(bytes(value)).decode("ascii")
    return "t:" + str(value)


def _uncarry(value: str | None) -> bytes | str | None:
    if value is None:
        return None
    if value.startswith("b:"):
        return base64.b64decode(value[2:])
    return value[2:]


def restore_index(settings: IndexSettings, database: str | None, tools: PgTools,
                  stream: Callable[[], contextlib.AbstractContextManager[Iterator[bytes]]],
                  wrapped_for: Callable[[str], bytes | None]) -> tuple[dict[str, Any], int, int]:
    """pre-data and data (one pass over the dump), the data keys, then post-data (the
    constraints and indexes; a second pass reads the archive's table of contents only).
    Returns the header, keys restored, keys absent."""
    restore_major = tools.major("pg_restore")
    check_empty(settings, database)
    with stream() as chunks:
        header, rest = read_header(chunks)
        if int(header.get("pg_dump_major", 0)) > restore_major:
            raise BackupError(f"pg_restore {restore_major} cannot read a dump made by pg_dump "
                              f"{header.get('pg_dump_major')}: install a newer "
                              "postgresql-client or set [backup] pg_bin_dir")
        pg_restore(settings, database, tools, ["pre-data", "data"], _then(rest, chunks))
    keys = header.get("data_keys") or []
    restored, absent = insert_data_keys(settings, database, keys, wrapped_for)
    with stream() as chunks:
        _, rest = read_header(chunks)
        pg_restore(settings, database, tools, ["post-data"], _then(rest, chunks))
    return header, restored, absent


def _then(first: bytes, rest: Iterator[bytes]) -> Iterator[bytes]:
    if first:
        yield first
    yield from rest


# --- the drill's scratch database -------------------------------------------------------


@contextlib.contextmanager
def scratch_database(settings: IndexSettings) -> Iterator[str]:
    """A new, empty database on the index's server for a restore drill, dropped after it
    whatever happens. Needs the CREATEDB privilege (said in one line when missing)."""
    import secrets

    import psycopg
    from psycopg import sql

    from pacsvault.index.postgres import engine_url

    live = str(engine_url(settings).database or "pacsvault")
    name = f"{live[:40]}_drill_{secrets.token_hex(4)}"
    with connect(settings, autocommit=True) as conn:
        try:
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        except psycopg.Error as exc:
            raise BackupError(
                f"no scratch database for the restore drill on {where(settings)}: "
                f"{_first_line(str(exc))} (the index role needs CREATEDB)") from None
    try:
        yield name
    finally:
        with connect(settings, autocommit=True) as conn:
            conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(
                sql.Identifier(name)))
