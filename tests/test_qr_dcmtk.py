"""Query/Retrieve over the plain port with real dcmtk peers (findscu, movescu, getscu, storescp).

One vault and one server serve the whole module. They hold the 13-file corpus (one study
per distinctive patient), a three-instance study in two series for corpus patient 00, and a
200-slice CT study for the C-CANCEL test, all pushed with dcmtk storescu. Answers are read
from the files findscu writes (``-X``), retrievals from what the destinations actually
received; dcmtk's printed final status is checked only as a complement (movescu and getscu
3.6.7 exit 0 after some failures).

Registered nodes:
    WS      store, query, retrieve (the workstation that pushes, queries and retrieves)
    DEST    retrieve, port of a dcmtk ``storescp +xa -aet DEST`` (C-MOVE destination)
    PYDEST  retrieve, port of an in-process pynetdicom storage SCP (slow, counts stores)
    MOD     added without --roles: store only; granted query while the server runs
    NORETR  store only, port of the sink storescp
    NOPORT  retrieve, no port
NOTREG is the AE title of the sink storescp and is never registered: nothing may reach it.
"""

from __future__ import annotations

import itertools
import subprocess
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.uid import (
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEGBaseline8Bit,
    generate_uid,
)
from pynetdicom import AE as ClientAE
from pynetdicom import AllStoragePresentationContexts, build_role, evt
from pynetdicom.association import Association
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    CTImageStorage,
    PatientRootQueryRetrieveInformationModelMove,
    SecondaryCaptureImageStorage,
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelGet,
    StudyRootQueryRetrieveInformationModelMove,
)
from pynetdicom.transport import ThreadedAssociationServer

from pacsvault.audit import EventCode, Outcome
from pacsvault.vault import Vault
from tests import corpus
from tests.harness.backends import Backend
from tests.harness.peers import StoreSCP
from tests.helpers import (
    AE,
    Server,
    VaultDir,
    dcmtk,
    dcmtk_env,
    events,
    start_server,
    storescu,
    wait_events,
)

pytestmark = pytest.mark.slow

LOCAL = "127.0.0.1"
WS, DEST, PYDEST, MOD, NORETR, NOPORT, NOTREG = (
    "WS", "DEST", "PYDEST", "MOD", "NORETR", "NOPORT", "NOTREG"
)
TRAILING_PADDING = 0xFFFCFFFC
BATCH = 200

STATUS_SUCCESS = 0x0000
STATUS_CANCEL = 0xFE00
STATUS_OUT_OF_RESOURCES = 0xA700
STATUS_SUBOPERATIONS_FAILED = 0xA702
STATUS_MOVE_DESTINATION_UNKNOWN = 0xA801
PENDING = (0xFF00, 0xFF01)
UNCOMPRESSED = (ImplicitVRLittleEndian, ExplicitVRLittleEndian)


# --- destinations ----------------------------------------------------------------------


@dataclass
class PyStoreSCP:
    """An in-process pynetdicom storage SCP that counts stores, slowly on purpose."""

    ae_title: str
    delay: float
    refuse: bool = False  # answer every C-STORE with A700 (out of resources)
    received: list[str] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _server: ThreadedAssociationServer | None = None

    def start(self) -> int:
        ae = ClientAE(ae_title=self.ae_title)
        ae.supported_contexts = AllStoragePresentationContexts
        server = ae.start_server(
            (LOCAL, 0), block=False, evt_handlers=[(evt.EVT_C_STORE, self._on_store)]
        )
        assert server is not None
        self._server = server
        return int(server.server_address[1])

    def _on_store(self, event: evt.Event) -> int:
        time.sleep(self.delay)
        if self.refuse:
            return STATUS_OUT_OF_RESOURCES
        with self._lock:
            self.received.append(str(event.dataset.SOPInstanceUID))
        return STATUS_SUCCESS

    def count(self) -> int:
        with self._lock:
            return len(self.received)

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()


# --- the shared environment ------------------------------------------------------------


@dataclass(frozen=True)
class Multi:
    """A second study of corpus patient 00: CT series (2 instances) and CR series (1)."""

    study_uid: str
    ct_series: str
    cr_series: str
    ct_sops: tuple[str, ...]
    cr_sops: tuple[str, ...]
    paths: tuple[Path, ...]


@dataclass
class Env:
    root: Path
    vault: VaultDir
    server: Server
    files: list[corpus.CorpusFile]
    multi: Multi
    batch_study: str
    batch_sops: list[str]
    dest: StoreSCP
    sink: StoreSCP
    pydest: PyStoreSCP
    counter: Iterator[int]

    def outdir(self, prefix: str) -> Path:
        path = self.root / "out" / f"{prefix}-{next(self.counter):03d}"
        path.mkdir(parents=True)
        return path

    def by_name(self, name: str) -> corpus.CorpusFile:
        return next(f for f in self.files if name in f.path.name)


