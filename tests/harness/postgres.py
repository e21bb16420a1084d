"""A real PostgreSQL for the tests and benchmarks, started by ``scripts/postgres.sh`` (issue 16).

The script does the work (initdb as an unprivileged user, TLS from a throwaway CA, SCRAM,
hostssl only, a ``pacsvault`` role and database with a 0600 password file and passfile);
this module calls it and hands back the facts as a typed :class:`PostgresServer`. Nothing
here is mocked: the tests talk to Debian's PostgreSQL over 127.0.0.1 with
``sslmode=verify-full`` or over its Unix socket.

psycopg is imported lazily so that importing this module (from conftest, from ``bench``)
never needs it; :func:`postgres_missing` says why the component cannot run here.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import secrets
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

if TYPE_CHECKING:
    import psycopg

from tests.harness.components import owned_tempdir, run_start, run_stop

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "postgres.sh"


def postgres_missing() -> str | None:
    """Why a real PostgreSQL cannot be started here, or None when it can."""
    bindir = os.environ.get("PACSVAULT_PG_BIN")
    if not (Path(bindir, "initdb").exists() if bindir
            else any(Path("/usr/lib/postgresql").glob("*/bin/initdb"))):
        return ("PostgreSQL is not installed (no /usr/lib/postgresql/*/bin/initdb; "
                "scripts/install.sh --test installs Debian's postgresql)")
    if importlib.util.find_spec("psycopg") is None:
        return "psycopg is not installed in the venv (scripts/install.sh --test)"
    return None


@dataclass(frozen=True)
class PostgresServer:
    """One running test cluster: everything a client needs, no secret inline.

    ``url`` names the ``pacsvault`` database as the ``pacsvault`` role over TCP with
    ``sslmode=verify-full`` against ``ca_file``; the password is in ``password_file``
    (0600) and in the libpq passfile ``passfile`` (0600, lines for 127.0.0.1, localhost
    and the socket directory).
    """

    dir: Path
    url: str
    host: str
    port: int
    socket_dir: Path
    database: str
    user: str
    password_file: Path
    passfile: Path
    ca_file: Path
    data_dir: Path
    log_file: Path
    bin_dir: Path
    pid: int

    @classmethod
    def from_facts(cls, directory: Path, facts: dict[str, Any]) -> PostgresServer:
        return cls(dir=directory, url=facts["url"], host=facts["host"], port=int(facts["port"]),
                   socket_dir=Path(facts["socket_dir"]), database=facts["database"],
                   user=facts["user"], password_file=Path(facts["password_file"]),
                   passfile=Path(facts["passfile"]), ca_file=Path(facts["ca_file"]),
                   data_dir=Path(facts["data_dir"]), log_file=Path(facts["log_file"]),
                   bin_dir=Path(facts["bin_dir"]), pid=int(facts["pid"]))

    def password(self) -> str:
        return self.password_file.read_text().strip()

    def url_for(self, database: str) -> str:
        """The same TLS URL for another database of this cluster."""
        return (f"postgresql://{self.user}@{self.host}:{self.port}/{quote(database)}"
                f"?sslmode=verify-full&sslrootcert={quote(str(self.ca_file))}")

    def connect(self, database: str | None = None, **kwargs: Any) -> psycopg.Connection[Any]:
        """A psycopg connection over TLS (verify-full), the password from the file."""
        import psycopg

        return psycopg.connect(self.url_for(database or self.database),
                               password=self.password(), **kwargs)

    def libpq_env(self) -> dict[str, str]:
        """Environment for a libpq client child (psql, pg_dump): the passfile and the CA, so
        that no password goes on its command line."""
        return {**os.environ, "PGPASSFILE": str(self.passfile),
                "PGSSLROOTCERT": str(self.ca_file), "PGSSLMODE": "verify-full"}

    def dump(self, database: str | None = None, *, timeout: float = 300) -> bytes:
        """``pg_dump`` of a database (plain SQL, the way an administrator's backup reads it),
        run over TLS as the ``pacsvault`` role: what the "nothing readable in a dump" tests
        scan."""
        out = subprocess.run([str(self.bin_dir / "pg_dump"), "--no-password", "-h", self.host,
                              "-p", str(self.port), "-U", self.user,
                              "-d", database or self.database],
                             capture_output=True, env=self.libpq_env(), timeout=timeout,
                             check=False)
        if out.returncode != 0:
            raise RuntimeError(f"pg_dump failed: {out.stderr.decode(errors='replace')}")
        return out.stdout

    def stop(self) -> None:
        """Stop the cluster (``pg_ctl stop -m fast``, then by PID); its data is kept."""
        stop_postgres(self.dir)

    def start(self) -> PostgresServer:
        """Start the same cluster again (same port, data, password); the new facts."""
        return start_postgres(self.dir)


@dataclass(frozen=True)
class PostgresDatabase:
    """A fresh database of a :class:`PostgresServer`, owned by the ``pacsvault`` role."""

    server: PostgresServer
    name: str
    url: str

    def connect(self, **kwargs: Any) -> psycopg.Connection[Any]:
        return self.server.connect(self.name, **kwargs)


def start_postgres(directory: Path, port: int | None = None) -> PostgresServer:
    """``scripts/postgres.sh start DIR``: a new cluster in DIR, or the one there again."""
    argv = [str(directory)] + (["--port", str(port)] if port else [])
    return PostgresServer.from_facts(directory, run_start(SCRIPT, argv))


def stop_postgres(directory: Path) -> None:
    run_stop(SCRIPT, directory)


@contextlib.contextmanager
def running_postgres(port: int | None = None) -> Iterator[PostgresServer]:
    """A cluster in a fresh directory under the system temp dir, stopped and removed after.

    Not pytest's ``tmp_path``: as root the cluster belongs to an unprivileged user, who must
    be able to traverse the directory's parents (pytest's basetemp is 0700).
    """
    directory = owned_tempdir("pacsvault-pg-", stop_postgres)
    try:
        server = start_postgres(directory, port)
        try:
            yield server
        finally:
            stop_postgres(directory)
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def create_database(server: PostgresServer, prefix: str = "pv_test") -> PostgresDatabase:
    """CREATE DATABASE with a unique name (the role has CREATEDB)."""
    from psycopg import sql

    name = f"{prefix}_{secrets.token_hex(6)}"
    with server.connect(autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {} OWNER {}").format(
            sql.Identifier(name), sql.Identifier(server.user)))
    return PostgresDatabase(server=server, name=name, url=server.url_for(name))


def drop_database(db: PostgresDatabase) -> None:
    """DROP DATABASE ... WITH (FORCE): connections a test left open do not keep it."""
    from psycopg import sql

    with db.server.connect(autocommit=True) as conn:
        conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(
            sql.Identifier(db.name)))
