"""``index.rawselect``: a one-row SELECT read through the SQLite driver gives exactly what
SQLAlchemy gives (values and types), and the node registry's per-association read built on
it answers as the ORM does (issue 17: the association's negotiation path)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import select

from pacsvault.index import nodes as nodes_module
from pacsvault.index.models import Node
from pacsvault.index.rawselect import RawSelect
from pacsvault.vault import Vault, create


@pytest.fixture(scope="module")
def vault(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Vault]:
    root: Path = tmp_path_factory.mktemp("rawselect")
    create(root / "data", key_file=root / "key")
    opened = Vault.open(root / "data", root / "key")
    try:
        opened.nodes.add("PLAINSCU", "127.0.0.1")
        opened.nodes.add("TLSSCU", "127.0.0.2", 11112, tls=True, client_cert=True,
                         roles=("query",), tls_profile="legacy-aes")
        yield opened
    finally:
        opened.close()


def test_the_node_read_equals_the_orms(vault: Vault) -> None:
    for title in ("PLAINSCU", "TLSSCU", " TLSSCU "):
        with vault.sessions() as session:
            row = session.scalar(select(Node).where(Node.ae_title == title.strip()))
            assert row is not None
            expected = nodes_module._info(row)
        assert vault.nodes.get(title) == expected
    assert vault.nodes.get("NOSUCH") is None


def test_driver_rows_equal_core_rows(vault: Vault) -> None:
    engine = vault.sessions.kw["bind"]
    read = RawSelect(nodes_module._GET_NODE)
    assert read.names == tuple(nodes_module._GET_NODE.selected_columns.keys())
    for title in ("PLAINSCU", "TLSSCU"):
        with engine.connect() as conn:
            core = conn.execute(nodes_module._GET_NODE, {"ae": title}).first()
        raw = read.first(engine, {"ae": title})
        assert core is not None and raw is not None
        assert raw == tuple(core)
        assert [type(v) for v in raw] == [type(v) for v in core]
    assert read.first(engine, {"ae": "NOSUCH"}) is None