def _multi_study(files: list[corpus.CorpusFile], out: Path) -> Multi:
    out.mkdir(parents=True)
    patient = dcmread(files[0].path)
    study_uid, ct_series, cr_series = generate_uid(), generate_uid(), generate_uid()
    paths: list[Path] = []
    ct_sops: list[str] = []
    cr_sops: list[str] = []
    plan = [(files[0].path, ct_series, 2, 1, ct_sops), (files[0].path, ct_series, 2, 2, ct_sops),
            (files[12].path, cr_series, 3, 1, cr_sops)]
    for n, (source, series, series_number, instance_number, sops) in enumerate(plan):
        ds = dcmread(source)
        ds.PatientName, ds.PatientID = patient.PatientName, patient.PatientID
        ds.PatientBirthDate = patient.PatientBirthDate
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study_uid, series
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.StudyDate, ds.StudyTime = "20240315", "093000"
        ds.AccessionNumber, ds.StudyID = "ACCMULTI1", "M1"
        ds.SeriesNumber, ds.InstanceNumber = series_number, instance_number
        path = out / f"multi{n}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
        sops.append(str(ds.SOPInstanceUID))
    return Multi(study_uid, ct_series, cr_series, tuple(ct_sops), tuple(cr_sops), tuple(paths))


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory, backend: Backend) -> Iterator[Env]:
    """Once per index backend (issue 16): embedded, then sealed PostgreSQL."""
    root = tmp_path_factory.mktemp("qr")
    vault = backend.make_vault(root / "v")
    pydest = PyStoreSCP(PYDEST, delay=0.02)
    scps: list[StoreSCP] = []
    server: Server | None = None
    try:
        dest = StoreSCP.start(DEST, root, "-v", "+xa")
        scps.append(dest)
        sink = StoreSCP.start(NOTREG, root, "-v", "+xa")
        scps.append(sink)
        pydest_port = pydest.start()
        # The two nodes the issue names go through the CLI; the rest in one vault opening.
        vault.add_node(DEST, "--port", str(dest.port), "--roles", "retrieve")
        vault.add_node(MOD)  # no --roles: a new node gets only store
        v = Vault.open(vault.data, vault.key)
        try:
            v.nodes.add(WS, LOCAL, roles=("store", "query", "retrieve"))
            v.nodes.add(PYDEST, LOCAL, pydest_port, roles=("retrieve",))
            v.nodes.add(NORETR, LOCAL, sink.port, roles=("store",))
            v.nodes.add(NOPORT, LOCAL, None, roles=("retrieve",))
        finally:
            v.close()
        server = start_server(vault)
        files = corpus.build(root / "corpus")
        multi = _multi_study(files, root / "multi")
        batch = corpus.synthetic_ct_series(root / "batch", BATCH, size=64)
        # one storescu per proposal, run side by side (the server takes 32 associations)
        pushes = [([f.path], f.proposal) for f in files] + [([*multi.paths, *batch], ())]
        srv = server
        with ThreadPoolExecutor(max_workers=6) as pool:
            results = list(pool.map(
                lambda push: storescu(srv.port, push[0], calling=WS, extra=push[1]), pushes))
        for (paths, _), res in zip(pushes, results, strict=True):
            assert res.returncode == 0, f"{paths[0].name}: {res.stdout}{res.stderr}"
        first = dcmread(batch[0], stop_before_pixels=True)
        batch_sops = [str(dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in batch]
        yield Env(root, vault, server, files, multi, str(first.StudyInstanceUID), batch_sops,
                  dest, sink, pydest, itertools.count())
    finally:
        if server is not None:
            server.stop()
        for scp in scps:
            scp.stop()
        pydest.stop()


# --- dcmtk clients -------------------------------------------------------------------------


def _keys(keys: list[str]) -> list[str]:
    return [arg for key in keys for arg in ("-k", key)]


def _run(args: list[str], timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, capture_output=True, text=True, env=dcmtk_env(), timeout=timeout)


def findscu(env: Env, keys: list[str], *, model: str = "-S", calling: str = WS,
            ) -> tuple[subprocess.CompletedProcess[str], list[Dataset]]:
    """Run findscu -X; returns the process and the answers it wrote (rsp0001.dcm …)."""
    out = env.outdir("find")
    res = _run([dcmtk("findscu"), model, "-aet", calling, "-aec", AE, "-X", "-od", str(out),
                *_keys(keys), LOCAL, str(env.server.port)])
    return res, [dcmread(p) for p in sorted(out.glob("rsp*.dcm"))]


def movescu(env: Env, keys: list[str], *, destination: str, model: str = "-S",
            calling: str = WS) -> subprocess.CompletedProcess[str]:
    return _run([dcmtk("movescu"), "-v", model, "-aet", calling, "-aec", AE,
                 "-aem", destination, *_keys(keys), LOCAL, str(env.server.port)])


def getscu(env: Env, keys: list[str], out: Path, *, calling: str = WS, model: str = "-S",
           extra: tuple[str, ...] = ()) -> subprocess.CompletedProcess[str]:
    return _run([dcmtk("getscu"), "-v", model, *extra, "-aet", calling, "-aec", AE,
                 "-od", str(out), *_keys(keys), LOCAL, str(env.server.port)])


def _ok(res: subprocess.CompletedProcess[str]) -> str:
    return f"exit {res.returncode}\n{res.stdout}\n{res.stderr}"


# --- pynetdicom client ---------------------------------------------------------------------


def associate(env: Env, *contexts: str, calling: str = WS) -> Association:
    ae = ClientAE(ae_title=calling)
    for cx in contexts:
        ae.add_requested_context(cx)
    assoc = ae.associate(LOCAL, env.server.port, ae_title=AE)
    assert assoc.is_established
    return assoc


def c_move(env: Env, identifier: Dataset, destination: str, *,
           model: str = StudyRootQueryRetrieveInformationModelMove) -> list[Dataset]:
    """All C-MOVE responses (status datasets) for one request."""
    assoc = associate(env, model)
    try:
        return [status for status, _ in assoc.send_c_move(identifier, destination, model)
                if status]
    finally:
        assoc.release()


def study_identifier(study_uid: str | None, level: str = "STUDY") -> Dataset:
    ds = Dataset()
    ds.QueryRetrieveLevel = level
    if study_uid is not None:
        ds.StudyInstanceUID = study_uid
    return ds


# --- assertions ----------------------------------------------------------------------------


def values(ds: Dataset, keyword: str) -> list[str]:
    """An attribute's values as strings; [] when absent or empty."""
    if keyword not in ds:
        return []
    value = ds[keyword].value
    if value is None or value == "":
        return []
    if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue":
        return [str(v) for v in value]
    return [str(value)]


def uids(answers: list[Dataset], keyword: str) -> set[str]:
    found = [str(a[keyword].value) for a in answers]
    assert len(found) == len(set(found)), f"duplicate answers: {found}"
    return set(found)


def assert_same_object(original_path: Path, received_path: Path) -> None:
    original = dcmread(original_path)
    back = dcmread(received_path)
    name = original_path.name
    # storescu drops Data Set Trailing Padding (FFFC,FFFC) when sending (PS3.5 7.5).
    if TRAILING_PADDING in original:
        del original[TRAILING_PADDING]
    sent_as, stored_as = back.file_meta.TransferSyntaxUID, original.file_meta.TransferSyntaxUID
    if stored_as.is_compressed or stored_as.is_deflated:
        assert sent_as == stored_as, name  # sent as stored, never transcoded
    else:
        # the peer picks among the uncompressed syntaxes offered (storescp prefers
        # explicit VR, getscu's association accepts implicit VR): a lossless re-encoding
        assert sent_as in UNCOMPRESSED, f"{name}: {sent_as}"
    assert [e.tag for e in back] == [e.tag for e in original], name
    for elem in original:
        assert back[elem.tag].value == elem.value, f"{name} {elem.tag}"
    assert back.PixelData == original.PixelData, name


def is_(value: object, member: Outcome | EventCode) -> bool:
    """An outcome or event code as an event reader may render it (value or name)."""
    return value in (member, member.value, member.name, member.name.lower())


# === C-FIND ===============================================================================

STUDY_KEYS = ["QueryRetrieveLevel=STUDY", "StudyInstanceUID", "PatientName", "PatientID",
              "PatientBirthDate", "StudyDate", "StudyTime", "AccessionNumber",
              "NumberOfStudyRelatedSeries", "NumberOfStudyRelatedInstances",
              "ModalitiesInStudy", "RetrieveAETitle"]


def test_find_study_by_patient_name_wildcard_is_case_insensitive(env: Env) -> None:
    res, answers = findscu(env, [*STUDY_KEYS, "PatientName=quetzal*"])
    assert res.returncode == 0, _ok(res)
    quetzal = [f for f in env.files if f.patient_name.startswith("Quetzal")]
    assert len(quetzal) == 12
    assert uids(answers, "StudyInstanceUID") == {f.study_uid for f in quetzal} | {
        env.multi.study_uid}
    by_study = {str(a.StudyInstanceUID): a for a in answers}
    for f in quetzal:
        original = dcmread(f.path, stop_before_pixels=True)
        a = by_study[f.study_uid]
        assert str(a.PatientName) == f.patient_name
        assert a.PatientID == f.patient_id
        assert a.PatientBirthDate == f.birth_date
        assert values(a, "StudyDate") == values(original, "StudyDate"), f.path.name
        assert values(a, "StudyTime") == values(original, "StudyTime"), f.path.name
        assert int(a.NumberOfStudyRelatedInstances) == 1
        assert int(a.NumberOfStudyRelatedSeries) == 1
        assert values(a, "ModalitiesInStudy") == values(original, "Modality"), f.path.name
        assert a.RetrieveAETitle == AE
        assert a.QueryRetrieveLevel == "STUDY"
    multi = by_study[env.multi.study_uid]
    assert multi.PatientID == env.files[0].patient_id
    assert multi.StudyDate == "20240315"
    assert multi.AccessionNumber == "ACCMULTI1"
    assert int(multi.NumberOfStudyRelatedInstances) == 3
    assert int(multi.NumberOfStudyRelatedSeries) == 2
    assert sorted(values(multi, "ModalitiesInStudy")) == ["CR", "CT"]
    assert multi.RetrieveAETitle == AE

    # upper case and a single-character wildcard: Bartholomew10, 11 and 12
    res, answers = findscu(env, [*STUDY_KEYS, "PatientName=*BARTHOLOMEW1?"])
    assert res.returncode == 0, _ok(res)
    assert uids(answers, "StudyInstanceUID") == {env.files[i].study_uid for i in (10, 11, 12)}

    # UTF-8 name, lower-case query: answered in a character set that keeps the accent
    res, answers = findscu(env, [*STUDY_KEYS, "PatientName=zorglub*"])
    assert res.returncode == 0, _ok(res)
    assert uids(answers, "StudyInstanceUID") == {env.files[1].study_uid}
    assert str(answers[0].PatientName) == "Zorglub^Hélène01"

    found = wait_events(env.vault, "dicom.find", lambda e: e["ae"] == WS and e["level"] == "STUDY"
                        and e["matches"] == 13)
    assert found, "the 13-match study query was not recorded"
    assert is_(found[0]["outcome"], Outcome.SUCCESS)
    assert is_(found[0]["code"], EventCode.QUERY)


def test_find_study_by_date_range(env: Env) -> None:
    multi = -1  # stands for the extra study of patient 00
    cases = {
        "20160101-20201231": {3, 5, 11},
        "20240101-": {12, multi},
        "-20040119": {0},
        "20040826": {1, 4, 6, 8, 9, 10},
    }
    for date, expected in cases.items():
        res, answers = findscu(env, [*STUDY_KEYS, f"StudyDate={date}"])
        assert res.returncode == 0, _ok(res)
        want = {env.multi.study_uid if i == multi else env.files[i].study_uid
                for i in expected}
        assert uids(answers, "StudyInstanceUID") == want, date
        for a in answers:
            assert a.StudyDate, date


def test_find_study_by_uid_and_uid_list(env: Env) -> None:
    one = env.files[4]
    res, answers = findscu(env, [*STUDY_KEYS, f"StudyInstanceUID={one.study_uid}"])
    assert res.returncode == 0, _ok(res)
    assert len(answers) == 1
    assert answers[0].StudyInstanceUID == one.study_uid
    assert str(answers[0].PatientName) == one.patient_name
    assert values(answers[0], "ModalitiesInStudy") == ["NM"]

    listed = [env.files[2].study_uid, env.files[7].study_uid, env.batch_study]
    res, answers = findscu(env, [*STUDY_KEYS, "StudyInstanceUID=" + "\\".join(listed)])
    assert res.returncode == 0, _ok(res)
    assert uids(answers, "StudyInstanceUID") == set(listed)
    batch = next(a for a in answers if a.StudyInstanceUID == env.batch_study)
    assert int(batch.NumberOfStudyRelatedInstances) == BATCH
    assert batch.PatientID == "PVBATCH01"
    assert values(batch, "ModalitiesInStudy") == ["CT"]

    res, answers = findscu(env, [*STUDY_KEYS, "StudyInstanceUID=1.2.3.999.404"])
    assert res.returncode == 0, _ok(res)
    assert answers == []


def test_find_series_and_image_levels_study_root(env: Env) -> None:
    m = env.multi
    res, answers = findscu(env, [
        "QueryRetrieveLevel=SERIES", f"StudyInstanceUID={m.study_uid}", "SeriesInstanceUID",
        "Modality", "SeriesNumber", "NumberOfSeriesRelatedInstances", "RetrieveAETitle",
    ])
    assert res.returncode == 0, _ok(res)
    assert uids(answers, "SeriesInstanceUID") == {m.ct_series, m.cr_series}
    by_series = {str(a.SeriesInstanceUID): a for a in answers}
    ct, cr = by_series[m.ct_series], by_series[m.cr_series]
    assert (ct.Modality, int(ct.SeriesNumber), int(ct.NumberOfSeriesRelatedInstances)) == (
        "CT", 2, 2)
    assert (cr.Modality, int(cr.SeriesNumber), int(cr.NumberOfSeriesRelatedInstances)) == (
        "CR", 3, 1)
    assert all(a.RetrieveAETitle == AE and a.QueryRetrieveLevel == "SERIES" for a in answers)
    assert all(a.StudyInstanceUID == m.study_uid for a in answers)

    # a series-level key as a filter
    res, answers = findscu(env, [
        "QueryRetrieveLevel=SERIES", f"StudyInstanceUID={m.study_uid}", "SeriesInstanceUID",
        "Modality=CR",
    ])
    assert res.returncode == 0, _ok(res)
    assert uids(answers, "SeriesInstanceUID") == {m.cr_series}

    res, answers = findscu(env, [
        "QueryRetrieveLevel=IMAGE", f"StudyInstanceUID={m.study_uid}",
        f"SeriesInstanceUID={m.ct_series}", "SOPInstanceUID", "SOPClassUID", "InstanceNumber",
        "RetrieveAETitle",
    ])
    assert res.returncode == 0, _ok(res)
    assert uids(answers, "SOPInstanceUID") == set(m.ct_sops)
    assert {int(a.InstanceNumber) for a in answers} == {1, 2}
    assert {a.SOPClassUID for a in answers} == {CTImageStorage}
    assert all(a.RetrieveAETitle == AE and a.QueryRetrieveLevel == "IMAGE" for a in answers)

    # IMAGE level by SOP Instance UID across the corpus
    wanted = [env.files[3].sop_uid, env.files[9].sop_uid]
    res, answers = findscu(env, [
        "QueryRetrieveLevel=IMAGE", "StudyInstanceUID=" + "\\".join(
            [env.files[3].study_uid, env.files[9].study_uid]),
        "SeriesInstanceUID", "SOPInstanceUID=" + "\\".join(wanted), "InstanceNumber",
    ])
    assert res.returncode == 0, _ok(res)
    assert uids(answers, "SOPInstanceUID") == set(wanted)
    by_sop = {str(a.SOPInstanceUID): a for a in answers}
    assert int(by_sop[env.files[9].sop_uid].InstanceNumber) == 3


def test_find_patient_root_all_levels(env: Env) -> None:
    p0 = env.files[0]
    m = env.multi
    res, answers = findscu(env, [
        "QueryRetrieveLevel=PATIENT", f"PatientID={p0.patient_id}", "PatientName",
        "PatientBirthDate", "NumberOfPatientRelatedStudies", "NumberOfPatientRelatedSeries",
        "NumberOfPatientRelatedInstances", "RetrieveAETitle",
    ], model="-P")
    assert res.returncode == 0, _ok(res)
    assert len(answers) == 1
    a = answers[0]
    assert (str(a.PatientName), a.PatientID, a.PatientBirthDate) == (
        p0.patient_name, p0.patient_id, p0.birth_date)
    assert int(a.NumberOfPatientRelatedStudies) == 2
    assert int(a.NumberOfPatientRelatedSeries) == 3
    assert int(a.NumberOfPatientRelatedInstances) == 4
    assert a.RetrieveAETitle == AE
    assert a.QueryRetrieveLevel == "PATIENT"

    res, answers = findscu(env, ["QueryRetrieveLevel=PATIENT", "PatientID",
                                 "PatientName=*bartholomew1*"], model="-P")
    assert res.returncode == 0, _ok(res)
    assert uids(answers, "PatientID") == {env.files[i].patient_id for i in (10, 11, 12)}

    res, answers = findscu(env, [
        "QueryRetrieveLevel=STUDY", f"PatientID={p0.patient_id}", "StudyInstanceUID",
        "StudyDate", "NumberOfStudyRelatedInstances", "ModalitiesInStudy",
    ], model="-P")
    assert res.returncode == 0, _ok(res)
    assert uids(answers, "StudyInstanceUID") == {p0.study_uid, m.study_uid}
    counts = {str(a.StudyInstanceUID): int(a.NumberOfStudyRelatedInstances) for a in answers}
    assert counts == {p0.study_uid: 1, m.study_uid: 3}

    res, answers = findscu(env, [
        "QueryRetrieveLevel=SERIES", f"PatientID={p0.patient_id}",
        f"StudyInstanceUID={m.study_uid}", "SeriesInstanceUID", "Modality",
    ], model="-P")
    assert res.returncode == 0, _ok(res)
    assert {(str(a.SeriesInstanceUID), a.Modality) for a in answers} == {
        (m.ct_series, "CT"), (m.cr_series, "CR")}

    res, answers = findscu(env, [
        "QueryRetrieveLevel=IMAGE", f"PatientID={p0.patient_id}",
        f"StudyInstanceUID={m.study_uid}", f"SeriesInstanceUID={m.cr_series}",
        "SOPInstanceUID", "SOPClassUID",
    ], model="-P")
    assert res.returncode == 0, _ok(res)
    assert uids(answers, "SOPInstanceUID") == set(m.cr_sops)

    found = wait_events(env.vault, "dicom.find", lambda e: e["ae"] == WS and e["level"] == "PATIENT"
                        and e["matches"] == 3)
    assert found, "the patient-level query was not recorded"


def test_find_patient_level_in_study_root_is_refused(env: Env) -> None:
    assoc = associate(env, StudyRootQueryRetrieveInformationModelFind)
    try:
        ds = Dataset()
        ds.QueryRetrieveLevel = "PATIENT"
        ds.PatientID = env.files[0].patient_id
        responses = [(s, i) for s, i in assoc.send_c_find(
            ds, StudyRootQueryRetrieveInformationModelFind)]
    finally:
        assoc.release()
    assert responses, "no response"
    assert all(s.Status not in PENDING for s, _ in responses), "an answer was returned"
    assert 0xA000 <= responses[-1][0].Status <= 0xCFFF


# === C-MOVE ===============================================================================


def test_move_studies_to_registered_dcmtk_storescp(env: Env) -> None:
    before = set(env.dest.files())
    studies = [f.study_uid for f in env.files]
    res = movescu(env, ["QueryRetrieveLevel=STUDY", "StudyInstanceUID=" + "\\".join(studies)],
                  destination=DEST)
    assert res.returncode == 0, _ok(res)
    res = movescu(env, ["QueryRetrieveLevel=STUDY", f"StudyInstanceUID={env.multi.study_uid}"],
                  destination=DEST)
    assert res.returncode == 0, _ok(res)
    received = env.dest.files()
    new = set(received) - before
    expected = {f.sop_uid for f in env.files} | set(env.multi.ct_sops) | set(env.multi.cr_sops)
    assert new == expected
    compressed = [f for f in env.files if dcmread(f.path).file_meta.TransferSyntaxUID
                  .is_compressed]
    assert len(compressed) >= 8  # JPEG, JPEG-LS, JPEG 2000, RLE all went through
    for f in env.files:
        assert_same_object(f.path, received[f.sop_uid])
    for path in env.multi.paths:
        sop = str(dcmread(path, stop_before_pixels=True).SOPInstanceUID)
        assert_same_object(path, received[sop])

    begin = wait_events(env.vault, "dicom.move.begin", lambda e: e["destination"] == DEST
                        and e["instances"] == len(env.files))
    assert begin and begin[0]["ae"] == WS
    done = wait_events(env.vault, "dicom.move", lambda e: e["destination"] == DEST
                       and e["sent"] == len(env.files))
    assert done and is_(done[0]["outcome"], Outcome.SUCCESS)
    assert done[0]["ae"] == WS


def test_move_series_and_image_levels(env: Env) -> None:
    m = env.multi
    res = movescu(env, ["QueryRetrieveLevel=SERIES", f"StudyInstanceUID={m.study_uid}",
                        f"SeriesInstanceUID={m.cr_series}"], destination=DEST)
    assert res.returncode == 0, _ok(res)
    pid = env.files[0].patient_id
    res = movescu(env, ["QueryRetrieveLevel=IMAGE", f"PatientID={pid}",
                        f"StudyInstanceUID={m.study_uid}", f"SeriesInstanceUID={m.ct_series}",
                        f"SOPInstanceUID={m.ct_sops[1]}"], destination=DEST, model="-P")
    assert res.returncode == 0, _ok(res)
    found = wait_events(env.vault, "dicom.move", lambda e: e["destination"] == DEST
                        and e["sent"] == 1, count=2)
    assert len(found) >= 2


# === C-GET ================================================================================


def test_get_uncompressed_studies_with_getscu(env: Env) -> None:
    chosen = [env.by_name("CT_small"), env.by_name("MR_small_implicit"),
              env.by_name("synthetic_cr")]
    out = env.outdir("get")
    res = getscu(env, ["QueryRetrieveLevel=STUDY", "StudyInstanceUID=" + "\\".join(
        [*(f.study_uid for f in chosen), env.multi.study_uid])], out)
    assert res.returncode == 0, _ok(res)
    received = {str(dcmread(p, stop_before_pixels=True).SOPInstanceUID): p
                for p in out.iterdir()}
    assert set(received) == ({f.sop_uid for f in chosen} | set(env.multi.ct_sops)
                             | set(env.multi.cr_sops))
    for f in chosen:
        assert_same_object(f.path, received[f.sop_uid])
    for path in env.multi.paths:
        assert_same_object(path, received[str(dcmread(path).SOPInstanceUID)])
    begin = wait_events(env.vault, "dicom.get.begin",
                        lambda e: e["ae"] == WS and e["instances"] == 6)
    assert begin
    done = wait_events(env.vault, "dicom.get", lambda e: e["ae"] == WS and e["sent"] == 6)
    assert done and is_(done[0]["outcome"], Outcome.SUCCESS)




def test_get_jpeg_baseline_with_getscu_preferring_it(env: Env) -> None:
    jpeg = env.by_name("SC_rgb_jpeg_dcmtk")
    out = env.outdir("getjpeg")
    res = getscu(env, ["QueryRetrieveLevel=STUDY", f"StudyInstanceUID={jpeg.study_uid}"], out,
                 extra=("+xy",))
    files = list(out.iterdir())
    assert len(files) == 1, _ok(res)
    assert_same_object(jpeg.path, files[0])


def test_get_jpeg_when_proposed_alone_pynetdicom(env: Env) -> None:
    """C-GET does deliver a compressed object, as stored, when its syntax is unambiguous."""
    jpeg = env.by_name("SC_rgb_jpeg_dcmtk")
    ae = ClientAE(ae_title=WS)
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelGet)
    ae.add_requested_context(SecondaryCaptureImageStorage, [JPEGBaseline8Bit])
    got: list[Dataset] = []

    def on_store(event: evt.Event) -> int:
        ds = event.dataset
        ds.file_meta = event.file_meta
        got.append(ds)
        return STATUS_SUCCESS

    assoc = ae.associate(
        LOCAL, env.server.port, ae_title=AE,
        ext_neg=[build_role(SecondaryCaptureImageStorage, scp_role=True)],
        evt_handlers=[(evt.EVT_C_STORE, on_store)],
    )
    assert assoc.is_established
    try:
        statuses = [s.Status for s, _ in assoc.send_c_get(
            study_identifier(jpeg.study_uid), StudyRootQueryRetrieveInformationModelGet) if s]
    finally:
        assoc.release()
    assert statuses[-1] == STATUS_SUCCESS, [hex(s) for s in statuses]
    assert len(got) == 1
    path = env.outdir("getjpeg-pyn") / "jpeg.dcm"
    got[0].save_as(path, enforce_file_format=True)
    assert_same_object(jpeg.path, path)


