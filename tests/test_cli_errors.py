"""Issue 12, defect 6: a mistake on the command line is a one-line message and exit code 2,
never a traceback. Each case runs the real CLI (``pv``) as a user would.

Former tracebacks: ``token create --expires 30days``; ``export`` to a folder the user may
not write, onto a file, under a file, under ``/proc``; and, found by going through every
command: ``--data`` onto a file, ``init`` under ``/proc``, a key file or vault the user may
not read, a password file that is a folder, ``node cert --out`` onto a file.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import VaultDir, make_vault, pv

NOBODY = 65534


@pytest.fixture(scope="module")
def vault(tmp_path_factory: pytest.TempPathFactory) -> VaultDir:
    v = make_vault(tmp_path_factory.mktemp("clierr") / "v")
    v.add_node("CERTNODE", "--tls", "--client-cert", host="10.0.0.7")
    return v


def one_line_error(proc: subprocess.CompletedProcess[str], *words: str) -> str:
    """Exit 2, one line on stderr, no traceback; returns the line."""
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2, (proc.returncode, proc.stderr)
    assert len(lines) == 1, lines
    assert lines[0].startswith("pacsvault: error: "), lines
    for word in words:
        assert word in lines[0], (word, lines[0])
    return lines[0]


def test_token_expiry_not_a_duration(vault: VaultDir) -> None:
    one_line_error(vault.cli("token", "create", "--user", vault.admin_name, "--expires",
                             "30days", check=False), "--expires", "30d")
    one_line_error(vault.cli("token", "create", "--user", vault.admin_name, "--expires",
                             "400d", check=False), "365 days")


def test_export_destinations(vault: VaultDir, tmp_path: Path) -> None:
    a_file = tmp_path / "a-file"
    a_file.write_text("x")
    for out, words in (
        (Path("/proc/pacsvault-export"), ("/proc is a system folder",)),
        (Path("/sys/kernel/pacsvault"), ("/sys is a system folder",)),
        (a_file, ("is a file, not a folder",)),
        (a_file / "sub", ("is a file, not a folder",)),
    ):
        one_line_error(vault.cli("export", "--all", "--out", out, check=False), *words)
    assert a_file.read_text() == "x"


def _as_nobody(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["setpriv", "--reuid", str(NOBODY), "--regid", str(NOBODY),
                           "--clear-groups", sys.executable, "-m", "pacsvault",
                           *map(str, args)], capture_output=True, text=True, timeout=120,
                          cwd="/")


needs_root = pytest.mark.skipif(os.geteuid() != 0 or shutil.which("setpriv") is None,
                                reason="needs root and setpriv to act as another user")


@needs_root
def test_export_to_a_folder_without_permission(vault: VaultDir, tmp_path: Path) -> None:
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o700)
    one_line_error(_as_nobody("export", "--all", "--out", locked / "out", "--data",
                              vault.data, "--key-file", vault.key), "no permission to write")
    assert not (locked / "out").exists()


@needs_root
def test_unreadable_key_file_and_vault(vault: VaultDir) -> None:
    line = one_line_error(_as_nobody("status", "--data", vault.data, "--key-file",
                                     vault.key))
    assert "no permission for user" in line or "permission" in line.lower(), line


def test_paths_onto_files_and_into_proc(vault: VaultDir, tmp_path: Path) -> None:
    a_file = tmp_path / "a-file"
    a_file.write_text("x")
    one_line_error(pv("status", "--data", a_file, "--key-file", vault.key, check=False),
                   "not a folder")
    one_line_error(pv("audit", "verify", "--data", a_file, "--key-file", vault.key,
                      check=False), "not a folder")
    one_line_error(pv("init", "--data", "/proc/pacsvault-vault", "--key-file",
                      tmp_path / "k" / "master.key", "--admin", "marie-curie-7", check=False),
                   "/proc/pacsvault-vault")
    one_line_error(pv("init", "--data", a_file / "data", "--key-file",
                      tmp_path / "k2" / "master.key", "--admin", "marie-curie-7", check=False),
                   "not a folder")
    one_line_error(vault.cli("user", "add", "bob", "--role", "physician", "--password-file",
                             tmp_path, check=False), "folder where a file was expected")
    one_line_error(vault.cli("node", "cert", "CERTNODE", "--out", a_file, check=False),
                   str(a_file))
    assert a_file.read_text() == "x"


def test_damaged_vault_file(vault: VaultDir, tmp_path: Path) -> None:
    copy = tmp_path / "copy"
    shutil.copytree(vault.data, copy)
    (copy / "vault.json").write_text("{not json")
    one_line_error(pv("node", "list", "--data", copy, "--key-file", vault.key, check=False),
                   "vault.json is damaged")
    (copy / "vault.json").write_text("[1]")
    one_line_error(pv("status", "--data", copy, "--key-file", vault.key, check=False),
                   "vault.json is damaged")
