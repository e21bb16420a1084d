"""A QIDO-RS search answered on the web service's event loop (issue 17: no thread hand-off
when nothing would wait), seen from a client of the real server:

- its record is in the trail when the answer arrives (fsync'ed before the data leaves, as
  in a worker thread), and anchored within ``DEFER_SECONDS`` (the anchor move, an index
  transaction, is not on the loop);
- when the trail is held by another process (here: this test holds its file lock), the
  search's record waits in a worker thread, not on the loop: other clients are answered
  meanwhile, and the search is answered once its record is durable, recorded once.
"""

from __future__ import annotations

import fcntl
import os
import ssl
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass

import httpx
import pytest
from pydicom import dcmread

from pacsvault.vault import Vault
from tests import corpus
from tests.helpers import VaultDir, make_vault, start_server

LOCAL = "127.0.0.1"
USER, PASSWORD = "drboucle", "amber-quarry-lantern-58-velvet-harbour"


@dataclass
class Env:
    vault: VaultDir
    opened: Vault
    patient: str
    token: str


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    root = tmp_path_factory.mktemp("qido-loop")
    vault = make_vault(root / "v")
    ct = corpus.synthetic_ct_series(root / "ct", 1, size=64)[0]
    opened = vault.open()
    try:
        opened.accounts.add_user(USER, ["physician"], PASSWORD)
        opened.archive.store(ct.read_bytes(), source_ae="MODALITY")
        token = opened.accounts.create_token(USER, "1d").token
        yield Env(vault, opened, str(dcmread(ct, stop_before_pixels=True).PatientID), token)
    finally:
        opened.close()


def _searches(opened: Vault) -> list[int]:
    return [r.seq for r in opened.audit.records() if r.action == "dicomweb.search"]


def _anchored(opened: Vault, seq: int) -> bool:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        anchor = opened.audit.anchor()
        if anchor is not None and anchor[0] >= seq:
            return True
        time.sleep(0.02)
    return False


def test_a_search_on_the_loop_is_recorded_before_it_is_answered_and_never_stalls_it(
        env: Env) -> None:
    server = start_server(env.vault)
    try:
        base = f"https://{LOCAL}:{server.https_port}"
        ca = ssl.create_default_context(cafile=str(env.vault.data / "tls" / "ca.crt"))
        headers = {"Authorization": f"Bearer {env.token}", "Accept": "application/dicom+json"}
        with httpx.Client(headers=headers, verify=ca, trust_env=False, timeout=60) as client:
            url = f"{base}/dicom-web/studies"
            for _ in range(3):  # the first ones take the full path (the tail is checked)
                found = client.get(url, params={"PatientID": env.patient})
                assert found.status_code == 200 and len(found.json()) == 1
                seq = _searches(env.opened)[-1]  # (there before the answer: durable)
                assert _anchored(env.opened, seq)
            before = _searches(env.opened)

            lock_fd = os.open(env.vault.data / "audit" / "trail.lock", os.O_RDWR)
            answers: list[httpx.Response] = []
            search = threading.Thread(target=lambda: answers.append(
                client.get(url, params={"PatientID": env.patient})))
            try:
                fcntl.flock(lock_fd, fcntl.LOCK_EX)
                search.start()
                time.sleep(1.0)
                assert not answers  # its record cannot be written: no answer yet
                # the loop is not held by it: another client is answered meanwhile
                with httpx.Client(verify=ca, trust_env=False, timeout=10) as other:
                    start = time.monotonic()
                    page = other.get(f"{base}/static/style.css")
                    assert page.status_code == 200
                    assert time.monotonic() - start < 5
                assert not answers
            finally:
                fcntl.flock(lock_fd, fcntl.LOCK_UN)
                os.close(lock_fd)
                search.join(60)
            assert answers and answers[0].status_code == 200
            assert len(answers[0].json()) == 1
            after = _searches(env.opened)
            assert len(after) == len(before) + 1  # recorded once
            assert _anchored(env.opened, after[-1])
    finally:
        server.stop()
    verdict = env.opened.audit.verify()
    assert verdict.ok, verdict.problem
