"""Issue 20, part 5: forward to another PACS or workstation.

One server (module-scoped) and dcmtk ``storescp`` peers registered as nodes:

- ``pacsvault send`` to a receiver accepting everything: the dataset bytes arrive as
  storescu sent them; the summary and exit code 0; to a closed port: exit 1, failures
  counted; to a node without the retrieve role, or an unknown one: refused, nothing sent;
- a receiver that accepts only uncompressed syntaxes gets a JPEG object converted
  (pixels equal to pydicom's decoding of the original);
- a ``[forward]`` rule (CT to a workstation): a CT stored by storescu arrives there, an
  MR does not; the retry schedule (doubling, capped) and the alert after N attempts, on
  a fake clock;
- a node registered with TLS gets the objects over TLS (verified, client certificate);
- the web "send to" as a physician (progress, result), refused without CSRF and for an
  administrator;
- the audit records: begin before, outcome with counts, no patient data readable.
"""

from __future__ import annotations

import ssl
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from pydicom import dcmread
from pydicom.data import get_testdata_file
from pydicom.uid import (
    UID,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEGBaseline8Bit,
    generate_uid,
)
from pynetdicom import AE as ClientAE
from pynetdicom import AllStoragePresentationContexts, build_context, evt
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    CTImageStorage,
    MRImageStorage,
)
from sqlalchemy import delete, insert, select

from pacsvault.config.forward import ForwardSettings
from pacsvault.dicom import forward, retrieve, send
from pacsvault.dicomfile import render
from pacsvault.index.models import Instance
from pacsvault.index.records import StoredInstance
from tests import corpus
from tests.harness.peers import StoreSCP
from tests.helpers import (
    Server,
    VaultDir,
    events,
    free_port,
    make_vault,
    start_server,
    storescu,
)
from tests.web_helpers import client, page_csrf, sign_in

pytestmark = pytest.mark.slow

LOCAL = "127.0.0.1"
MODALITY, ALL, PLAIN, FWD, STOREONLY, GONE = (
    "SNDMOD", "SNDALL", "SNDPLAIN", "SNDFWD", "SNDSTORE", "SNDGONE")
PHYSICIAN, PASSWORD = "drsend", "correct horse battery staple 20"
PATIENT_NAME = "Quetzal^Sendtest"


@dataclass
class Env:
    root: Path
    vault: VaultDir
    server: Server
    everything: StoreSCP
    plain: StoreSCP
    workstation: StoreSCP
    ct: list[Path]  # one CT series, explicit VR little endian, as storescu sent it
    ct_study: str
    jpeg: Path
    jpeg_study: str


def _ct(out: Path, count: int, *, modality: str = "CT") -> list[Path]:
    paths = corpus.synthetic_ct_series(out, count, size=32)
    for path in paths:
        ds = dcmread(path)
        ds.PatientName, ds.PatientID = PATIENT_NAME, "PVSEND01"
        if modality != "CT":
            ds.Modality = modality
            ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = MRImageStorage
        ds.save_as(path, enforce_file_format=True)
    return paths


def _jpeg(out: Path) -> Path:
    ds = dcmread(str(get_testdata_file("SC_rgb_jpeg_dcmtk.dcm")))
    ds.PatientName, ds.PatientID = PATIENT_NAME, "PVSEND01"
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    path = out / "jpeg.dcm"
    ds.save_as(path, enforce_file_format=True)
    return path


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    root = tmp_path_factory.mktemp("send")
    render.register_plugins()
    vault = make_vault(root / "v")
    scps: list[StoreSCP] = []
    server: Server | None = None
    try:
        # +B: written as received, so "as stored" is checked byte for byte
        everything = StoreSCP.start(ALL, root, "+B", "+xa")
        scps.append(everything)
        plain = StoreSCP.start(PLAIN, root, "+B")  # dcmtk's default: uncompressed only
        scps.append(plain)
        workstation = StoreSCP.start(FWD, root, "+B", "+xa")
        scps.append(workstation)
        v = vault.open()
        try:
            v.nodes.add(MODALITY, LOCAL, roles=("store",))
            v.nodes.add(ALL, LOCAL, everything.port, roles=("retrieve",))
            v.nodes.add(PLAIN, LOCAL, plain.port, roles=("retrieve",))
            v.nodes.add(FWD, LOCAL, workstation.port, roles=("retrieve",))
            v.nodes.add(STOREONLY, LOCAL, free_port(), roles=("store",))
            v.nodes.add(GONE, LOCAL, free_port(), roles=("retrieve",))  # nothing listens
            v.accounts.add_user(PHYSICIAN, ["physician"], PASSWORD, by="test")
        finally:
            v.close()
        vault.set_toml("forward", "rules", f'[{{ node = "{FWD}", modality = ["CT"] }}]')
        server = start_server(vault)
        ct = _ct(root / "ct", 3)
        jpeg = _jpeg(root)
        for files, extra in ((ct, ()), ([jpeg], ("-xy",))):
            res = storescu(server.port, files, calling=MODALITY, extra=extra)
            assert res.returncode == 0, res.stdout + res.stderr
        yield Env(root, vault, server, everything, plain, workstation, ct,
                  str(dcmread(ct[0]).StudyInstanceUID), jpeg,
                  str(dcmread(jpeg).StudyInstanceUID))
    finally:
        if server is not None:
            server.stop()
        for scp in scps:
            scp.stop()


