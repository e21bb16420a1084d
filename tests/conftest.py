"""Shared fixtures. The real server and real dcmtk peers run as subprocesses on loopback."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.helpers import Server, VaultDir, make_vault, start_server


@pytest.fixture
def vault(tmp_path: Path) -> VaultDir:
    return make_vault(tmp_path / "vault")


@pytest.fixture
def server(vault: VaultDir) -> Iterator[Server]:
    vault.add_node("MODALITY")
    srv = start_server(vault)
    yield srv
    srv.stop()
