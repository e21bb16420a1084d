"""The restic wrapper (issue 14, item 1): the password reaches restic only through a pipe
(never argv, environment or a file), credentials come from a 0600 file into the child's
environment only, and failures are one line."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from pacsvault.backup.restic import (
    NoRepository,
    Repository,
    ResticError,
    WrongPassword,
    read_credentials,
)

FAKE = """#!/bin/sh
# records what restic would see: argv, environment, and the password file's content
out="{out}"
printf '%s\\n' "$@" > "$out.argv"
env > "$out.env"
prev=""
for arg in "$@"; do
  if [ "$prev" = "--password-file" ]; then cat "$arg" > "$out.password"; fi
  prev="$arg"
done
echo '[]'
"""


def test_password_only_through_a_pipe_and_credentials_only_in_the_child(
        tmp_path: Path) -> None:
    out = tmp_path / "seen"
    fake = tmp_path / "restic"
    fake.write_text(FAKE.format(out=out))
    fake.chmod(0o700)
    creds = tmp_path / "offsite.env"
    creds.write_text("# off-site bucket\nAWS_ACCESS_KEY_ID=AKIDEXAMPLE\n"
                     "AWS_SECRET_ACCESS_KEY=very-secret-value\n")
    creds.chmod(0o600)
    password = b"5e3cret-repository-password-0123456789"
    repo = Repository("s3:https://s3.example.net/bucket", password, read_credentials(creds),
                      str(fake), tmp_path / "cache")
    assert repo.snapshots() == []
    argv = (tmp_path / "seen.argv").read_text()
    env = (tmp_path / "seen.env").read_text()
    assert password.decode() not in argv and password.decode() not in env
    assert "/dev/fd/" in argv and "RESTIC_PASSWORD" not in env
    assert (tmp_path / "seen.password").read_bytes().strip() == password
    assert "AWS_SECRET_ACCESS_KEY=very-secret-value" in env
    assert "very-secret-value" not in argv
    assert "very-secret-value" not in os.environ.get("AWS_SECRET_ACCESS_KEY", "")
    assert not [p for p in tmp_path.rglob("*") if p.is_file()
                and password in p.read_bytes() and p.name != "seen.password"]


def test_credentials_file_must_be_private_and_plain(tmp_path: Path) -> None:
    creds = tmp_path / "c.env"
    creds.write_text("AWS_ACCESS_KEY_ID=x\n")
    creds.chmod(0o644)
    with pytest.raises(ResticError, match="chmod 600"):
        read_credentials(creds)
    creds.chmod(0o600)
    creds.write_text("RESTIC_PASSWORD=guess\n")
    with pytest.raises(ResticError, match="not allowed"):
        read_credentials(creds)
    creds.write_text("just a line\n")
    with pytest.raises(ResticError, match="KEY=VALUE"):
        read_credentials(creds)


@pytest.mark.skipif(not Path("/usr/bin/restic").exists(), reason="restic not installed")
def test_errors_are_one_line(tmp_path: Path) -> None:
    missing = Repository(str(tmp_path / "none"), b"pw", binary="/usr/bin/restic")
    with pytest.raises(NoRepository) as exc:
        missing.snapshots()
    assert "\n" not in str(exc.value) and "no backup repository" in str(exc.value)
    repo = Repository(str(tmp_path / "repo"), b"right", binary="/usr/bin/restic")
    repo.init()
    assert repo.exists()
    with pytest.raises(WrongPassword) as wrong:
        Repository(str(tmp_path / "repo"), b"wrong", binary="/usr/bin/restic").snapshots()
    assert "\n" not in str(wrong.value)
    with pytest.raises(ResticError, match="was not found"):
        Repository(str(tmp_path / "repo"), b"pw", binary=str(tmp_path / "nope")).snapshots()
    # restic's own files: no password anywhere on disk
    assert not [p for p in (tmp_path / "repo").rglob("*")
                if p.is_file() and b"right" in p.read_bytes()]
    assert subprocess.run(["/usr/bin/restic", "version"], capture_output=True).returncode == 0