def _body(path: Path) -> bytes:
    data = path.read_bytes()
    found = retrieve.split(data)
    assert found is not None, path
    return data[found[1]:]


def _sent(vault: VaultDir, destination: str) -> list[dict[str, object]]:
    return [e for e in events(vault, "dicom.send") if e.get("destination") == destination]


def test_cli_send_arrives_byte_identical(env: Env) -> None:
    res = env.vault.cli("send", "--to", ALL, "--study", env.ct_study)
    assert res.returncode == 0, res.stdout + res.stderr
    assert f"sent 3, warnings 0, failed 0 of 3 to {ALL}" in res.stdout
    received = env.everything.files()
    for path in env.ct:
        uid = str(dcmread(path).SOPInstanceUID)
        assert uid in received
        assert _body(received[uid]) == _body(path)  # as storescu sent it
    for output in (res.stdout, res.stderr):  # no patient data or UID on the terminal
        assert PATIENT_NAME not in output and env.ct_study not in output
    trail = events(env.vault)
    begin = [e for e in trail
             if e["action"] == "dicom.send.begin" and e.get("destination") == ALL]
    done = [e for e in trail if e["action"] == "dicom.send" and e.get("destination") == ALL]
    assert begin and begin[0]["instances"] == 3 and begin[0]["origin"] == "cli"
    assert begin[0]["code"] == "110102"  # BEGIN_TRANSFERRING_DICOM_INSTANCES (DCM)
    assert done[0]["sent"] == 3 and done[0]["failed"] == 0 and done[0]["outcome"] == "success"
    assert done[0]["study_uids"] == [env.ct_study]  # sealed reference, not in the text
    assert env.ct_study not in str(done[0]["message"]) + str(done[0].get("converted_to"))


def test_cli_send_one_series_and_failure_exit_code(env: Env) -> None:
    series = str(dcmread(env.ct[0]).SeriesInstanceUID)
    res = env.vault.cli("send", "--to", GONE, "--study", env.ct_study, "--series", series,
                        check=False)
    assert res.returncode == 1, res.stdout + res.stderr
    assert f"sent 0, warnings 0, failed 3 of 3 to {GONE}" in res.stdout
    assert "could not be reached" in res.stderr and "instance 1/3" not in res.stderr
    done = _sent(env.vault, GONE)
    assert done and done[-1]["failed"] == 3 and done[-1]["outcome"] == "serious_failure"


def test_send_refused_without_the_retrieve_role(env: Env) -> None:
    nodes = (STOREONLY, "NOSUCHNODE")  # registered for storing only; not registered
    for node in nodes:
        res = env.vault.cli("send", "--to", node, "--study", env.ct_study, check=False)
        assert res.returncode == 2, res.stdout + res.stderr
        assert "retrieve role" in res.stderr
    trail = events(env.vault)
    for node in nodes:
        refused = [e for e in trail
                   if e["action"] == "dicom.send.refused" and e["destination"] == node]
        assert refused and refused[-1]["code"] == "110113"  # security alert
        assert not [e for e in trail  # nothing began
                    if e["action"] == "dicom.send.begin" and e.get("destination") == node]


