"""Issue 18, parts 2-5: the breach register, its scope from the trail, the 72-hour clock
and the documents, on a scripted incident against the real server.

One server for the module: four patients are stored in-process; a physician's API token,
"stolen", is used from another loopback address (127.0.0.2, standing for an outside
address) to query and read three of them over QIDO-RS and WADO-RS, while the same
physician's other token reads the fourth from 127.0.0.1. ``breach open --from-token``
must find exactly the three, with their instance counts; the documents must carry every
art. 33(3) item and no patient's name; the list of patients must open only with the
recipient's age identity; the clock must alert at 48 h (fake clock), once, and never
after a decision; every version is kept and in the trail; physicians get no page.
"""

from __future__ import annotations

import csv
import datetime as dt
import io
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pyrage
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid
from pypdf import PdfReader
from sqlalchemy import select

from pacsvault.audit.alerts.rules import Detector
from pacsvault.audit.events import AuditEvent, EventCode, Outcome
from pacsvault.breach import clock as breach_clock
from pacsvault.breach.model import Breach
from pacsvault.breach.store import BreachRegister
from pacsvault.config.alerts import AlertSettings
from pacsvault.index.deployment_state import BreachVersionRow
from tests.helpers import Server, VaultDir, events, make_vault, start_server
from tests.web_helpers import client, csrf_of, sign_in

pytestmark = pytest.mark.slow  # a real server

OUTSIDE = "127.0.0.2"
# (Patient ID, name, instances): three read through the stolen token, one legitimately
PATIENTS = [("PVB-001", "QUETZAL^BARTHOLOMEW", 2), ("PVB-002", "ZYLBERSTEIN^OPHELIE", 1),
            ("PVB-003", "KOWALCZYK^ANSELME", 3), ("PVB-004", "MARTINEAU^LEGITIME", 2)]
STOLEN = PATIENTS[:3]
PASSWORDS = {"dpo": "registre-des-violations-du-cabinet", "phys": "radio-du-matin-sur-la-plage"}
CONTACT = "Dr Delorme, DPO, dpo@cabinet.example, 01 23 45 67 89"


def _instance(patient_id: str, name: str, study: str) -> bytes:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID, ds.SOPInstanceUID = SecondaryCaptureImageStorage, generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study, generate_uid()
    ds.PatientID, ds.PatientName, ds.PatientBirthDate = patient_id, name, "19700101"
    ds.Modality, ds.StudyDate, ds.StudyTime = "OT", "20240312", "101500"
    ds.Rows = ds.Columns = 8
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.PixelData = bytes(range(64))
    out = io.BytesIO()
    ds.save_as(out, enforce_file_format=True)
    return out.getvalue()


@dataclass
class Env:
    vault: VaultDir
    server: Server
    studies: dict[str, str]  # patient id -> study uid
    stolen_id: str  # the stolen token's id
    breach_id: str
    root: Path

    @property
    def ca(self) -> Path:
        return self.vault.data / "tls" / "ca.crt"

    def browser(self, local_address: str = "127.0.0.1") -> httpx.Client:
        return client(self.server.https_port, self.ca, local_address=local_address)


def _read(http: httpx.Client, token: str, patient: str, study: str) -> None:
    auth = {"authorization": f"Bearer {token}"}
    found = http.get(f"/dicom-web/studies?PatientID={patient}",
                     headers={**auth, "accept": "application/dicom+json"})
    assert found.status_code == 200 and len(found.json()) == 1, found.text
    got = http.get(f"/dicom-web/studies/{study}", headers={
        **auth, "accept": 'multipart/related; type="application/dicom"; transfer-syntax=*'})
    assert got.status_code == 200, got.text[:300]


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    root = tmp_path_factory.mktemp("breach")
    vault = make_vault(root / "v")
    v = vault.open()
    studies: dict[str, str] = {}
    try:
        v.accounts.add_user("dpo", ["auditor"], PASSWORDS["dpo"], by="test")
        v.accounts.add_user("phys", ["physician"], PASSWORDS["phys"], by="test")
        stolen = v.accounts.create_token("phys", "1d", label="laptop")
        own = v.accounts.create_token("phys", "1d", label="desk")
        for patient, name, count in PATIENTS:
            studies[patient] = generate_uid()
            for _ in range(count):
                v.archive.store(_instance(patient, name, studies[patient]),
                                source_ae="MODALITY", actor_address="127.0.0.1")
    finally:
        v.close()
    server = start_server(vault)
    try:
        since = dt.datetime.now(dt.UTC) - dt.timedelta(minutes=1)
        with client(server.https_port, vault.data / "tls" / "ca.crt",
                    local_address=OUTSIDE) as thief:
            for patient, _name, _count in STOLEN:
                _read(thief, stolen.token, patient, studies[patient])
        with client(server.https_port, vault.data / "tls" / "ca.crt",
                    local_address="127.0.0.1") as desk:
            _read(desk, own.token, PATIENTS[3][0], studies[PATIENTS[3][0]])
        until = dt.datetime.now(dt.UTC) + dt.timedelta(minutes=1)
        opened = vault.cli("breach", "open", "--from-token", stolen.token_id,
                           "--since", since.isoformat(), "--until", until.isoformat(),
                           "--title", "Stolen laptop with an API token",
                           "--circumstances", "lost-stolen-device")
        breach_id = opened.stdout.strip().splitlines()[-1]
        assert breach_id.startswith("BR-"), opened.stdout + opened.stderr
        for patient, name, _ in PATIENTS:  # the CLI never prints who
            assert patient not in opened.stdout + opened.stderr
            assert name.split("^")[0] not in opened.stdout + opened.stderr
        yield Env(vault, server, studies, stolen.token_id, breach_id, root)
    finally:
        server.stop()


