"""Issue 12, defect 7: everyday CLI commands do not import the server's stack.

Every command took 3-7 s, even ``--version``, because the whole web application (and
pydicom, numpy, pynetdicom, argon2) was imported. A timed test would be flaky on a loaded
machine, so this asserts *which modules are imported* (``python -X importtime`` of the real
CLI); ``bench/cli_startup.py`` measures the times.
"""

from __future__ import annotations

import subprocess
import sys

import pytest
from bench.cli_startup import imports

from tests.helpers import VaultDir, make_vault

HEAVY = ("fastapi", "starlette", "uvicorn", "numpy", "pydicom", "pynetdicom", "PIL",
         "argon2", "jinja2")


@pytest.fixture(scope="module")
def vault(tmp_path_factory: pytest.TempPathFactory) -> VaultDir:
    return make_vault(tmp_path_factory.mktemp("imports") / "v")


def _imported(*args: str) -> set[str]:
    done = subprocess.run([sys.executable, "-X", "importtime", "-m", "pacsvault", *args],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    _, names = imports(done.stderr)
    assert names, "no -X importtime output"
    return {name.split(".")[0] for name in names}


@pytest.mark.parametrize("command", [["status"], ["node", "list"], ["audit", "verify"]])
def test_everyday_commands_skip_the_server_stack(vault: VaultDir, command: list[str]) -> None:
    loaded = _imported(*command, "--data", str(vault.data), "--key-file", str(vault.key))
    assert not loaded & set(HEAVY), sorted(loaded & set(HEAVY))


def test_version_imports_no_command() -> None:
    loaded = _imported("--version")
    assert not loaded & {*HEAVY, "sqlalchemy", "cryptography", "pydantic"}, loaded
