"""``kill -9`` of the server in the middle of a storescu batch, then a restart: every instance
storescu was told is stored comes back intact, and the vault opens without manual repair."""

from __future__ import annotations

import json
import os
import struct
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from sqlalchemy import text

from pacsvault.vault import Vault
from tests import corpus
from tests.helpers import (
    VaultDir,
    events,
    make_vault,
    start_server,
    storescu,
    storescu_stream,
)

pytestmark = pytest.mark.slow

CALLING = "MODALITY"
BATCH = 300
KILL_AFTER = 60  # acknowledged stores before the kill
SENDING = "I: Sending file: "
STORED = "I: Received Store Response (Success)"


def _dataset_bytes(raw: bytes) -> bytes:
    """Everything after the preamble and file meta group (0002)."""
    assert raw[128:132] == b"DICM"
    (group_len,) = struct.unpack("<I", raw[140:144])  # value of (0002,0000) UL
    return raw[144 + group_len :]


def _sop_uid(path: Path) -> str:
    from pydicom import dcmread

    return str(dcmread(path, stop_before_pixels=True).SOPInstanceUID)


def _status(vault: VaultDir) -> dict[str, object]:
    return json.loads(vault.cli("status", "--json").stdout)  # type: ignore[no-any-return]


def _instances(vault: VaultDir) -> int:
    return int(_status(vault)["counts"]["instances"])  # type: ignore[index]


def _push_and_kill(
    port: int, files: list[Path], kill: Callable[[], None]
) -> tuple[list[Path], str, int]:
    """Run one storescu batch; call ``kill`` once KILL_AFTER stores are acknowledged.

    Returns the files storescu reported as stored, its whole output and its exit code.
    """
    proc, lines = storescu_stream(port, files, calling=CALLING)
    acked: list[Path] = []
    sending: Path | None = None
    output: list[str] = []
    killed = False
    started = time.monotonic()
    try:
        for line in lines:
            output.append(line)
            line = line.strip()
            if line.startswith(SENDING):
                sending = Path(line[len(SENDING):])
            elif line.startswith(STORED):
                assert sending is not None, "a response before any file was sent"
                acked.append(sending)
                sending = None
                if len(acked) >= KILL_AFTER and not killed:
                    # Half a store's time later: the next object is then most likely
                    # being received, parsed, encrypted or committed, not between two.
                    time.sleep((time.monotonic() - started) / len(acked) / 2)
                    kill()
                    killed = True
        code = proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert killed, "storescu finished before the server could be killed:\n" + "".join(output)
    return acked, "".join(output), code


@pytest.mark.timeout(240)
def test_kill9_mid_batch_loses_nothing_acknowledged(tmp_path: Path) -> None:
    vault = make_vault(tmp_path / "vault")
    vault.add_node(CALLING)
    files = corpus.synthetic_ct_series(tmp_path / "ct", BATCH, size=256)
    server = start_server(vault)
    try:
        acked, output, code = _push_and_kill(server.port, files, server.kill9)
    finally:
        if server.alive():
            server.kill9()
    assert server.proc.returncode == -9
    # storescu noticed that the server went away, and the batch was really cut short
    assert code != 0, output
    assert KILL_AFTER <= len(acked) < BATCH, output
    assert len(set(acked)) == len(acked)

    # The vault opens with the plain CLI while no server runs (no repair step).
    status = _status(vault)
    assert status["server"] == {"running": False}
    stored_before_restart = status["counts"]["instances"]  # type: ignore[index]
    assert stored_before_restart >= len(acked)

    # A partial write as an interrupted run could leave it (the kill may or may not
    # have caught one in flight): the restart must clear it.
    tmp = vault.data / "objects" / ".tmp"
    (tmp / f"{os.urandom(16).hex()}.part").write_bytes(os.urandom(1000))

    server = start_server(vault, log_name="serve-after-crash.log")
    try:
        assert not list(tmp.iterdir()), "partial objects left after restart"
        status = _status(vault)
        assert status["server"]["running"] is True  # type: ignore[index]
        assert status["counts"]["instances"] == stored_before_restart  # type: ignore[index]
        check = Vault.open(vault.data, vault.key)
        try:
            with check.sessions() as session:
                assert session.execute(text("PRAGMA integrity_check")).scalar() == "ok"
        finally:
            check.close()

        out = tmp_path / "export"
        vault.cli("export", "--all", "--out", out)
        exported = {p.stem: p for p in out.rglob("*.dcm")}
        assert len(exported) == stored_before_restart
        sent = {_sop_uid(f): f for f in files}
        assert set(exported) <= set(sent), "an exported instance that was never sent"
        acked_uids = {_sop_uid(f) for f in acked}
        missing = sorted(acked_uids - set(exported))
        assert not missing, f"{len(missing)} acknowledged instance(s) lost: {missing[:5]}"
        # every instance in the vault (acknowledged or caught in flight) is exactly what
        # storescu sent
        for uid, path in exported.items():
            back, original = path.read_bytes(), sent[uid].read_bytes()
            assert _dataset_bytes(back) == _dataset_bytes(original), sent[uid].name

        # The vault works after the crash: the rest of the batch goes through. The
        # instance in flight at the kill may already be stored: a re-send is a duplicate.
        rest = [f for f in files if f not in set(acked)]
        res = storescu(server.port, rest, calling=CALLING, timeout=180)
        assert res.returncode == 0, res.stdout + res.stderr
        assert "Store Failed" not in res.stderr
        assert _instances(vault) == BATCH
        assert not events(vault, "dicom.store.conflict")
        assert not events(vault, "dicom.store.failed")
    finally:
        assert server.stop() == 0
