"""Issue 12, defect 2: where the vault is comes from --data, $PACSVAULT_DATA or the system
configuration (/etc/pacsvault/pacsvault.toml, $PACSVAULT_CONFIG here), never from the
working directory, and a command says which directory it uses. (The refusal without any
of them: tests/test_vault_cli.py::test_no_data_dir_is_refused_never_the_cwd.)"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import VaultDir, pv


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PACSVAULT_DATA",
                                                           "PACSVAULT_CONFIG")}
    return {**env, **extra}


def test_system_config_names_the_vault_and_its_key(vault: VaultDir, tmp_path: Path) -> None:
    config = tmp_path / "etc" / "pacsvault.toml"
    config.parent.mkdir()
    config.write_text(f'data_dir = "{vault.data}"\nkey_file = "{vault.key}"\n'
                      'user = "pacsvault"\n')
    # No --data, no --key-file: both from the system configuration.
    proc = pv("status", "--json", env=_env(PACSVAULT_CONFIG=str(config)))
    assert json.loads(proc.stdout)["data"] == str(vault.data)
    assert f"data directory {vault.data} (from {config})" in proc.stderr


def test_relative_data_from_environment_is_shown_absolute(vault: VaultDir) -> None:
    relative = os.path.relpath(vault.data, vault.root)
    proc = subprocess.run(
        [sys.executable, "-m", "pacsvault", "status", "--key-file", str(vault.key)],
        capture_output=True, text=True, timeout=120, cwd=vault.root,
        env=_env(PACSVAULT_DATA=relative, PACSVAULT_CONFIG=str(vault.root / "none.toml")),
    )
    assert proc.returncode == 0, proc.stderr
    assert f"data directory {vault.data} (from PACSVAULT_DATA)" in proc.stderr
    assert f"Vault        {vault.data}" in proc.stdout


@pytest.mark.parametrize("body", ["data_dir = [", 'data_dir = "relative/path"\n'],
                         ids=["malformed", "relative"])
def test_bad_system_config_is_one_line(vault: VaultDir, tmp_path: Path, body: str) -> None:
    config = tmp_path / "pacsvault.toml"
    config.write_text(body)
    proc = pv("status", env=_env(PACSVAULT_CONFIG=str(config)), check=False)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    assert str(config) in proc.stderr
    # A command given its data dir is not stopped by a broken system file.
    assert pv("status", "--data", vault.data, "--key-file", vault.key,
              env=_env(PACSVAULT_CONFIG=str(config))).returncode == 0


def test_lock_holder_read_from_proc_locks(tmp_path: Path) -> None:
    from pacsvault.service.lock import holder_pid

    locks = tmp_path / "locks"
    locks.write_text(
        "1: POSIX  ADVISORY  READ 14393 fe:00:2180513 128 128\n"
        "2: FLOCK  ADVISORY  WRITE 4242 fe:00:777 0 EOF\n"
        "2: -> FLOCK  ADVISORY  WRITE 5151 fe:00:777 0 EOF\n"
    )
    assert holder_pid(777, locks) == 4242
    assert holder_pid(2180513, locks) is None  # a POSIX lock, not ours
    assert holder_pid(1, tmp_path / "missing") is None