def _breach(env: Env, version: int | None = None) -> Breach:
    v = env.vault.open()
    try:
        return BreachRegister(v).get(env.breach_id, version)
    finally:
        v.close()


def test_open_from_token_counts_exactly_the_three_patients(env: Env) -> None:
    record = _breach(env)
    scope = record.scope
    assert scope is not None and scope.actor_kind == "token"
    got = {p.patient_id: (p.studies, p.instances, p.readable) for p in scope.patients}
    assert got == {pid: (1, n, True) for pid, _name, n in STOLEN}
    assert (scope.studies, scope.instances) == (3, 6)
    assert scope.addresses == [OUTSIDE] and scope.users == ["phys"]
    assert scope.queries == 3 and scope.ciphertext_records == 0
    assert scope.actions["dicomweb.retrieve"] == 3
    assert (record.people_count, record.people_exact) == (3, True)
    assert (record.records_count, record.records_exact) == (6, True)
    assert record.nature == ["confidentiality"]
    # the same person's other token, from the practice, is not part of the breach
    by_user = env.vault.cli("breach", "open", "--from-user", "phys", "--since",
                            "2020-01-01", "--title", "all of phys")
    other = by_user.stdout.strip().splitlines()[-1]
    v = env.vault.open()
    try:
        every = BreachRegister(v).get(other).scope
        assert every is not None and len(every.patients) == 4
    finally:
        v.close()


def test_documents_carry_every_art_33_3_item_and_no_patient_name(env: Env) -> None:
    env.vault.cli(
        "breach", "update", env.breach_id, "--contact", CONTACT,
        "--controller", "Cabinet de radiologie du Parc",
        "--consequences", "Disclosure of imaging results to an unknown person",
        "--measures-after", "Token revoked at 09:12; password changed",
        "--measures-before", "Tokens expire after one day", "--severity", "significant",
        "--origin", "external-malicious", "--people-categories", "patients",
        "--data-categories", "identity,health,images", "--no-ongoing")
    out = env.root / "docs"
    out.mkdir()
    texts = {}
    for lang in ("en", "fr"):
        path = out / f"draft-{lang}.pdf"
        env.vault.cli("breach", "export", env.breach_id, "--kind", "notification",
                      "--lang", lang, "--out", path)
        assert path.stat().st_mode & 0o077 == 0
        texts[lang] = " ".join(" ".join(page.extract_text().split())
                               for page in PdfReader(path).pages)
    en = texts["en"]
    for item in ("Nature of the breach (art. 33(3)(a))", "loss of confidentiality",
                 "Categories of personal data (art. 33(3)(a))", "health data",
                 "Approximate number of people concerned (art. 33(3)(a))", "3 (exact)",
                 "Approximate number of records concerned (art. 33(3)(a))", "6 (exact)",
                 "Data protection officer or other contact point (art. 33(3)(b))",
                 "dpo@cabinet.example", "Likely consequences (art. 33(3)(c))",
                 "Disclosure of imaging results", "Measures taken or proposed (art. 33(3)(d))",
                 "Token revoked at 09:12", "Time of awareness", "72-hour clock"):
        assert item in en, item
    assert "Nature de la violation" in texts["fr"] and "perte de confidentialité" in texts["fr"]
    for lang in ("en", "fr"):
        for patient, name, _ in PATIENTS:
            assert patient not in texts[lang]
            for part in name.split("^"):
                assert part not in texts[lang].upper(), (lang, part)
    md = out / "letter.md"
    env.vault.cli("breach", "export", env.breach_id, "--kind", "letter", "--format", "md",
                  "--lang", "fr", "--out", md)
    assert "CNIL" in md.read_text() and "QUETZAL" not in md.read_text()
    register = out / "register.pdf"
    env.vault.cli("breach", "export", "--kind", "register", "--lang", "en", "--out", register)
    assert env.breach_id in " ".join(p.extract_text() for p in PdfReader(register).pages)


