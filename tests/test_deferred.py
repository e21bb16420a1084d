"""Issue 17, peak memory of the serving processes: modules pydicom imports at its start
but no serving code uses (``requests``, ``tqdm``: ~5 MB per process) are placeholders
until first used (``pacsvault/deferred``), and ``webauthn`` (~5 MB) is imported by a
passkey ceremony, not at start (``accounts/passkeys``), as are ``pyrage`` (a breach's
patient list) and ``segno`` (a TOTP enrolment's QR code).

What is checked: a started server (one process, and the workers of ``--workers 2``) never
imported them (``-X importtime`` of its whole log, as ``test_cli_imports``); in a process
where they are placeholders, pydicom still sees them as present and every way of using
them (attribute, ``from`` import, submodule import, from several threads at once) gets the
real module.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
from bench.cli_startup import imports

from pacsvault import deferred
from tests.helpers import echoscu, make_vault, start_server

CALLING = "MODALITY"


@pytest.mark.slow
@pytest.mark.timeout(240)
@pytest.mark.parametrize("workers", ["1", "2"])
def test_a_started_server_has_not_imported_them(
        tmp_path: object, monkeypatch: pytest.MonkeyPatch, workers: str) -> None:
    from pathlib import Path

    vault = make_vault(Path(str(tmp_path)) / "vault")
    vault.add_node(CALLING)
    monkeypatch.setenv("PYTHONPROFILEIMPORTTIME", "1")
    server = start_server(vault, args=("--workers", workers), timeout=90)
    try:
        # an association served: every worker that answers has its stack imported
        assert echoscu(server.port, calling=CALLING).returncode == 0
    finally:
        server.stop()
    _, names = imports(server.log())
    loaded = {name.split(".")[0] for name in names}
    assert {"pydicom", "pynetdicom", "fastapi"} <= loaded  # the log holds the server's imports
    unused = {*deferred.SERVER_UNUSED, "urllib3", "charset_normalizer", "webauthn", "cbor2",
              "pyrage", "segno"}
    assert not loaded & unused, sorted(loaded & unused)


def _child(code: str) -> str:
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(code)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def test_pydicom_sees_them_and_every_use_gets_the_real_module() -> None:
    out = _child("""
        import sys, threading
        from pacsvault import deferred
        assert deferred.install() == ["requests", "tqdm"]
        import pydicom
        import pydicom.data.download as download
        assert download.HAVE_REQUESTS and download.tqdm is sys.modules["tqdm"]
        assert not deferred.loaded("requests") and not deferred.loaded("tqdm")
        assert "urllib3" not in sys.modules
        # several threads reading at once: one load, each gets the real function
        got = []
        threads = [threading.Thread(target=lambda: got.append(download.requests.get))
                   for _ in range(8)]
        for t in threads: t.start()
        for t in threads: t.join()
        import requests
        assert deferred.loaded("requests") and len(set(got)) == 1
        assert got[0] is requests.get and requests.__file__.endswith("__init__.py")
        import requests.adapters
        assert requests.adapters.HTTPAdapter
        from tqdm import tqdm
        assert deferred.loaded("tqdm") and tqdm.__module__ == "tqdm.std"
        print("ok")
    """)
    assert out.strip() == "ok"


def test_nothing_replaced_once_imported_and_missing_stays_missing() -> None:
    out = _child("""
        import sys
        import tqdm
        from pacsvault import deferred
        assert deferred.install(("tqdm", "no_such_module_pv17")) == []
        assert sys.modules["tqdm"] is tqdm and deferred.loaded("tqdm")
        try:
            import no_such_module_pv17
        except ImportError:
            print("ok")
    """)
    assert out.strip() == "ok"
