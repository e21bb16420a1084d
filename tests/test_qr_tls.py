"""Query/retrieve over DICOM TLS with pynetdicom (dcmtk's movescu/getscu have no TLS in
Debian's build): C-FIND finds every study, C-GET and C-MOVE return every corpus instance
identical to what was stored, for every transfer syntax of the corpus. A C-MOVE to a node
registered with --tls goes out over TLS with the vault's own certificate; one registered
without it never reaches a TLS-only peer."""

from __future__ import annotations

import ssl
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset
from pynetdicom import AE, build_role, evt
from pynetdicom.association import Association
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelGet,
    StudyRootQueryRetrieveInformationModelMove,
)

from tests import corpus
from tests.helpers import AE as SERVER_AE
from tests.helpers import Server, VaultDir, free_port, make_vault, start_server, storescu

pytestmark = pytest.mark.slow
TRAILING_PADDING = 0xFFFCFFFC
WS = "WS"
LOCAL = "127.0.0.1"


@dataclass
class Env:
    vault: VaultDir
    server: Server
    files: list[corpus.CorpusFile]
    certs: Path
    ws_port: int
    plain_ws_port: int
    pairs: set[tuple[str, str]] = field(default_factory=set)  # (SOP class, transfer syntax)

    @property
    def ca(self) -> Path:
        return self.certs / "ca.crt"


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    root = tmp_path_factory.mktemp("qrtls")
    vault = make_vault(root / "v")
    vault.add_node("MOD")
    ws_port, plain_ws_port = free_port(), free_port()
    vault.add_node(WS, "--tls", "--client-cert", "--roles", "query,retrieve",
                   "--port", str(ws_port))
    # Registered without --tls, but its port is served by a TLS-only peer in the test.
    vault.add_node("PLAINWS", "--roles", "retrieve", "--port", str(plain_ws_port))
    certs = root / "certs"
    vault.cli("node", "cert", WS, "--out", certs)
    files = corpus.build(root / "corpus")
    server = start_server(vault)
    try:
        for f in files:
            res = storescu(server.port, [f.path], calling="MOD", extra=f.proposal)
            assert res.returncode == 0, f"{f.path.name}: {res.stdout}{res.stderr}"
        pairs = set()
        for f in files:
            ds = dcmread(f.path, stop_before_pixels=True)
            pairs.add((str(ds.SOPClassUID), f.transfer_syntax))
        yield Env(vault, server, files, certs, ws_port, plain_ws_port, pairs)
    finally:
        server.stop()


# --- TLS contexts ----------------------------------------------------------------------


def ws_client_context(env: Env) -> ssl.SSLContext:
    """The workstation calling in: verifies the vault, presents its own certificate."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.load_verify_locations(cafile=str(env.ca))
    ctx.load_cert_chain(env.certs / f"{WS}.crt", env.certs / f"{WS}.key")
    return ctx


def ws_server_context(env: Env) -> ssl.SSLContext:
    """The workstation's listener: mutual TLS, only certificates from the vault's CA.
    It serves its listener certificate (serverAuth): its node certificate is client-only."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(env.certs / f"{WS}-listener.crt", env.certs / f"{WS}-listener.key")
    ctx.load_verify_locations(cafile=str(env.ca))
    ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


def associate(
    env: Env, ae: AE, *, ext_neg: list[Any] | None = None,
    evt_handlers: list[Any] | None = None,
) -> Association:
    assoc = ae.associate(LOCAL, env.server.tls_port, ae_title=SERVER_AE,
                         tls_args=(ws_client_context(env), LOCAL), ext_neg=ext_neg,
                         evt_handlers=evt_handlers)
    assert assoc.is_established, "association over TLS was not accepted"
    return assoc


def study_identifier(study_uid: str = "") -> Dataset:
    ds = Dataset()
    ds.QueryRetrieveLevel = "STUDY"
    ds.StudyInstanceUID = study_uid
    return ds


# --- comparison ------------------------------------------------------------------------


