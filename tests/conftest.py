"""Shared fixtures. The real server and real dcmtk peers run as subprocesses on loopback."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pacsvault.dicom import patches
from tests.harness.backends import backend as backend  # the fixture, for any module
from tests.harness.components import require
from tests.harness.postgres import (
    PostgresDatabase,
    PostgresServer,
    create_database,
    drop_database,
    postgres_missing,
    running_postgres,
)
from tests.harness.seaweed import (
    S3Bucket,
    S3Server,
    create_bucket,
    delete_bucket,
    running_seaweed,
    seaweed_missing,
)
from tests.harness.webhook import Webhook
from tests.helpers import Server, VaultDir, make_vault, start_server

# The tests' own pynetdicom peers (requestors sending, querying, being rejected) get the
# fixes pacsvault's requestors run with, in every worker whatever it imported first:
# upstream's requestor can report a quick rejection as an abort, and its loop can take the
# answer a sender waits for (``tests/test_request_answer.py``, ``test_reactor_pause.py``).
patches.configure_pynetdicom()

if TYPE_CHECKING:
    from pacsvault.vault import Vault

# The quick loop (`pytest -m quick`, under 2 minutes here): the fast tests of the modules
# that start no server. Everything stays in the full suite; add a module when it qualifies.
QUICK_MODULES = frozenset({
    "test_accounts", "test_archive_fastpath", "test_bench_small", "test_cli_errors",
    "test_cli_imports", "test_crypto", "test_data_dir", "test_dicom_contexts",
    "test_dicom_fastpath", "test_file_permissions", "test_friendly_messages", "test_i18n",
    "test_import_layers", "test_index_rekey", "test_install_script", "test_library_patches",
    "test_matching", "test_named_secret_cache", "test_passkeys", "test_status_report",
    "test_qido_for_ohif", "test_query_answers", "test_schema_upgrade", "test_sealed_journal",
    "test_sealed_merge", "test_storage", "test_syslog_export", "test_transcode_unit",
    "test_viewer_dist", "test_viewer_serving",
})


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if (item.path.stem in QUICK_MODULES and item.get_closest_marker("slow") is None
                and item.get_closest_marker("browser") is None):
            item.add_marker(pytest.mark.quick)


@pytest.fixture
def vault(tmp_path: Path) -> VaultDir:
    return make_vault(tmp_path / "vault")


@pytest.fixture
def opened(vault: VaultDir) -> Iterator[Vault]:
    """The test's ``vault`` (a module may override that fixture) opened in-process."""
    v = vault.open()
    try:
        yield v
    finally:
        v.close()


@pytest.fixture
def server(vault: VaultDir) -> Iterator[Server]:
    vault.add_node("MODALITY")
    srv = start_server(vault)
    yield srv
    srv.stop()


@pytest.fixture
def hook() -> Iterator[Webhook]:
    """A loopback webhook receiver for the alert sink (tests/harness/webhook.py)."""
    receiver = Webhook()
    try:
        yield receiver
    finally:
        receiver.close()


# -- real scale-out components (issue 16): PostgreSQL and SeaweedFS from scripts/*.sh -------


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    """One real PostgreSQL for the session (started on first use, stopped at the end).

    A test that stops or restarts PostgreSQL must start its own with
    ``tests.harness.postgres.running_postgres()``, not this shared one.
    """
    require(postgres_missing())
    with running_postgres() as server:
        yield server


@pytest.fixture
def postgres_db(postgres_server: PostgresServer) -> Iterator[PostgresDatabase]:
    """A fresh, empty database of the session's PostgreSQL for this test (dropped after)."""
    db = create_database(postgres_server)
    yield db
    # the session's cluster (and every database in it) is removed at the end anyway
    with contextlib.suppress(Exception):
        drop_database(db)


@pytest.fixture(scope="session")
def s3_server() -> Iterator[S3Server]:
    """One real SeaweedFS S3 endpoint for the session (started on first use).

    A test that stops the endpoint must start its own with
    ``tests.harness.seaweed.running_seaweed()``.
    """
    require(seaweed_missing())
    with running_seaweed() as server:
        yield server


@pytest.fixture
def s3_bucket(s3_server: S3Server) -> Iterator[S3Bucket]:
    """A fresh, empty bucket of the session's S3 endpoint for this test (deleted after)."""
    bucket = create_bucket(s3_server)
    yield bucket
    with contextlib.suppress(Exception):
        delete_bucket(bucket)
