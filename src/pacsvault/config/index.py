"""The ``[index]`` settings: where the index lives (issue 16).

Empty ``url`` (the default): the embedded SQLCipher index, ``DATA/index.db``. A
``postgresql://`` url: a PostgreSQL database shared by every instance, whose columns that
identify a patient are encrypted by pacsvault (``index.sealing``). The url never holds a
password: it would be logged, copied into tickets and shown by ``ps`` in a child's argv.
The password comes from ``password_file`` (0600) or libpq's own mechanisms (``passfile=``,
``service=``, ``~/.pgpass``, ``PGPASSFILE``).
"""

from __future__ import annotations

from urllib.parse import parse_qsl, urlsplit

from pydantic import BaseModel, ConfigDict, Field, field_validator

SCHEMES = ("postgresql", "postgres", "postgresql+psycopg")


class IndexUrlError(ValueError):
    """An index url that cannot be used (message is user-facing, never the password)."""


def check_url(url: str) -> str:
    """``url`` if it is a usable PostgreSQL url without a password, else ``IndexUrlError``.

    The message never repeats the url: it may hold the very password it refuses."""
    try:
        parts = urlsplit(url)
        scheme = parts.scheme.lower()
        password = parts.password
        _ = parts.port  # a malformed port raises here
        query = parse_qsl(parts.query, keep_blank_values=True)
    except ValueError:
        raise IndexUrlError("the index url is not a valid url") from None
    if scheme not in SCHEMES:
        raise IndexUrlError("the index url must start with postgresql:// (or be empty "
                            "for the embedded index)")
    if password is not None or any(key.lower() == "password" for key, _ in query):
        raise IndexUrlError(
            "the index url contains a password: remove it and put the password in a 0600 "
            "file named by [index] password_file (or use libpq's passfile or service)")
    if not parts.path.strip("/"):
        raise IndexUrlError("the index url names no database (postgresql://user@host/DB)")
    return url


class IndexSettings(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    # "" = embedded SQLCipher index. Else postgresql://USER@HOST:PORT/DB?sslmode=verify-full
    # &sslrootcert=/etc/pacsvault/pg-ca.crt (verify-full is the recommended TLS mode).
    url: str = ""
    # A 0600 file whose first line is the database password ("" = libpq's pgpass/service).
    password_file: str = ""
    # Connections kept open per instance (and the extra ones allowed at a peak).
    pool_size: int = Field(8, ge=1, le=256)
    max_overflow: int = Field(8, ge=0, le=256)

    @field_validator("url")
    @classmethod
    def _url(cls, value: str) -> str:
        return check_url(value) if value else value

    @property
    def is_postgres(self) -> bool:
        return bool(self.url)


TOML_SECTION = """\
[index]
# Where the index (patients, studies, series, instances, accounts) lives. Empty: the
# embedded SQLCipher database DATA/index.db (one machine). A PostgreSQL url for several
# instances sharing one database, e.g.
#   url = "postgresql://pacsvault@db.example.net:5432/pacsvault?sslmode=verify-full&sslrootcert=/etc/pacsvault/pg-ca.crt"
# sslmode=verify-full (certificate and host name checked) is the recommended TLS mode.
# Never put a password in the url (refused): use password_file (0600, first line) or
# libpq's passfile / service / ~/.pgpass. Every attribute that identifies a patient is
# encrypted by pacsvault before it reaches the database (docs/postgresql-index.md).
url = {url}
password_file = {password_file}
pool_size = 8
max_overflow = 8
"""
