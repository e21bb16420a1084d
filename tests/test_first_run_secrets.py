"""Issue 11, defect 11: the first run's secrets (recovery code, first administrator's
password) never go to a log.

``init`` and the first ``serve`` write them to a 0600 file in a 0700 directory beside the
key file (outside the data directory: recovery code + vault.json = the master key), and
show them on the terminal only when stdout is one. With stdout piped (nohup, journald,
a test harness) only the file's path and what to do with it are printed.
"""

from __future__ import annotations

import json
import os
import pty
import re
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.helpers import first_run_secrets, pv

pytestmark = pytest.mark.slow  # each test runs the real CLI (init: key, CA, index)

CODE_RE = re.compile(r"^[A-Z2-7]{4}(-[A-Z2-7]{4}){7}$")
PASSWORD_RE = re.compile(r"^[a-z2-9]{5}(-[a-z2-9]{5}){3}$")


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def check_secrets_file(stdout: str, stderr: str, data: Path, key: Path) -> None:
    found = first_run_secrets(stdout)
    assert CODE_RE.match(found.recovery_code) and PASSWORD_RE.match(found.admin_password)
    for secret in (found.recovery_code, found.admin_password):
        assert secret not in stdout and secret not in stderr
    assert mode(found.path) == 0o600
    assert mode(found.path.parent) == 0o700
    assert not found.path.resolve().is_relative_to(data.resolve())
    assert found.path.parent == key.parent or found.path.parent.parent == key.parent
    assert "delete" in stderr and str(found.path) in stderr
    # The password works (the file tells the truth).
    from pacsvault.vault import Vault

    v = Vault.open(data, key)
    try:
        result = v.accounts.authenticate(found.admin_name, found.admin_password, "127.0.0.1")
        assert result.ticket, result
        v.accounts.cancel(result.ticket)
    finally:
        v.close()


def test_init_with_stdout_piped_writes_the_secrets_to_a_private_file(tmp_path: Path) -> None:
    data, key = tmp_path / "data", tmp_path / "keys" / "master.key"
    proc = pv("init", "--data", data, "--key-file", key)
    check_secrets_file(proc.stdout, proc.stderr, data, key)


def test_init_in_a_shared_key_directory_uses_a_private_subdirectory(tmp_path: Path) -> None:
    keys = tmp_path / "usb"
    keys.mkdir(mode=0o755)
    keys.chmod(0o755)
    data, key = tmp_path / "data", keys / "pv.key"
    proc = pv("init", "--data", data, "--key-file", key)
    check_secrets_file(proc.stdout, proc.stderr, data, key)
    assert first_run_secrets(proc.stdout).path.parent != keys


def test_first_serve_with_stdout_piped_logs_no_secret(tmp_path: Path) -> None:
    data, key = tmp_path / "data", tmp_path / "keys" / "master.key"
    out, err = tmp_path / "serve.out", tmp_path / "serve.err"
    with open(out, "wb") as fo, open(err, "wb") as fe:
        proc = subprocess.Popen(
            [sys.executable, "-m", "pacsvault", "serve", "--data", str(data), "--key-file",
             str(key), "--bind", "127.0.0.1", "--dicom-port", "0", "--dicom-tls-port", "0",
             "--https-port", "0"], stdout=fo, stderr=fe)
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                json.loads((data / "serve.json").read_text())
                break
            except (FileNotFoundError, json.JSONDecodeError):
                time.sleep(0.1)
        assert proc.poll() is None, err.read_text()
    finally:
        proc.terminate()
        proc.wait(30)
    check_secrets_file(out.read_text(), err.read_text(), data, key)


def test_init_on_a_terminal_shows_the_secrets(tmp_path: Path) -> None:
    data, key = tmp_path / "data", tmp_path / "keys" / "master.key"
    main, tty = pty.openpty()
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "pacsvault", "init", "--data", str(data), "--key-file",
             str(key)], stdin=subprocess.DEVNULL, stdout=tty, stderr=subprocess.PIPE,
            timeout=120, check=True)
        os.close(tty)
        shown = b""
        while True:
            try:
                chunk = os.read(main, 4096)
            except OSError:
                break
            if not chunk:
                break
            shown += chunk
    finally:
        os.close(main)
    text = shown.decode()
    path = re.search(r"(/\S+first-run-secrets\S*\.txt)", text + proc.stderr.decode())
    assert path, text
    secrets_text = Path(path.group(1)).read_text()
    code = re.search(r"recovery code: (\S+)", secrets_text)
    password = re.search(r"password: (\S+)", secrets_text)
    assert code and password
    assert code.group(1) in text and password.group(1) in text