# === least privilege ======================================================================


def test_store_only_node_gets_nothing_until_granted_query(env: Env) -> None:
    study = env.files[0].study_uid
    find_keys = ["QueryRetrieveLevel=STUDY", f"StudyInstanceUID={study}", "PatientID"]
    move_keys = ["QueryRetrieveLevel=STUDY", f"StudyInstanceUID={study}"]
    before = set(env.dest.files())

    res, answers = findscu(env, find_keys, calling=MOD)
    assert res.returncode != 0 and answers == [], _ok(res)
    res = movescu(env, move_keys, destination=DEST, calling=MOD)
    assert res.returncode != 0, _ok(res)
    out = env.outdir("get-mod")
    res = getscu(env, move_keys, out, calling=MOD)
    assert res.returncode != 0, _ok(res)
    assert list(out.iterdir()) == []

    refused = wait_events(env.vault, "dicom.qr.contexts_refused", lambda e: e["ae"] == MOD, count=3)
    assert len(refused) == 3
    assert all(is_(e["code"], EventCode.SECURITY_ALERT) for e in refused)
    kinds = [str(e["refused"]) for e in refused]
    assert StudyRootQueryRetrieveInformationModelFind in kinds[0]
    assert StudyRootQueryRetrieveInformationModelMove in kinds[1]
    assert StudyRootQueryRetrieveInformationModelGet in kinds[2]

    # granted query while the server runs: find works, retrieval still does not
    env.vault.cli("node", "set", MOD, "--roles", "store,query")
    res, answers = findscu(env, find_keys, calling=MOD)
    assert res.returncode == 0, _ok(res)
    assert [a.PatientID for a in answers] == [env.files[0].patient_id]
    # movescu proposes FIND and MOVE: FIND is now accepted, so the association is, and
    # movescu reports the missing MOVE context but (dcmtk 3.6.7) still exits 0
    res = movescu(env, move_keys, destination=DEST, calling=MOD)
    assert res.returncode != 0 or "No valid Presentation Context" in res.stdout + res.stderr, (
        _ok(res))
    assert "Received Move Response" not in res.stdout + res.stderr, _ok(res)
    res = getscu(env, move_keys, out, calling=MOD)
    assert res.returncode != 0, _ok(res)
    assert list(out.iterdir()) == []
    assert set(env.dest.files()) == before
    refused = wait_events(env.vault, "dicom.qr.contexts_refused", lambda e: e["ae"] == MOD, count=5)
    assert len(refused) == 5
    assert all(StudyRootQueryRetrieveInformationModelFind not in str(e["refused"])
               for e in refused[3:])


