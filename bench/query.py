"""C-FIND latency benchmark: STUDY-level searches in a large encrypted index, through the
real DICOM listener, against a small-vault baseline measured in the same run.

Why: "C-FIND must answer from the encrypted index without decrypting image files", and a
practice with 10,000 studies / 500,000 instances must still get its worklist search back in
well under a second. Pushing 500,000 files would take hours, so the index rows are generated
directly (SQLAlchemy Core bulk inserts into the SQLCipher index, exactly the tables and
normalised columns ingest fills); there are no object files, which C-FIND never reads. The
queries then go through ``pacsvault serve`` like any workstation's would.

Peer: dcmtk's ``dcmqrscp`` would need its own index built from 500,000 real files, so the
same-run reference is the same query, same client, same listener, on a vault of
``--baseline-studies`` (100) studies, served at the same time and queried alternately with
the large one, so a load spike hits both. The ratio says how much the index size costs.

Usage: ``python bench/query.py [--studies N] [--instances-per-study M] [--small]
[--reps R] [--tls] [--findscu] [--workdir DIR [--reuse]] [--keep] [--json OUT]``
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import functools
import json
import math
import random
import shutil
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom import AE
from pynetdicom.association import Association
from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind  # type: ignore
from sqlalchemy import insert, text

# `python bench/query.py`: the repository root holds the bench package and tests/harness
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.ingest import DCMTK_ENV, dcmtk, free_port, pacsvault_cmd, run, server

SERVER_AE, SCU_AE, SCU_TLS_AE = "PACSVAULT", "BENCHWS", "BENCHWSTLS"
SEED = 20240612
UID_ROOT = "1.2.826.0.1.3680043.8.498.4242."  # pydicom's root + a bench arc
DATE0 = dt.date(2020, 1, 1)
DAYS = (dt.date(2025, 1, 1) - DATE0).days  # five years of studies
BATCH_ROWS = 10_000

# Surnames: 20 heads x 10 third letters = 200 equally frequent three-letter prefixes, handed
# out round-robin over the patients, so "DUP*" names exactly 1/200 = 0.5 % of them.
HEADS = ["Du", "Le", "Ma", "Be", "Ro", "Fa", "Gi", "Mo", "Ch", "Bo",
         "La", "Pe", "Ri", "Va", "De", "Ca", "Th", "Ga", "No", "Se"]
THIRD = "prnlcmsvtb"
TAILS = ["ont", "uis", "ard", "ier", "eau", "ot", "in", "el", "as", "and", "et", "ou",
         "ez", "ille", "ain", "aud", "èvre", "ais", "oux", "ens"]
GIVEN = ["Jean", "Marie", "Pierre", "Françoise", "Michel", "Nathalie", "Philippe",
         "Isabelle", "Alain", "Sylvie", "Nicolas", "Sophie", "Christophe", "Céline", "Hélène",
         "Stéphane", "Élodie", "Laurent", "Camille", "Thierry", "Chloé", "Julien", "Léa",
         "Mathieu", "Aurélie", "Benoît", "Gaëlle", "Jérôme", "Noémie", "Raphaël"]
MODALITIES = {  # modality -> (SOP class, weight, study descriptions)
    "CT": ("1.2.840.10008.5.1.4.1.1.2", 30, ["TDM THORAX", "TDM ABDOMEN", "TDM CRANE"]),
    "MR": ("1.2.840.10008.5.1.4.1.1.4", 25, ["IRM GENOU", "IRM RACHIS", "IRM CEREBRALE"]),
    "CR": ("1.2.840.10008.5.1.4.1.1.1", 20, ["RADIO THORAX", "RADIO BASSIN"]),
    "US": ("1.2.840.10008.5.1.4.1.1.6.1", 15, ["ECHO ABDOMEN", "ECHO THYROIDE"]),
    "DX": ("1.2.840.10008.5.1.4.1.1.1.1", 10, ["RADIO MAIN", "RADIO CHEVILLE"]),
}
BODY = {"CT": "CHEST", "MR": "KNEE", "CR": "CHEST", "US": "ABDOMEN", "DX": "HAND"}
REFERRING = ["MARTIN^Paul", "BERNARD^Anne", "PETIT^Luc", "ROUX^Claire", "", ""]

NAME_PREFIX = "DUP*"
WEEK = ("20230306", "20230312")


# --- index content ------------------------------------------------------------------------


def surname(patient: int, order: list[int], rng: random.Random) -> str:
    prefix = order[patient % len(order)]
    head, third = HEADS[prefix // len(THIRD)], THIRD[prefix % len(THIRD)]
    return (head + third + rng.choice(TAILS)).upper()


def meta_template(kind: str) -> dict[str, Any]:
    """What ingest stores as ``meta_json`` at patient, study and series level.

    ``full``: the whole non-bulk header of a real CT (pydicom's CT_small.dcm, private tags
    included, ~11 kB), passed through pacsvault's own parser: what a real index holds.
    ``small``: only the attributes the bench rewrites (~1 kB).
    """
    if kind == "small":
        return {}
    from pydicom.data import get_testdata_file

    from pacsvault.dicomfile.parse import parse

    raw = Path(get_testdata_file("CT_small.dcm")).read_bytes()  # type: ignore[arg-type]
    meta: dict[str, Any] = json.loads(parse(raw).meta_json)
    return meta


def _v(vr: str, value: object) -> dict[str, Any]:
    if value in ("", None):
        return {"vr": vr}
    if vr == "PN":
        return {"vr": vr, "Value": [{"Alphabetic": value}]}
    return {"vr": vr, "Value": [value]}


@dataclass
class StudyPlan:
    """The light facts of one study, drawn up front so patients can be written first."""

    patient: int
    date: str
    time: str
    modality: str
    description: str
    referring: str
    series_sizes: list[int]


@dataclass
class PatientPlan:
    name: str
    patient_id: str
    birth_date: str
    sex: str
    key_id: str = field(default_factory=lambda: str(uuid.uuid4()))


def plan(studies: int, per_study: int, seed: int) -> tuple[list[PatientPlan], list[StudyPlan]]:
    rng = random.Random(seed)
    n_patients = max(1, round(studies * 0.3))
    order = list(range(len(HEADS) * len(THIRD)))
    rng.shuffle(order)
    patients = []
    for p in range(n_patients):
        birth = DATE0 - dt.timedelta(days=rng.randrange(365 * 5, 365 * 90))
        patients.append(PatientPlan(
            name=f"{surname(p, order, rng)}^{rng.choice(GIVEN)}",
            patient_id=f"PVB{p:07d}",
            birth_date=birth.strftime("%Y%m%d"),
            sex=rng.choice("MF"),
            key_id=str(uuid.UUID(int=rng.getrandbits(128), version=4)),
        ))
    mods = list(MODALITIES)
    weights = [MODALITIES[m][1] for m in mods]
    out = []
    for s in range(studies):
        # every patient gets a study first, then the rest at random
        patient = s if s < n_patients else rng.randrange(n_patients)
        modality = rng.choices(mods, weights)[0]
        n_series = rng.randint(2, 5)
        sizes = [per_study // n_series] * n_series
        sizes[0] += per_study - sum(sizes)
        day = DATE0 + dt.timedelta(days=rng.randrange(DAYS))
        secs = rng.randrange(7 * 3600, 20 * 3600)
        out.append(StudyPlan(
            patient=patient,
            date=day.strftime("%Y%m%d"),
            time=f"{secs // 3600:02d}{secs // 60 % 60:02d}{secs % 60:02d}",
            modality=modality,
            description=rng.choice(MODALITIES[modality][2]),
            referring=rng.choice(REFERRING),
            series_sizes=[n for n in sizes if n > 0] or [0],
        ))
    return patients, out


def study_uid(s: int) -> str:
    return f"{UID_ROOT}1.{s + 1}"


def series_uid(s: int, j: int) -> str:
    return f"{UID_ROOT}2.{s + 1}.{j + 1}"


def sop_uid(s: int, j: int, n: int) -> str:
    return f"{UID_ROOT}3.{s + 1}.{j + 1}.{n + 1}"


def meta_for(template: dict[str, Any], p: PatientPlan, s: int, st: StudyPlan,
             j: int = 0) -> str:
    meta = dict(template)
    meta.update({
        "00080005": _v("CS", "ISO_IR 192"),
        "00080016": _v("UI", MODALITIES[st.modality][0]),
        "00080018": _v("UI", sop_uid(s, j, 0)),
        "00080020": _v("DA", st.date),
        "00080021": _v("DA", st.date),
        "00080030": _v("TM", st.time),
        "00080031": _v("TM", st.time),
        "00080050": _v("SH", f"A{s + 1:08d}"),
        "00080060": _v("CS", st.modality),
        "00080090": _v("PN", st.referring),
        "00081030": _v("LO", st.description),
        "0008103E": _v("LO", f"{st.description} S{j + 1}"),
        "00100010": _v("PN", p.name),
        "00100020": _v("LO", p.patient_id),
        "00100030": _v("DA", p.birth_date),
        "00100040": _v("CS", p.sex),
        "00180015": _v("CS", BODY[st.modality]),
        "0020000D": _v("UI", study_uid(s)),
        "0020000E": _v("UI", series_uid(s, j)),
        "00200010": _v("SH", str(s + 1)),
        "00200011": {"vr": "IS", "Value": [j + 1]},
        "00200013": {"vr": "IS", "Value": [1]},
    })
    return json.dumps(meta, separators=(",", ":"))


def populate(data: Path, key: Path, studies: int, per_study: int, meta_kind: str,
             seed: int = SEED, progress: bool = True) -> dict[str, int]:
    """Bulk-insert a consistent index: data keys, patients, studies, series, instances."""
    from pacsvault.index.matching import normalise_name, normalise_time
    from pacsvault.index.models import DataKey, Instance, Patient, Series, Study
    from pacsvault.vault import Vault

    patients, plans = plan(studies, per_study, seed)
    template = meta_template(meta_kind)
    rng = random.Random(seed + 1)
    now = dt.datetime.now(dt.UTC)
    first_study: dict[int, int] = {}
    for s, st in enumerate(plans):
        first_study.setdefault(st.patient, s)
    counts = {"patients": len(patients), "studies": len(plans), "series": 0, "instances": 0}
    t0 = time.perf_counter()

    def say(what: str) -> None:
        if progress:
            print(f"  [{time.perf_counter() - t0:6.1f} s] {what}", file=sys.stderr, flush=True)

    vault = Vault.open(data, key)
    try:
        with vault.sessions.begin() as session:
            # Wrapped keys are random bytes: no object exists, nothing will unwrap them.
            session.execute(insert(DataKey), [
                {"key_id": p.key_id, "wrapped": rng.randbytes(40), "created": now}
                for p in patients
            ])
            session.execute(insert(Patient), [
                {"pk": i + 1, "patient_id": p.patient_id, "issuer": "", "name": p.name,
                 "name_norm": normalise_name(p.name), "birth_date": p.birth_date,
                 "sex": p.sex, "key_id": p.key_id, "created": now,
                 "meta_json": meta_for(template, p, first_study.get(i, 0),
                                       plans[first_study.get(i, 0)])}
                for i, p in enumerate(patients)
            ])
        say(f"{len(patients)} patients")
        series_pk = instance_pk = 0
        s = 0
        while s < len(plans):
            study_rows: list[dict[str, Any]] = []
            series_rows: list[dict[str, Any]] = []
            instance_rows: list[dict[str, Any]] = []
            while s < len(plans) and len(instance_rows) < BATCH_ROWS:
                st, p = plans[s], patients[plans[s].patient]
                sop_class = MODALITIES[st.modality][0]
                study_rows.append({
                    "pk": s + 1, "patient_pk": st.patient + 1, "study_uid": study_uid(s),
                    "study_date": st.date, "study_time": normalise_time(st.time),
                    "accession_number": f"A{s + 1:08d}", "study_id": str(s + 1),
                    "description": st.description, "referring_physician": st.referring,
                    "referring_physician_norm": normalise_name(st.referring),
                    "modalities": st.modality, "num_series": len(st.series_sizes),
                    "num_instances": sum(st.series_sizes), "created": now,
                    "meta_json": meta_for(template, p, s, st),
                })
                for j, size in enumerate(st.series_sizes):
                    series_pk += 1
                    series_rows.append({
                        "pk": series_pk, "study_pk": s + 1, "series_uid": series_uid(s, j),
                        "modality": st.modality, "series_number": j + 1,
                        "description": f"{st.description} S{j + 1}",
                        "body_part": BODY[st.modality], "series_date": st.date,
                        "series_time": normalise_time(st.time), "performed_start_date": "",
                        "performed_start_time": "", "num_instances": size,
                        "meta_json": meta_for(template, p, s, st, j),
                    })
                    for n in range(size):
                        instance_pk += 1
                        instance_rows.append({
                            "pk": instance_pk, "series_pk": series_pk,
                            "sop_uid": sop_uid(s, j, n), "sop_class_uid": sop_class,
                            "instance_number": n + 1, "transfer_syntax": ExplicitVRLittleEndian,
                            "rows": 512, "columns": 512, "number_of_frames": None,
                            "content_date": st.date, "content_time": normalise_time(st.time),
                            "object_id": f"{rng.getrandbits(128):032x}", "key_id": p.key_id,
                            "size": 525_000 + rng.randrange(2000),
                            "sha256": rng.randbytes(32), "received": now,
                            "source_ae": "BENCHMOD", "meta_json": "{}",
                        })
                s += 1
            with vault.sessions.begin() as session:
                session.execute(insert(Study), study_rows)
                session.execute(insert(Series), series_rows)
                if instance_rows:
                    session.execute(insert(Instance), instance_rows)
            counts["series"] += len(series_rows)
            counts["instances"] += len(instance_rows)
            if s == len(plans) or s % (20 * max(1, BATCH_ROWS // max(1, per_study))) == 0:
                say(f"{s} studies, {counts['instances']} instances")
        with vault.engine.begin() as conn:
            conn.execute(text("PRAGMA wal_checkpoint(TRUNCATE)"))
    finally:
        vault.close()
    return counts


# --- queries --------------------------------------------------------------------------------

RETURN_KEYS = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate",
               "StudyTime", "AccessionNumber", "StudyID", "StudyDescription",
               "ReferringPhysicianName", "ModalitiesInStudy", "NumberOfStudyRelatedSeries",
               "NumberOfStudyRelatedInstances", "StudyInstanceUID")
CASES: dict[str, dict[str, str]] = {
    "name prefix": {"PatientName": NAME_PREFIX},
    "date range (1 week)": {"StudyDate": f"{WEEK[0]}-{WEEK[1]}"},
    "name prefix + date range": {"PatientName": NAME_PREFIX,
                                 "StudyDate": f"{WEEK[0]}-{WEEK[1]}"},
}


def identifier(filters: dict[str, str]) -> Dataset:
    ds = Dataset()
    ds.QueryRetrieveLevel = "STUDY"
    ds.SpecificCharacterSet = "ISO_IR 192"
    for keyword in RETURN_KEYS:
        setattr(ds, keyword, filters.get(keyword, ""))
    return ds


@dataclass
class Result:
    case: str
    vault: str
    studies: int
    instances: int
    client: str
    transport: str
    matches: int
    p50_ms: float
    p95_ms: float
    ratio: float = 1.0


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)]


def interleaved(fns: Sequence[Callable[[], int]], reps: int,
                warmup: int = 3) -> list[tuple[list[float], int]]:
    """Time several queries rep by rep, alternating, so a load spike hits them all alike."""
    matches = [0] * len(fns)
    for _ in range(warmup):
        matches = [fn() for fn in fns]
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(reps):
        for i, fn in enumerate(fns):
            t = time.perf_counter()
            got = fn()
            times[i].append((time.perf_counter() - t) * 1000)
            if got != matches[i]:
                sys.exit(f"error: the same query answered {matches[i]} then {got} matches")
    return list(zip(times, matches, strict=True))


def find_once(assoc: Association, ds: Dataset) -> int:
    matches = 0
    for status, _answer in assoc.send_c_find(ds, StudyRootQueryRetrieveInformationModelFind):
        if status is None or "Status" not in status:
            sys.exit("error: C-FIND got no status (association lost?)")
        if status.Status in (0xFF00, 0xFF01):
            matches += 1
        elif status.Status != 0x0000:
            sys.exit(f"error: C-FIND failed with status 0x{status.Status:04X}")
    return matches


@dataclass
class Target:
    label: str
    root: Path
    data: Path
    key: Path
    studies: int
    instances: int


def client_tls(root: Path, data: Path) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.load_verify_locations(cafile=str(data / "tls" / "ca.crt"))
    certs = root / "client"
    ctx.load_cert_chain(certs / f"{SCU_TLS_AE}.crt", certs / f"{SCU_TLS_AE}.key")
    return ctx


def findscu_once(port: int, filters: dict[str, str], out: Path) -> int:
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    keys: list[str] = ["-k", "QueryRetrieveLevel=STUDY", "-k", "SpecificCharacterSet=ISO_IR 192"]
    for keyword in RETURN_KEYS:
        value = filters.get(keyword, "")
        keys += ["-k", f"{keyword}={value}" if value else keyword]
    proc = subprocess.run(
        [dcmtk("findscu"), "-S", "-aet", SCU_AE, "-aec", SERVER_AE, *keys, "-X", "-od",
         str(out), "127.0.0.1", str(port)],
        capture_output=True, text=True, env=DCMTK_ENV, timeout=60, check=False,
    )
    if proc.returncode != 0:
        sys.exit(f"error: findscu rc {proc.returncode}:\n{proc.stdout}{proc.stderr}")
    return sum(1 for _ in out.glob("rsp*.dcm"))


def explain(target: Target) -> dict[str, list[str]]:
    """EXPLAIN QUERY PLAN of the SQL the engine builds for each case (in-process)."""
    from pacsvault.index.levels import Level
    from pacsvault.index.query import QueryEngine
    from pacsvault.vault import Vault

    vault = Vault.open(target.data, target.key)
    try:
        engine = QueryEngine(vault.sessions, SERVER_AE)
        plans = {}
        with vault.engine.connect() as conn:
            for case, filters in CASES.items():
                # private helpers: the bench wants the very statement C-FIND runs
                try:
                    filt = engine._filter(Level.STUDY, identifier(filters))
                    stmt = engine._select(Level.STUDY).where(*filt.sql)
                except AttributeError as exc:  # the engine was refactored
                    plans[case] = [f"unavailable ({exc})"]
                    continue
                compiled = stmt.compile(vault.engine, compile_kwargs={"literal_binds": True})
                rows = conn.exec_driver_sql(f"EXPLAIN QUERY PLAN {compiled}").fetchall()
                plans[case] = [str(r[-1]) for r in rows]
        return plans
    finally:
        vault.close()


def connect(port: int, calling: str, tls: ssl.SSLContext | None) -> Association:
    ae = AE(ae_title=calling)
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelFind)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 120
    assoc = ae.associate("127.0.0.1", port, ae_title=SERVER_AE,
                         tls_args=(tls, "127.0.0.1") if tls else None)
    if not assoc.is_established:
        sys.exit(f"error: association to port {port} refused (see serve.log)")
    # A well-behaved client (dcm4che's default, findscu with TCP_NODELAY=1): without this,
    # pynetdicom's own Nagle delay (~40 ms per request) hides the server's latency.
    sock = assoc.dul.socket.socket if assoc.dul.socket else None
    if sock is not None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return assoc


def measure(targets: list[Target], args: argparse.Namespace) -> list[Result]:
    """Serve every vault at once and time each query on all of them, interleaved."""
    results: list[Result] = []

    def record(client: str, transport: str, case: str,
               timings: list[tuple[list[float], int]]) -> None:
        for target, (times, n) in zip(targets, timings, strict=True):
            r = Result(case, target.label, target.studies, target.instances, client,
                       transport, n, statistics.median(times), pct(times, 0.95))
            results.append(r)
            print(f"  {target.label} {client}/{transport} {case}: {n} matches, "
                  f"p50 {r.p50_ms:.1f} ms, p95 {r.p95_ms:.1f} ms", file=sys.stderr)

    with contextlib.ExitStack() as stack:
        ports: list[tuple[int, int]] = []
        for target in targets:
            plain_port, tls_port = free_port(), free_port()
            cmd = [*pacsvault_cmd(), "serve", "--data", str(target.data), "--key-file",
                   str(target.key), "--bind", "127.0.0.1", "--dicom-port", str(plain_port),
                   "--dicom-tls-port", str(tls_port), "--https-port", "0",
                   "--workers", "1"]  # one process (the default is one per core)
            stack.enter_context(server(cmd, plain_port, target.root / "serve.log",
                                       ready=target.data / "serve.json"))
            ports.append((plain_port, tls_port))

        for transport in ["plain", "tls"] if args.tls else ["plain"]:
            assocs = [
                connect(tls_port, SCU_TLS_AE, client_tls(t.root, t.data))
                if transport == "tls" else connect(plain_port, SCU_AE, None)
                for t, (plain_port, tls_port) in zip(targets, ports, strict=True)
            ]
            try:
                for case, filters in CASES.items():
                    fns = [functools.partial(find_once, a, identifier(filters)) for a in assocs]
                    record("pynetdicom", transport, case, interleaved(fns, args.reps))
            finally:
                for a in assocs:
                    a.release()

        if args.findscu:
            for case, filters in CASES.items():
                fns = [functools.partial(findscu_once, plain_port, filters, t.root / "findscu")
                       for t, (plain_port, _) in zip(targets, ports, strict=True)]
                record("findscu (process+assoc)", "plain", case, interleaved(fns, args.reps))

        # The same searches in-process, no DICOM: what the listener adds on top.
        from pacsvault.index.query import QueryEngine
        from pacsvault.vault import Vault

        vaults = [stack.enter_context(contextlib.closing(Vault.open(t.data, t.key)))
                  for t in targets]
        engines = [QueryEngine(v.sessions, SERVER_AE) for v in vaults]

        def count(engine: QueryEngine, filters: dict[str, str]) -> int:
            return sum(1 for _ in engine.find("STUDY", identifier(filters)))

        for case, filters in CASES.items():
            fns = [functools.partial(count, e, filters) for e in engines]
            record("in-process engine", "-", case, interleaved(fns, args.reps))
    return results


def schema_fingerprint() -> str:
    """Changes with the index schema: a vault made by older code is not reused."""
    import hashlib

    from pacsvault.index.models import Base

    cols = sorted(f"{t.name}.{c.name}:{c.type}" for t in Base.metadata.tables.values()
                  for c in t.columns)
    return hashlib.sha256("\n".join(cols).encode()).hexdigest()[:16]


def build(label: str, root: Path, studies: int, per_study: int, meta: str,
          reuse: bool) -> Target:
    """A vault with two query nodes (plain, and mutual TLS with a certificate) and its
    generated index; with ``reuse``, an identical one left by an earlier run is kept."""
    pv, data, key = pacsvault_cmd(), root / "vault", root / "vault.key"
    params = {"studies": studies, "per_study": per_study, "meta": meta, "seed": SEED,
              "schema": schema_fingerprint()}
    marker = root / "params.json"
    if reuse and marker.is_file():
        saved = json.loads(marker.read_text())
        if saved.get("params") == params:
            print(f"{label}: reusing {root}", file=sys.stderr)
            return Target(label, root, data, key, saved["studies"], saved["instances"])
    shutil.rmtree(root, ignore_errors=True)  # only the bench's own layout
    root.mkdir(parents=True)
    run([*pv, "init", "--data", str(data), "--key-file", str(key), "--ae-title", SERVER_AE])
    for ae, flags in ((SCU_AE, []), (SCU_TLS_AE, ["--tls", "--client-cert"])):
        run([*pv, "node", "add", ae, "--host", "127.0.0.1", "--roles", "query", "--data",
             str(data), *flags])
    run([*pv, "node", "cert", SCU_TLS_AE, "--out", str(root / "client"), "--data", str(data)])
    t0 = time.perf_counter()
    print(f"{label}: generating {studies} studies x {per_study} instances ({meta} meta)",
          file=sys.stderr)
    counts = populate(data, key, studies, per_study, meta)
    size = sum(p.stat().st_size for p in data.glob("index.db*")) / 1e6
    print(f"{label}: {counts} in {time.perf_counter() - t0:.1f} s, index {size:.0f} MB",
          file=sys.stderr)
    marker.write_text(json.dumps({"params": params, **counts}))
    return Target(label, root, data, key, counts["studies"], counts["instances"])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--studies", type=int, default=10_000, help="studies (default 10000)")
    ap.add_argument("--instances-per-study", type=int, default=50,
                    help="instances per study, in 2-5 series (default 50)")
    ap.add_argument("--baseline-studies", type=int, default=100,
                    help="studies in the baseline vault (default 100)")
    ap.add_argument("--small", action="store_true",
                    help="quick run: 1000 studies x 10 instances, 10 repetitions")
    ap.add_argument("--meta", choices=("full", "small"), default="full",
                    help="meta_json of patient/study/series rows: a real CT header (~11 kB, "
                    "what ingest stores; default) or only the rewritten keys")
    ap.add_argument("--reps", type=int, default=30, help="timed repetitions per query")
    ap.add_argument("--tls", action="store_true",
                    help="also query over DICOM TLS (mutual, node registered --client-cert)")
    ap.add_argument("--findscu", action="store_true",
                    help="also time dcmtk findscu (one process + association per query)")
    ap.add_argument("--no-explain", action="store_true", help="skip EXPLAIN QUERY PLAN")
    ap.add_argument("--workdir", type=Path, help="work directory (default: a temp dir)")
    ap.add_argument("--keep", action="store_true", help="keep the work directory")
    ap.add_argument("--reuse", action="store_true",
                    help="with --workdir: keep vaults generated by an earlier run with the "
                    "same sizes instead of generating them again")
    ap.add_argument("--json", type=Path, help="also write results as JSON here")
    args = ap.parse_args(argv)
    if args.small:
        args.studies, args.instances_per_study = 1000, 10
        args.reps = min(args.reps, 10)
    if args.reuse and args.workdir is None:
        ap.error("--reuse needs --workdir")
    if args.findscu:
        dcmtk("findscu")
    pacsvault_cmd()

    work = args.workdir or Path(tempfile.mkdtemp(prefix="pacsvault-qbench-"))
    work.mkdir(parents=True, exist_ok=True)
    results: list[Result] = []
    plans: dict[str, list[str]] = {}
    ok = False
    try:
        targets = [
            build("baseline", work / "runs" / "baseline", args.baseline_studies,
                  args.instances_per_study, args.meta, args.reuse),
            build("large", work / "runs" / "large", args.studies, args.instances_per_study,
                  args.meta, args.reuse),
        ]
        results = measure(targets, args)
        if not args.no_explain:
            plans = explain(targets[1])
        ok = True
    finally:
        if ok and not args.keep and args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)
        elif not ok:
            print(f"work dir kept for inspection: {work}", file=sys.stderr)

    base = {(r.case, r.client, r.transport): r for r in results if r.vault == "baseline"}
    for r in results:
        r.ratio = r.p50_ms / base[(r.case, r.client, r.transport)].p50_ms

    print("| query (STUDY level) | vault | studies | instances | client | transport | matches "
          "| p50 ms | p95 ms | ratio p50 |")
    print("|---|---|---:|---:|---|---|---:|---:|---:|---:|")
    for r in sorted(results, key=lambda r: (list(CASES).index(r.case), r.client,
                                            r.transport, r.vault != "baseline")):
        print(f"| {r.case} | {r.vault} | {r.studies} | {r.instances} | {r.client} "
              f"| {r.transport} | {r.matches} | {r.p50_ms:.1f} | {r.p95_ms:.1f} "
              f"| {r.ratio:.2f} |")
    for case, lines in plans.items():
        print(f"\nplan, {case}: " + " / ".join(lines))
    if args.json:
        args.json.write_text(json.dumps({
            "studies": args.studies, "instances_per_study": args.instances_per_study,
            "baseline_studies": args.baseline_studies, "meta": args.meta, "reps": args.reps,
            "name_prefix": NAME_PREFIX, "week": list(WEEK),
            "results": [asdict(r) for r in results], "plans": plans,
        }, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
