"""Issue 12, defect 9: ``scripts/install.sh`` says what it installs and how far it is.

The real script runs in a copy of the repository layout whose ``.venv`` holds stand-ins
for pip and the pacsvault command (nothing is downloaded or installed): it prints a
numbered step line for each stage with the packages pip collects, and a failure of pip
still stops it with pip's status (``set -euo pipefail`` kept through the output filters).
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "install.sh"

FAKE_PYTHON = """#!/bin/sh
# stand-in for .venv/bin/python: only 'python -m pip install ...'
case "$*" in
  *--upgrade\\ pip*) exit 0 ;;
esac
echo "Obtaining file:///somewhere"
echo "Collecting fastapi>=0.110 (from pacsvault==0.1.0)"
echo "  Downloading fastapi-0.115.0-py3-none-any.whl (94 kB)"
echo "Collecting pydicom>=3.0"
echo "Installing collected packages: pydicom, fastapi, pacsvault"
echo "Successfully installed fastapi-0.115.0 pacsvault-0.1.0 pydicom-3.0.2"
exit ${FAKE_PIP_STATUS:-0}
"""
FAKE_PACSVAULT = """#!/bin/sh
echo "pacsvault $*" >&2
"""
# never the real apt-get from a test, whatever the machine lacks
FAKE_APT = """#!/bin/sh
[ "$1" = update ] && exit 0
echo "Get:1 http://deb.debian.org/debian bookworm/main amd64 python3-venv amd64 3.11.2-1 [1 kB]"
echo "Setting up python3-venv (3.11.2-1) ..."
"""


def _layout(root: Path) -> Path:
    (root / "scripts").mkdir(parents=True)
    shutil.copy(SCRIPT, root / "scripts" / "install.sh")
    bin_dir = root / ".venv" / "bin"
    bin_dir.mkdir(parents=True)
    for name, text in (("python", FAKE_PYTHON), ("pacsvault", FAKE_PACSVAULT)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    tools = root / "tools"
    tools.mkdir()
    (tools / "apt-get").write_text(FAKE_APT)
    (tools / "apt-get").chmod(0o755)
    return root / "scripts" / "install.sh"


def _run(script: Path, **env: str) -> subprocess.CompletedProcess[str]:
    path = f"{script.parent.parent / 'tools'}{os.pathsep}{os.environ.get('PATH', '')}"
    return subprocess.run(["bash", str(script)], capture_output=True, text=True, timeout=60,
                          env={**os.environ, "PATH": path, **env})


@pytest.mark.skipif(shutil.which("python3") is None, reason="needs python3 on PATH")
def test_install_prints_its_steps(tmp_path: Path) -> None:
    done = _run(_layout(tmp_path))
    assert done.returncode == 0, done.stderr
    err = done.stderr
    for line in ("[1/3 ", "Debian packages", "[2/3 ", "Python environment",
                 "collect fastapi>=0.110", "collect pydicom>=3.0",
                 "installing: pydicom, fastapi, pacsvault",
                 "Successfully installed", "[3/3 ", "OHIF web viewer",
                 "pacsvault viewer install", "[done +"):
        assert line in err, (line, err)
    assert err.index("[2/3 ") < err.index("collect fastapi") < err.index("[3/3 ")
    assert "Downloading" not in err  # one line per package, not pip's chatter


@pytest.mark.skipif(shutil.which("python3") is None, reason="needs python3 on PATH")
def test_install_still_stops_when_pip_fails(tmp_path: Path) -> None:
    done = _run(_layout(tmp_path), FAKE_PIP_STATUS="3")
    assert done.returncode == 3, (done.returncode, done.stderr)
    assert "[done" not in done.stderr and "OHIF web viewer" not in done.stderr