# === unknown destinations =================================================================


def test_move_to_unregistered_ae_is_refused_and_nothing_leaves(env: Env) -> None:
    study = env.files[0].study_uid
    res = movescu(env, ["QueryRetrieveLevel=STUDY", f"StudyInstanceUID={study}"],
                  destination=NOTREG)
    # dcmtk names status A801 "MoveDestinationUnknown" and exits non-zero (69)
    assert res.returncode != 0, _ok(res)
    assert "Final Move Response (Refused: MoveDestinationUnknown)" in res.stdout + res.stderr, (
        _ok(res))

    for destination in (NOTREG, NORETR, NOPORT):
        responses = c_move(env, study_identifier(study), destination)
        assert responses[-1].Status == STATUS_MOVE_DESTINATION_UNKNOWN, destination
        assert all(r.Status not in PENDING for r in responses), destination

    assert env.sink.files() == {}
    assert "Association Received" not in env.sink.log()
    found = wait_events(env.vault, "dicom.move.unknown_destination", lambda e: True, count=4)
    assert {e["destination"] for e in found} >= {NOTREG, NORETR, NOPORT}
    assert all(e["ae"] == WS and is_(e["code"], EventCode.SECURITY_ALERT) for e in found)


# === C-CANCEL =============================================================================


def test_cancel_during_long_move(env: Env) -> None:
    start = env.pydest.count()
    assoc = associate(env, StudyRootQueryRetrieveInformationModelMove)
    responses: list[Dataset] = []
    try:
        context_id = assoc.accepted_contexts[0].context_id
        cancelled = False
        for status, _ in assoc.send_c_move(
            study_identifier(env.batch_study), PYDEST,
            StudyRootQueryRetrieveInformationModelMove, msg_id=7,
        ):
            assert status, "no response (timeout or abort)"
            responses.append(status)
            if status.Status in PENDING and len(responses) == 5 and not cancelled:
                assoc.send_c_cancel(7, context_id)
                cancelled = True
    finally:
        assoc.release()
    final = responses[-1]
    assert final.Status == STATUS_CANCEL, f"0x{final.Status:04X}"
    completed = int(final.NumberOfCompletedSuboperations)
    failed = int(final.get("NumberOfFailedSuboperations", 0))
    warning = int(final.get("NumberOfWarningSuboperations", 0))
    remaining = int(final.NumberOfRemainingSuboperations)
    assert failed == warning == 0
    assert completed + failed + warning + remaining == BATCH
    assert 5 <= completed < BATCH
    for r in responses[:-1]:
        assert r.Status in PENDING
        assert (int(r.NumberOfCompletedSuboperations) + int(r.NumberOfRemainingSuboperations)
                + int(r.NumberOfFailedSuboperations) + int(r.NumberOfWarningSuboperations)
                ) == BATCH
    received = env.pydest.received[start:]
    assert len(received) == completed
    assert received == env.batch_sops[:completed]  # in instance-number order, no gap

    done = wait_events(env.vault, "dicom.move", lambda e: e["destination"] == PYDEST
                       and is_(e["outcome"], Outcome.MINOR_FAILURE))
    assert done and done[0]["sent"] == completed


