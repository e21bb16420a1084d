"""The index backends a suite can run on: the embedded SQLCipher index and PostgreSQL
(issue 16: "the same test suites ... run against both backends, with identical answers").

Use (``conftest`` makes the fixture available to every module): make vaults through it::

    @pytest.fixture(scope="module")
    def env(backend: Backend, tmp_path_factory):
        vault = backend.make_vault(tmp_path_factory.mktemp("x") / "vault")

``backend`` is module-scoped and parametrised (``embedded``, ``postgres``): every test of
the module runs once per backend, ids ``[embedded]`` / ``[postgres]``. The PostgreSQL one
is marked ``postgres``, uses the session's real cluster (``postgres_server``, TLS
verify-full, password file) and a fresh database per vault, dropped after the module;
where PostgreSQL cannot run it is skipped (or fails under CI, ``harness.components``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.harness.postgres import (
    PostgresDatabase,
    PostgresServer,
    create_database,
    drop_database,
)
from tests.helpers import AE, VaultDir, first_run_secrets, make_vault, new_vault, pv

BACKENDS = [pytest.param("embedded", id="embedded"),
            pytest.param("postgres", id="postgres", marks=pytest.mark.postgres)]


@dataclass
class Backend:
    """Makes vaults on one index backend."""

    name: str
    server: PostgresServer | None = None
    databases: list[PostgresDatabase] = field(default_factory=list)

    @property
    def is_postgres(self) -> bool:
        return self.server is not None

    def make_vault(self, root: Path, ae_title: str = AE, admin: str = "admin") -> VaultDir:
        """``pacsvault init`` (the CLI, as a user), with ``--index-url`` on PostgreSQL."""
        if self.server is None:
            return make_vault(root, ae_title, admin)
        db = create_database(self.server)
        self.databases.append(db)
        root.mkdir(parents=True, exist_ok=True)
        key = root / "keys" / "master.key"
        proc = pv("init", "--data", root / "data", "--key-file", key, "--ae-title",
                  ae_title, "--admin", admin, "--index-url", db.url,
                  "--index-password-file", self.server.password_file)
        found = first_run_secrets(proc.stdout)
        return VaultDir(root, key, found.recovery_code, found.admin_password,
                        found.admin_name)

    def new_vault(self, root: Path, ae_title: str = AE) -> VaultDir:
        """``tests.helpers.new_vault`` (in process, no first administrator) on this
        backend."""
        if self.server is None:
            return new_vault(root, ae_title)
        from pacsvault import config
        from pacsvault.vault import create

        db = create_database(self.server)
        self.databases.append(db)
        key = root / "keys" / "master.key"
        index = config.IndexSettings(url=db.url, password_file=str(self.server.password_file))
        return VaultDir(root, key, create(root / "data", key_file=key, ae_title=ae_title,
                                          index=index))

    def close(self) -> None:
        for db in self.databases:
            with contextlib.suppress(Exception):  # the cluster goes at the session's end
                drop_database(db)
        self.databases.clear()


@pytest.fixture(scope="module", params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> Iterator[Backend]:
    """The module's index backend (see the module docstring)."""
    server = request.getfixturevalue("postgres_server") if request.param == "postgres" \
        else None
    found = Backend(str(request.param), server)
    try:
        yield found
    finally:
        found.close()
