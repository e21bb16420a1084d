"""Issue 14 item 5: erasing a patient with the real CLI while the real server runs and a
modality keeps storing other patients (storescu): nothing else is lost, the erased
patient is gone, the trail verifies; the command line's confirmation is typed at a
terminal (password + authenticator code of a second administrator, never on argv)."""

from __future__ import annotations

import os
import pty
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from tests.helpers import events, make_vault, start_server, storescu
from tests.test_erasure import make
from tests.web_helpers import client, csrf_of, sign_in

PASSWORD = "radio-du-matin-sur-la-plage"
REASON = "Fin de la durée de conservation, vérifiée par le Dr Test"


def run_tty(args: list[str], answers: list[tuple[str, str]],
            timeout: float = 120) -> tuple[int, str]:
    """Run the CLI with a terminal as stdin, typing each answer once its prompt shows."""
    master, slave = pty.openpty()
    proc = subprocess.Popen([sys.executable, "-m", "pacsvault", *args], stdin=slave,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True)  # no controlling tty: prompts on stderr
    os.close(slave)
    out = bytearray()

    def read() -> None:
        assert proc.stdout is not None
        while chunk := proc.stdout.read1(4096):  # type: ignore[attr-defined]
            out.extend(chunk)

    def drain() -> None:  # the terminal's echo
        try:
            while os.read(master, 4096):
                pass
        except OSError:
            pass

    threads = [threading.Thread(target=read, daemon=True),
               threading.Thread(target=drain, daemon=True)]
    for t in threads:
        t.start()
    try:
        for prompt, answer in answers:
            deadline = time.monotonic() + timeout
            while prompt.encode() not in out:
                assert proc.poll() is None or prompt.encode() in out, out.decode()
                assert time.monotonic() < deadline, out.decode()
                time.sleep(0.05)
            os.write(master, answer.encode() + b"\n")
        proc.wait(timeout)
        threads[0].join(10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        os.close(master)
    return proc.returncode, out.decode(errors="replace")


@pytest.mark.slow
def test_cli_erasure_while_serve_receives_other_patients(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    vault = make_vault(tmp_path / "v")
    vault.add_node("MODALITY")
    v = vault.open()
    try:
        v.accounts.add_user("second", ["admin"], PASSWORD)
    finally:
        v.close()
    files = tmp_path / "files"
    files.mkdir()
    target = [make("PVLIVE", name="Leroy^Anne") for _ in range(3)]
    others = [make(f"PVOTH{n % 8}") for n in range(40)]
    paths: dict[str, Path] = {}
    for o in (*target, *others):
        path = files / f"{o.sop}.dcm"
        path.write_bytes(o.raw)
        paths[o.sop] = path
    monkeypatch.setenv("PACSVAULT_JOBS_FIRST_AFTER", "0")
    server = start_server(vault)
    sent: list[subprocess.CompletedProcess[str]] = []
    try:
        first = storescu(server.port, [paths[o.sop] for o in (*target, *others[:8])],
                         calling="MODALITY")
        assert first.returncode == 0, first.stderr
        listed = vault.cli("patient", "list-expiring")
        assert "PVLIVE" in listed.stdout and "Leroy^Anne" in listed.stdout
        missing = vault.cli("patient", "erase", "PVLIVE", "--reason", REASON, check=False)
        assert missing.returncode == 2 and missing.stderr.count("pacsvault: error:") == 1

        # the first administrator asks on the page, the second confirms at a terminal
        ca = vault.data / "tls" / "ca.crt"
        with client(server.https_port, ca) as admin, client(server.https_port, ca) as second:
            sign_in(admin, "admin", vault.admin_password)
            enrolled = sign_in(second, "second", PASSWORD)
            page = admin.get("/admin/erasure", params={"patient_id": "PVLIVE"})
            res = admin.post("/admin/erasure/request", data={
                "csrf": csrf_of(page.text), "patient_id": "PVLIVE", "issuer": "",
                "reason": REASON, "basis": "retention-ended"})
            assert res.status_code == 303, res.text
            request = res.headers["location"].rsplit("=", 1)[1]

            def sending() -> None:
                for start in range(8, 40, 8):
                    sent.append(storescu(server.port, [paths[o.sop] for o in
                                                       others[start:start + 8]],
                                         calling="MODALITY"))

            modality = threading.Thread(target=sending)
            modality.start()
            try:
                code, out = run_tty(
                    ["patient", "confirm", request, "--as", "second", "--data",
                     str(vault.data), "--key-file", str(vault.key)],
                    [("Password for second", PASSWORD),
                     ("Authenticator code", enrolled.authenticator.code())])
            finally:
                modality.join(120)
            assert code == 0, out
            assert "Erased 1 patient(s): 3 instance(s)" in out and PASSWORD not in out
            # the asker's request cannot be confirmed twice
            again = admin.post("/admin/erasure/confirm", data={
                "csrf": csrf_of(admin.get("/admin/erasure").text), "request_id": request,
                "confirm": "1"})
            assert again.status_code == 400
        assert [s.returncode for s in sent] == [0, 0, 0, 0], [s.stderr for s in sent]
        assert server.alive()
        # what the CLI's erasure asked of the server: drop its unwrapped keys now
        from pacsvault.service import control

        assert control.call(vault.data, "erasure.forget", {}) == {"forgotten": True}
    finally:
        server.stop()
    assert "Traceback" not in server.log()
    assert "PVLIVE" not in server.log() and "Leroy" not in server.log()
    v = vault.open()
    try:
        for o in target:
            assert list(v.archive.locate(sop_uid=o.sop)) == []
        for o in others:  # every other image acknowledged is there and decrypts
            (item,) = list(v.archive.locate(sop_uid=o.sop))
            assert o.patient.encode() in v.archive.read(item)
        assert v.audit.verify().ok
    finally:
        v.close()
    (tomb,) = events(vault, "patient.erased")
    assert tomb["requested_by"] == "admin" and tomb["confirmed_by"] == "second"
    assert tomb["via"] == "cli" and tomb["instances"] == 3
    assert events(vault, "retention.due")  # the daily job ran at start
    verify = vault.cli("audit", "verify")
    assert verify.returncode == 0