@dataclass
class Received:
    datasets: dict[str, Dataset] = field(default_factory=dict)
    peers: list[dict[str, object]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def on_store(self, event: evt.Event) -> int:
        ds: Dataset = event.dataset
        ds.file_meta = event.file_meta
        cert = None
        sock = event.assoc.dul.socket.socket if event.assoc.dul.socket else None
        if isinstance(sock, ssl.SSLSocket):
            cert = sock.getpeercert()
        with self.lock:
            self.datasets[str(ds.SOPInstanceUID)] = ds
            self.peers.append({"tls": isinstance(sock, ssl.SSLSocket), "cert": cert,
                               "calling": event.assoc.requestor.ae_title})
        return 0x0000


def assert_identical(back: Dataset, f: corpus.CorpusFile) -> None:
    original = dcmread(f.path)
    assert back.file_meta.TransferSyntaxUID == f.transfer_syntax, f.path.name
    # storescu drops Data Set Trailing Padding (FFFC,FFFC) when sending (PS3.5 7.5).
    if TRAILING_PADDING in original:
        del original[TRAILING_PADDING]
    assert [e.tag for e in back] == [e.tag for e in original], f.path.name
    for elem in original:
        assert back[elem.tag].value == elem.value, f"{f.path.name} {elem.tag}"
    assert back.PixelData == original.PixelData, f.path.name


# --- C-FIND ----------------------------------------------------------------------------


def test_find_over_tls_returns_every_study(env: Env) -> None:
    ae = AE(ae_title=WS)
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelFind)
    assoc = associate(env, ae)
    try:
        query = study_identifier()
        query.PatientName = ""
        answers: list[Dataset] = []
        for status, identifier in assoc.send_c_find(
            query, StudyRootQueryRetrieveInformationModelFind
        ):
            assert status is not None and status.Status in (0xFF00, 0xFF01, 0x0000)
            if status.Status in (0xFF00, 0xFF01):
                assert identifier is not None
                answers.append(identifier)
    finally:
        assoc.release()
    found = {str(a.StudyInstanceUID): str(a.PatientName) for a in answers}
    assert found == {f.study_uid: f.patient_name for f in env.files}


# --- C-GET -----------------------------------------------------------------------------


def test_get_over_tls_returns_every_instance_identical(env: Env) -> None:
    got = Received()
    ae = AE(ae_title=WS)
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelGet)
    roles = []
    for sop_class, syntax in sorted(env.pairs):
        ae.add_requested_context(sop_class, syntax)
        roles.append(build_role(sop_class, scp_role=True))
    assoc = associate(env, ae, ext_neg=roles, evt_handlers=[(evt.EVT_C_STORE, got.on_store)])
    try:
        for f in env.files:
            statuses = [
                s for s, _ in assoc.send_c_get(
                    study_identifier(f.study_uid), StudyRootQueryRetrieveInformationModelGet)
            ]
            final = statuses[-1]
            assert final is not None and final.Status == 0x0000, f.path.name
            assert final.NumberOfCompletedSuboperations == 1, f.path.name
            assert final.get("NumberOfFailedSuboperations", 0) == 0, f.path.name
    finally:
        assoc.release()
    assert set(got.datasets) == {f.sop_uid for f in env.files}
    for f in env.files:
        assert_identical(got.datasets[f.sop_uid], f)


# --- C-MOVE ----------------------------------------------------------------------------


def storage_scp(env: Env, port: int, ae_title: str, received: Received) -> object:
    scp = AE(ae_title=ae_title)
    for sop_class, syntax in sorted(env.pairs):
        scp.add_supported_context(sop_class, syntax)
    return scp.start_server(
        (LOCAL, port), block=False, ssl_context=ws_server_context(env),
        evt_handlers=[(evt.EVT_C_STORE, received.on_store)],
    )


def move_study(env: Env, study_uid: str, destination: str) -> list[Dataset]:
    ae = AE(ae_title=WS)
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelMove)
    assoc = associate(env, ae)
    try:
        return [
            s for s, _ in assoc.send_c_move(
                study_identifier(study_uid), destination,
                StudyRootQueryRetrieveInformationModelMove)
            if s is not None
        ]
    finally:
        assoc.release()


def test_move_over_tls_to_mutual_tls_destination(env: Env) -> None:
    got = Received()
    scp = storage_scp(env, env.ws_port, WS, got)
    try:
        for f in env.files:
            final = move_study(env, f.study_uid, WS)[-1]
            assert final.Status == 0x0000, f"{f.path.name}: {final.Status:04X}"
            assert final.NumberOfCompletedSuboperations == 1, f.path.name
    finally:
        scp.shutdown()  # type: ignore[attr-defined]
    assert set(got.datasets) == {f.sop_uid for f in env.files}
    for f in env.files:
        assert_identical(got.datasets[f.sop_uid], f)
    # Every sub-association came over TLS, from the vault, with a certificate of its CA
    # (CERT_REQUIRED would have failed the handshake otherwise).
    assert got.peers and all(p["tls"] for p in got.peers)
    assert {p["calling"] for p in got.peers} == {SERVER_AE}
    subjects = {dict(x[0] for x in p["cert"]["subject"])["commonName"]  # type: ignore[index]
                for p in got.peers}
    assert subjects == {SERVER_AE}


def test_move_to_node_without_tls_never_reaches_tls_only_peer(env: Env) -> None:
    got = Received()
    scp = storage_scp(env, env.plain_ws_port, "PLAINWS", got)
    try:
        statuses = move_study(env, env.files[0].study_uid, "PLAINWS")
    finally:
        scp.shutdown()  # type: ignore[attr-defined]
    final = statuses[-1]
    # The plain A-ASSOCIATE-RQ fails the peer's TLS handshake: a registered destination
    # that cannot be reached is A702 (sub-operations failed), not A801 (issue 13, defect 1).
    assert final.Status == 0xA702, f"{final.Status:04X}"
    assert final.get("NumberOfCompletedSuboperations", 0) == 0
    assert not got.datasets
