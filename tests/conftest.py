"""Shared fixtures. The real server and real dcmtk peers run as subprocesses on loopback."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.harness.webhook import Webhook
from tests.helpers import Server, VaultDir, make_vault, start_server

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