def test_receiver_without_the_stored_syntax_gets_it_converted(env: Env) -> None:
    res = env.vault.cli("send", "--to", PLAIN, "--study", env.jpeg_study)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "1 converted" in res.stdout
    original = dcmread(env.jpeg)
    received = dcmread(env.plain.files()[str(original.SOPInstanceUID)])
    assert received.file_meta.TransferSyntaxUID in (ExplicitVRLittleEndian,
                                                   ImplicitVRLittleEndian)
    assert not UID(received.file_meta.TransferSyntaxUID).is_compressed
    assert received.pixel_array.shape == original.pixel_array.shape
    done = _sent(env.vault, PLAIN)
    assert done[-1]["converted"] == 1 and "Explicit VR Little Endian" in str(
        done[-1]["converted_to"])


def _cursor_ready(vault: VaultDir, timeout: float = 30) -> None:
    """The forward job has seen the rules (its cursor exists): what is stored from now
    on is forwarded."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        v = vault.open()
        try:
            forward.ensure_tables(v)
            with v.sessions() as session:
                if session.scalar(select(forward.cursors.c.value)) is not None:
                    return
        finally:
            v.close()
        time.sleep(0.5)
    raise AssertionError("the forward job never started")


def test_forward_rule_sends_ct_and_not_mr(env: Env) -> None:
    _cursor_ready(env.vault)
    ct = _ct(env.root / "fwd-ct", 1)
    mr = _ct(env.root / "fwd-mr", 1, modality="MR")
    res = storescu(env.server.port, [*ct, *mr], calling=MODALITY)
    assert res.returncode == 0, res.stdout + res.stderr
    ct_uid, mr_uid = (str(dcmread(p[0]).SOPInstanceUID) for p in (ct, mr))
    deadline = time.monotonic() + 60
    while ct_uid not in env.workstation.files() and time.monotonic() < deadline:
        time.sleep(0.3)
    received = env.workstation.files()
    assert ct_uid in received, env.server.log()[-3000:]
    assert _body(received[ct_uid]) == _body(ct[0])
    v = env.vault.open()
    try:  # the row leaves the queue once the pass ends: nothing else waits (no MR)
        while forward.pending(v).get(FWD, 0) and time.monotonic() < deadline:
            time.sleep(0.3)
        assert forward.pending(v).get(FWD, 0) == 0
    finally:
        v.close()
    assert mr_uid not in env.workstation.files()
    done = [e for e in _sent(env.vault, FWD) if e["origin"] == "forward"]
    assert done and done[-1]["sent"] != 0 and done[-1]["failed"] == 0


def test_forward_retries_with_backoff_and_alerts_once(env: Env) -> None:
    """On a clock a million seconds ahead, so the running server's job (real clock) never
    takes these rows: each failed pass doubles the wait up to the cap; the alert comes
    once, at the third attempt."""
    settings = ForwardSettings(retry_seconds=10, max_retry_seconds=40, alert_after=3)
    v = env.vault.open()
    try:
        forward.ensure_tables(v)
        with v.sessions() as session, session.begin():
            pk = session.scalar(select(Instance.pk).order_by(Instance.pk).limit(1))
            now = time.time() + 1e6
            session.execute(insert(forward.queue).values(
                node=GONE, instance_pk=pk, attempts=0, due=int(now), alerted=False))
        waits = []
        for _ in range(4):
            def clock(at: float = now) -> float:
                return at

            forward.deliver(v, settings, clock=clock)
            with v.sessions() as session:
                row = session.execute(select(forward.queue.c.attempts, forward.queue.c.due)
                                      .where(forward.queue.c.node == GONE)).one()
            waits.append(int(row[1]) - int(now))
            now = float(row[1])
        assert waits == [10, 20, 40, 40]
        assert row[0] == 4
    finally:
        v.close()
    v = env.vault.open()  # kept in the index: a restart resumes where it was
    try:
        assert forward.pending(v).get(GONE) == 1
        with v.sessions() as session, session.begin():
            session.execute(delete(forward.queue).where(forward.queue.c.node == GONE))
    finally:
        v.close()
    alerts = [e for e in events(env.vault, "forward.failing") if e["destination"] == GONE]
    assert len(alerts) == 1 and alerts[0]["outcome"] == "serious_failure"


def _browser(env: Env) -> httpx.Client:
    return client(env.server.https_port, env.vault.data / "tls" / "ca.crt")


def test_web_send_to_as_physician(env: Env) -> None:
    with _browser(env) as doctor:
        sign_in(doctor, PHYSICIAN, PASSWORD)
        form = doctor.get("/account/send", params={"study": env.ct_study})
        assert form.status_code == 200
        assert f'value="{PLAIN}"' in form.text and f'value="{STOREONLY}"' not in form.text
        csrf = page_csrf(doctor)
        assert 'href="/account/send"' in doctor.get("/account").text  # reached from there
        no_csrf = doctor.post("/account/send", data={"study": env.ct_study, "node": PLAIN})
        assert no_csrf.status_code == 403
        refused = doctor.post("/account/send", data={"csrf": csrf, "study": env.ct_study,
                                                      "node": STOREONLY})
        assert refused.status_code == 400
        started = doctor.post("/account/send", data={"csrf": csrf, "study": env.ct_study,
                                                      "node": PLAIN})
        assert started.status_code == 303, started.text
        job = started.headers["location"].split("job=")[1]
        deadline = time.monotonic() + 60
        while True:
            state = doctor.get("/account/send/progress", params={"job": job}).json()
            if not state["running"] or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        assert state["ok"] and state["sent"] == 3 and state["total"] == 3, str(state)
        shown = doctor.get("/account/send", params={"job": job})
        assert shown.status_code == 200 and 'id="send-result"' in shown.text
    received = env.plain.files()
    assert all(str(dcmread(p).SOPInstanceUID) in received for p in env.ct)
    web = [e for e in _sent(env.vault, PLAIN) if e["origin"] == "web"]
    assert web and web[-1]["user"] == PHYSICIAN and web[-1]["sent"] == 3
    assert web[-1]["address"] == LOCAL


def test_web_send_to_refused_for_other_roles(env: Env) -> None:
    with _browser(env) as admin:
        sign_in(admin, env.vault.admin_name, env.vault.admin_password)
        assert admin.get("/account/send").status_code == 403
        csrf = page_csrf(admin)
        res = admin.post("/account/send", data={"csrf": csrf, "study": env.ct_study,
                                                "node": ALL})
        assert res.status_code == 403
        assert admin.get("/account/send/progress", params={"job": "x"}).status_code == 403


def test_cli_send_over_tls_to_a_tls_node(env: Env) -> None:
    """A node registered with TLS: the archive verifies its listener certificate against
    the vault CA and presents its client certificate (the C-MOVE client context)."""
    port, certs = free_port(), env.root / "tls-certs"
    env.vault.add_node("SNDTLS", "--tls", "--roles", "retrieve", "--port", str(port))
    env.vault.cli("node", "cert", "SNDTLS", "--out", certs)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(certs / "SNDTLS-listener.crt", certs / "SNDTLS-listener.key")
    ctx.load_verify_locations(cafile=str(certs / "ca.crt"))
    ctx.verify_mode = ssl.CERT_REQUIRED
    received: list[tuple[str, bool]] = []

    def on_store(event: evt.Event) -> int:
        sock = event.assoc.dul.socket.socket if event.assoc.dul.socket else None
        received.append((str(event.dataset.SOPInstanceUID), isinstance(sock, ssl.SSLSocket)))
        return 0x0000

    ae = ClientAE(ae_title="SNDTLS")
    ae.supported_contexts = AllStoragePresentationContexts
    scp = ae.start_server((LOCAL, port), block=False, ssl_context=ctx,
                          evt_handlers=[(evt.EVT_C_STORE, on_store)])
    assert scp is not None
    try:
        series = str(dcmread(env.ct[0]).SeriesInstanceUID)
        res = env.vault.cli("send", "--to", "SNDTLS", "--study", env.ct_study,
                            "--series", series, check=False)
    finally:
        scp.shutdown()
    assert res.returncode == 0, res.stdout + res.stderr
    assert sorted(uid for uid, _ in received) == sorted(
        str(dcmread(p).SOPInstanceUID) for p in env.ct)
    assert all(tls for _, tls in received)


def test_receiver_accepting_no_syntax_the_object_can_leave_in_is_a_clear_failure(
        tmp_path: Path) -> None:
    """A receiver that takes CT only as JPEG: the vault never encodes lossily, so the
    instance is not sent, with the reason (no server needed)."""
    path = _ct(tmp_path, 1)[0]
    ds = dcmread(path)
    context = build_context(CTImageStorage, [JPEGBaseline8Bit])
    context._as_scu = True  # as an accepted context of an association we requested
    item = StoredInstance(str(ds.SOPInstanceUID), "", "", "obj", uuid.uuid4(),
                          path.stat().st_size, str(CTImageStorage), ExplicitVRLittleEndian)
    sent, converted, why = send.prepare([context], item, path.read_bytes())
    assert sent is None and not converted
    assert "accepts no syntax" in why and str(ds.SOPInstanceUID) not in why