def test_patient_list_opens_only_with_the_recipients_key(env: Env) -> None:
    identity = pyrage.x25519.Identity.generate()
    out = env.root / "patients"
    out.mkdir()
    path = out / "patients.csv.age"
    env.vault.cli("breach", "export", env.breach_id, "--kind", "patients",
                  "--recipient", str(identity.to_public()), "--out", path)
    assert sorted(p.name for p in out.iterdir()) == ["patients.csv.age"]  # no clear copy
    blob = path.read_bytes()
    assert b"QUETZAL" not in blob and b"PVB-001" not in blob
    rows = list(csv.DictReader(io.StringIO(pyrage.decrypt(blob, [identity]).decode())))
    assert {(r["patient_id"], r["instances"]) for r in rows} == {
        (pid, str(n)) for pid, _name, n in STOLEN}
    assert {r["name"] for r in rows} == {name for _pid, name, _n in STOLEN}
    with pytest.raises(pyrage.DecryptError):
        pyrage.decrypt(blob, [pyrage.x25519.Identity.generate()])
    # a passphrase from a 0600 file (never argv)
    secret = env.root / "pass.txt"
    secret.write_text("une-phrase-de-passe-longue\n")
    secret.chmod(0o600)
    env.vault.cli("breach", "export", env.breach_id, "--kind", "patients",
                  "--list-passphrase-file", secret, "--out", out / "p2.age")
    assert b"PVB-002" in pyrage.passphrase.decrypt((out / "p2.age").read_bytes(),
                                                   "une-phrase-de-passe-longue")
    # each export of the list is an access to those patients' data, in the trail
    exports = events(env.vault, "breach.patients.export")
    named = exports[0]["patient_ids"] if exports else []
    assert len(exports) == 2 and isinstance(named, list)
    assert sorted(named) == [pid for pid, _name, _n in STOLEN]
    # and the register itself (rows of the index) holds nothing in clear
    v = env.vault.open()
    try:
        with v.engine.connect() as conn:
            blobs = list(conn.execute(select(BreachVersionRow.blob)).scalars())
    finally:
        v.close()
    assert blobs
    for blob in blobs:
        assert b"PVB-00" not in blob and b"Stolen laptop" not in blob


def test_clock_alerts_at_48h_once_and_not_after_a_decision(env: Env) -> None:
    v = env.vault.open()
    try:
        aware = dt.datetime(2026, 1, 5, 8, 0, tzinfo=dt.UTC)
        register = BreachRegister(v, clock=lambda: aware)
        undecided = register.open(Breach(id="", aware_at=aware.isoformat(), title="clock"),
                                  by="test")
        decided = register.open(Breach(id="", aware_at=aware.isoformat(), title="decided"),
                                by="test")
        register.update(decided.id, lambda r: setattr(r, "decision", "notify"), by="test")
        mine = {undecided.id, decided.id}

        def hours(h: float) -> dt.datetime:
            return aware + dt.timedelta(hours=h)

        def ticks(h: float) -> list[tuple[str, int]]:
            return [t for t in breach_clock.tick(v, now=hours(h)) if t[0] in mine]

        assert ticks(47.9) == []
        assert ticks(48.1) == [(undecided.id, 48)]
        assert ticks(50) == []  # once
        assert ticks(66.5) == [(undecided.id, 66)]
        steps = [s.what for s in register.get(undecided.id).steps]
        assert "clock-48h" in steps and "clock-66h" in steps
        register.update(undecided.id, lambda r: setattr(r, "decision", "notify"), by="test")
        assert register.get(undecided.id).decided_at
    finally:
        v.close()
    alerts = [e for e in events(env.vault, "breach.clock") if e["breach"] in mine]
    assert [(e["breach"], e["hours"]) for e in alerts] == [(undecided.id, 48),
                                                          (undecided.id, 66)]
    # the alert rules turn it into a notification
    detector = Detector(AlertSettings())
    found = detector.observe(AuditEvent(
        action="breach.clock", outcome=Outcome.SERIOUS_FAILURE, code=EventCode.SECURITY_ALERT,
        detail={"breach": undecided.id, "hours": 48, "hours_left": 24}))
    assert [a.rule for a in found] == ["breach-clock"]