def test_refused_move_suboperations_are_not_audited_as_success(env: Env) -> None:
    ct = env.by_name("CT_small")
    env.pydest.refuse = True
    try:
        responses = c_move(env, study_identifier(ct.study_uid), PYDEST)
    finally:
        env.pydest.refuse = False
    final = responses[-1]
    assert final.Status == STATUS_SUBOPERATIONS_FAILED, f"0x{final.Status:04X}"
    assert int(final.NumberOfFailedSuboperations) == 1
    assert int(final.get("NumberOfCompletedSuboperations", 0)) == 0
    done = wait_events(env.vault, "dicom.move", lambda e: e["destination"] == PYDEST
                       and ct.study_uid in str(e.get("study_uids")))
    assert done, "the refused C-MOVE was not recorded"
    assert not is_(done[-1]["outcome"], Outcome.SUCCESS), done[-1]
    assert done[-1]["sent"] == 0, done[-1]


# === unique keys ==========================================================================


def _identifier(**attrs: str) -> Dataset:
    ds = Dataset()
    for keyword, value in attrs.items():
        setattr(ds, keyword, value)
    return ds


@pytest.mark.parametrize(
    ("model", "attrs"),
    [
        ("study", {"QueryRetrieveLevel": "STUDY", "StudyInstanceUID": ""}),
        ("study", {"QueryRetrieveLevel": "STUDY", "StudyInstanceUID": "*"}),
        ("study", {"QueryRetrieveLevel": "STUDY", "StudyInstanceUID": "1.2.*"}),
        ("study", {"QueryRetrieveLevel": "STUDY", "PatientID": "PVBATCH01"}),
        ("study", {"QueryRetrieveLevel": "SERIES", "StudyInstanceUID": "BATCH",
                   "SeriesInstanceUID": "*"}),
        ("patient", {"QueryRetrieveLevel": "PATIENT", "PatientID": "PVBATCH*"}),
    ],
    ids=["empty", "star", "prefix", "missing", "series-star", "patient-star"],
)
def test_retrieve_needs_the_unique_key(env: Env, model: str, attrs: dict[str, str]) -> None:
    attrs = {k: env.batch_study if v == "BATCH" else v for k, v in attrs.items()}
    query_model = (StudyRootQueryRetrieveInformationModelMove if model == "study"
                   else PatientRootQueryRetrieveInformationModelMove)
    start = env.pydest.count()
    responses = c_move(env, _identifier(**attrs), PYDEST, model=query_model)
    final = responses[-1].Status
    assert 0xA000 <= final <= 0xCFFF, f"0x{final:04X}"
    assert all(r.Status not in PENDING for r in responses)
    assert int(responses[-1].get("NumberOfCompletedSuboperations", 0)) == 0
    time.sleep(0.1)
    assert env.pydest.count() == start


