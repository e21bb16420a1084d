"""What the real-component harnesses (``postgres.py``, ``seaweed.py``) share: their temp
directories, cleaning up after a killed test run, and skip-or-fail when a component is
missing."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

OWNER = "owner.pid"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def owned_tempdir(prefix: str, stop: Callable[[Path], None]) -> Path:
    """A fresh directory under the system temp dir for one component, marked with our PID.

    Not pytest's ``tmp_path``: as root PostgreSQL runs as an unprivileged user, who must
    traverse the parents (pytest's basetemp is 0700). First, directories of the same kind
    left by a run that was killed (its PID gone, so no finalizer ran) are stopped with
    ``stop`` and removed, so that servers do not pile up on a shared machine; those of live
    runs (other sessions, other users) are left alone.
    """
    base = Path(tempfile.gettempdir())
    for old in base.glob(f"{prefix}*"):
        try:
            pid = int((old / OWNER).read_text())
        except (OSError, ValueError):
            continue
        if pid != os.getpid() and not _alive(pid):
            with contextlib.suppress(Exception):
                stop(old)
            shutil.rmtree(old, ignore_errors=True)
    directory = Path(tempfile.mkdtemp(prefix=prefix))
    (directory / OWNER).write_text(f"{os.getpid()}\n")
    return directory


def require(missing: str | None) -> None:
    """Skip a test whose component is missing (``missing`` says why); under CI (``CI=true``)
    fail instead: CI installs both (scripts/install.sh --test) and must run those tests."""
    if missing is None:
        return
    import pytest

    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"{missing}; required under CI", pytrace=False)
    pytest.skip(missing)


def run_start(script: Path, argv: list[str]) -> dict[str, Any]:
    """``script start …`` (scripts/postgres.sh, scripts/seaweed.sh): the facts it prints as
    JSON, or one error naming the script and what it said."""
    out = subprocess.run([str(script), "start", *argv], capture_output=True, text=True,
                         timeout=180, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"scripts/{script.name} start failed ({out.returncode}): "
                           f"{out.stderr.strip()}")
    facts: dict[str, Any] = json.loads(out.stdout)
    return facts


def run_stop(script: Path, directory: Path) -> None:
    subprocess.run([str(script), "stop", str(directory)], capture_output=True, timeout=120,
                   check=True)