def test_versions_kept_and_in_the_trail(env: Env) -> None:
    current = _breach(env)
    assert current.version >= 3  # opened, updated, exported...
    first = _breach(env, 1)
    assert first.contact == "" and current.contact == CONTACT
    trail = [e for e in events(env.vault) if str(e.get("breach", "")) == env.breach_id
             and e["action"] != "breach.patients.export"]  # that one names them, sealed
    actions = [e["action"] for e in trail]
    assert actions[0] == "breach.opened" and "breach.updated" in actions
    assert "breach.exported" in actions
    assert sorted(int(str(e["version"])) for e in trail) == list(range(1, current.version + 1))
    for e in trail:
        text = json.dumps(e)
        assert "PVB-" not in text and "QUETZAL" not in text
        assert not e["patient_ids"] and not e["study_uids"]
    # the stolen token's records name it (its id only)
    retrieved = [e for e in events(env.vault, "dicomweb.retrieve") if e["address"] == OUTSIDE]
    assert len(retrieved) == 3 and all(e["token"] == env.stolen_id for e in retrieved)


def test_pages_for_the_dpo_not_for_physicians(env: Env) -> None:
    with env.browser() as dpo, env.browser() as phys:
        sign_in(dpo, "dpo", PASSWORDS["dpo"])
        sign_in(phys, "phys", PASSWORDS["phys"])
        listing = dpo.get("/breaches")
        assert listing.status_code == 200 and env.breach_id in listing.text
        show = dpo.get(f"/breaches/show?id={env.breach_id}")
        assert show.status_code == 200 and 'id="clock"' in show.text
        assert "PVB-001" not in show.text and "QUETZAL" not in show.text
        before = _breach(env).version
        form = {"csrf": csrf_of(show.text), "id": env.breach_id, "decision": "notify",
                "title": "Stolen laptop with an API token", "notified": "initial",
                "reference": "CNIL-2026-0042", "nature": "confidentiality",
                "data_categories": ["identity", "health", "images"],
                "people_categories": "patients", "health_data": "on"}
        assert dpo.post("/breaches/update", data={**form, "csrf": "wrong"}).status_code == 403
        saved = dpo.post("/breaches/update", data=form)
        assert saved.status_code == 303, saved.text[:500]
        after = _breach(env)
        assert after.version == before + 1 and after.decision == "notify"
        assert after.notifications[0].reference == "CNIL-2026-0042"
        pdf = dpo.get(f"/breaches/document?id={env.breach_id}&kind=notification"
                      "&format=pdf&lang=fr")
        assert pdf.status_code == 200 and pdf.content.startswith(b"%PDF")
        french = dpo.get("/breaches", headers={"accept-language": "fr"})
        assert "Registre des violations" in french.text
        refused = dpo.post("/breaches", headers={"accept-language": "fr"}, data={
            "csrf": csrf_of(listing.text), "title": "x", "aware_at": "hier"})
        assert refused.status_code == 400 and "date ou heure ISO invalide" in refused.text
        opened = dpo.post("/breaches", data={"csrf": csrf_of(listing.text), "title": "web",
                                             "actor_kind": "address", "actor": OUTSIDE,
                                             "since": "2020-01-01"})
        assert opened.status_code == 303
        new = dpo.get(opened.headers["location"])
        assert new.status_code == 200 and "scope" in new.text
        csrf = csrf_of(phys.get("/account").text)
        for path in ("/breaches", f"/breaches/show?id={env.breach_id}",
                     f"/breaches/document?id={env.breach_id}"):
            assert phys.get(path).status_code == 403, path
        for path in ("/breaches", "/breaches/update", "/breaches/patients"):
            assert phys.post(path, data={"csrf": csrf, "id": env.breach_id}).status_code \
                == 403, path


def test_rescope_counts_again_for_the_complementary_notification(env: Env) -> None:
    before = _breach(env)
    assert before.scope is not None
    env.vault.cli("breach", "update", env.breach_id, "--rescope", "--until", before.scope.since)
    empty = _breach(env)
    assert empty.scope is not None and empty.scope.patients == [] and empty.people_count == 0
    env.vault.cli("breach", "update", env.breach_id, "--rescope")
    again = _breach(env)
    assert again.scope is not None and len(again.scope.patients) == 3
    assert again.version == before.version + 2