def test_retrieve_with_wildcard_study_uid_moves_and_gets_nothing_dcmtk(env: Env) -> None:
    before = set(env.dest.files())
    for uid in ("*", ""):
        res = movescu(env, ["QueryRetrieveLevel=STUDY", f"StudyInstanceUID={uid}"],
                      destination=DEST)
        # a Cxxx failure (dcmtk: "UnableToProcess"), exit non-zero, no pending response
        assert res.returncode != 0, _ok(res)
        assert "Final Move Response (Failed: UnableToProcess)" in res.stdout + res.stderr, (
            _ok(res))
        assert "Pending" not in res.stdout + res.stderr, _ok(res)
        out = env.outdir("get-wild")
        res = getscu(env, ["QueryRetrieveLevel=STUDY", f"StudyInstanceUID={uid}"], out)
        # getscu 3.6.7 exits 0 whatever the final status: read the status it reports
        assert "C-GET Response (Failed: UnableToProcess)" in res.stdout + res.stderr, _ok(res)
        assert "Received C-STORE" not in res.stdout + res.stderr, _ok(res)
        assert list(out.iterdir()) == []
    assert set(env.dest.files()) == before
    # (a fresh-clone CI run once found one move record of two within 10 s: 30 s, and the
    # records and the server's log in the message if it happens again)
    found = wait_events(env.vault, "dicom.move", lambda e: not is_(e["outcome"], Outcome.SUCCESS)
                        and e["destination"] == DEST, count=2, timeout=30)
    assert len(found) >= 2, (events(env.vault, "dicom.move"), env.server.log()[-4000:])
    assert all(e["sent"] == 0 for e in found)
    gets = wait_events(env.vault, "dicom.get", lambda e: not is_(e["outcome"], Outcome.SUCCESS)
                       and e["ae"] == WS, count=2, timeout=30)
    assert len(gets) >= 2, (events(env.vault, "dicom.get"), env.server.log()[-4000:])
    assert all(e["sent"] == 0 for e in gets)
