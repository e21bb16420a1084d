"""The versioned index schema (issue 15, item 5): a vault made by the oldest supported
layout (``tests/fixtures/old-vault``, written by commit 16fdedc's own code, see
``fixtures/make_old_vault.py``) opens with today's code, upgraded, every object readable;
a second open changes nothing; a vault from a newer pacsvault is refused; ``init`` is at
the head. No server is started."""

from __future__ import annotations

import hashlib
import io
import json
import shutil
import sys
from pathlib import Path

import pytest
from sqlalchemy import inspect

from pacsvault import vault as vault_mod
from pacsvault.accounts.service import AuthOutcome
from pacsvault.index import schema
from tests.helpers import make_vault, pv

FIXTURE = Path(__file__).parent / "fixtures" / "old-vault"
INFO = json.loads((FIXTURE / "fixture.json").read_text())


@pytest.fixture
def old(tmp_path: Path) -> tuple[Path, Path]:
    """A copy of the fixture (data dir, key file): the committed one stays pristine."""
    shutil.copytree(FIXTURE, tmp_path / "old")
    key = tmp_path / "old" / "vault.key"
    key.chmod(0o600)
    return tmp_path / "old" / "data", key


def _digests(folder: Path) -> set[str]:
    return {hashlib.sha256(p.read_bytes()).hexdigest()
            for p in folder.rglob("*") if p.is_file()}


def _upgrades(v: vault_mod.Vault) -> int:
    return sum(1 for r in v.audit.records() if r.action == "index.upgraded")


def test_oldest_layout_is_upgraded_with_everything_readable(
        old: tuple[Path, Path], tmp_path: Path) -> None:
    data, key = old
    assert "layout" not in json.loads((data / "vault.json").read_text())
    # The CLI, without a terminal (as under systemd): one line, then the upgrade.
    out = tmp_path / "export"
    proc = pv("export", "--all", "--out", out, "--data", data, "--key-file", key, input="")
    assert "upgrading the index from revision none (pre-versioned) to " \
           f"{schema.HEAD}; back it up first with 'pacsvault backup run'" in proc.stderr
    # Every object written by the old code comes back byte for byte.
    assert _digests(out) == _digests(FIXTURE / "originals")
    assert len(_digests(out)) == INFO["objects"]

    assert json.loads((data / "vault.json").read_text())["layout"] == schema.LAYOUT
    v = vault_mod.Vault.open(data, key, confirm=lambda plan: pytest.fail(str(plan)))
    try:
        assert schema.plan(v.engine) is None
        with v.engine.connect() as conn:
            assert schema.current(conn) == schema.HEAD
            found = inspect(conn)
            tables = set(found.get_table_names())
            assert {"object_actions", "node_certificates", "erasure_requests",
                    "user_preferences", "alembic_version"} <= tables
            assert "quarantined" in {c["name"] for c in found.get_columns("instances")}
            assert "tls_profile" in {c["name"] for c in found.get_columns("nodes")}
        node = v.nodes.get(INFO["node"][0])
        assert node is not None and node.port == INFO["node"][2]
        signed = v.accounts.authenticate(INFO["user"], INFO["password"], "127.0.0.1")
        assert signed.outcome is AuthOutcome.NEEDS_SECOND_FACTOR
        wrong = v.accounts.authenticate(INFO["user"], INFO["password"] + "x", "127.0.0.1")
        assert wrong.outcome is not AuthOutcome.NEEDS_SECOND_FACTOR
        verdict = v.audit.verify()
        assert verdict.ok, verdict.problem
        assert _upgrades(v) == 1
    finally:
        v.close()
    # A second open is a no-op: nothing asked, nothing recorded.
    again = vault_mod.Vault.open(data, key, confirm=lambda plan: pytest.fail(str(plan)))
    try:
        assert _upgrades(again) == 1
        assert again.audit.verify().ok
    finally:
        again.close()


def test_a_declined_upgrade_changes_nothing(old: tuple[Path, Path]) -> None:
    data, key = old
    asked: list[schema.Plan] = []

    def no(plan: schema.Plan) -> bool:
        asked.append(plan)
        return False

    with pytest.raises(vault_mod.VaultError, match="declined; nothing was changed"):
        vault_mod.Vault.open(data, key, confirm=no)
    assert asked == [schema.Plan(None, schema.HEAD)]
    assert "layout" not in json.loads((data / "vault.json").read_text())


def test_a_vault_from_a_newer_pacsvault_is_refused(old: tuple[Path, Path]) -> None:
    data, key = old
    meta = json.loads((data / "vault.json").read_text())
    meta["layout"] = schema.LAYOUT + 1
    (data / "vault.json").write_text(json.dumps(meta))
    proc = pv("status", "--data", data, "--key-file", key, input="", check=False)
    assert proc.returncode != 0
    assert "this vault was upgraded by a newer pacsvault" in proc.stderr
    assert "install it" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_an_index_revision_from_the_future_is_refused(old: tuple[Path, Path]) -> None:
    data, key = old
    vault_mod.Vault.open(data, key, confirm=lambda plan: True).close()
    v = vault_mod.Vault.open(data, key)
    with v.engine.begin() as conn:
        conn.exec_driver_sql("UPDATE alembic_version SET version_num = '9999'")
    v.close()
    with pytest.raises(vault_mod.VaultError, match="upgraded by a newer pacsvault"):
        vault_mod.Vault.open(data, key)


def test_a_new_vault_is_at_the_head(tmp_path: Path) -> None:
    made = make_vault(tmp_path / "v")
    assert json.loads((made.data / "vault.json").read_text())["layout"] == schema.LAYOUT
    v = vault_mod.Vault.open(made.data, made.key,
                             confirm=lambda plan: pytest.fail(str(plan)))
    try:
        assert schema.plan(v.engine) is None
        assert "erasure_requests" in inspect(v.engine).get_table_names()
    finally:
        v.close()


def test_head_names_the_newest_script() -> None:
    """``HEAD`` lets an up-to-date open skip importing alembic: it must say the truth."""
    assert schema.head() == schema.HEAD


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_at_a_terminal_the_upgrade_is_asked_first(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    plan = schema.Plan(None, schema.HEAD)
    monkeypatch.delenv("PACSVAULT_UPGRADE", raising=False)
    monkeypatch.setattr(sys, "stdin", _Terminal("n\n"))
    assert vault_mod.confirm_upgrade(plan) is False
    assert "back it up first with 'pacsvault backup run'" in capsys.readouterr().err
    monkeypatch.setattr(sys, "stdin", _Terminal("y\n"))
    assert vault_mod.confirm_upgrade(plan) is True
    monkeypatch.setattr(sys, "stdin", _Terminal(""))  # asked nothing: not read at all
    monkeypatch.setenv("PACSVAULT_UPGRADE", "yes")
    assert vault_mod.confirm_upgrade(plan) is True
    assert vault_mod.upgrade_without_asking(plan) is True  # serve --yes
    assert "upgrading the index" in capsys.readouterr().err
