"""Fill a sealed PostgreSQL index to 10,000 / 100,000 studies fast, with the rows a real
store writes, and time encrypted matching against a plaintext baseline in the same run.

Why not store 100,000 files: at the scale-out ingest rate that is an hour of the run for
rows that C-FIND and QIDO-RS read without ever opening an object. Why not plain SQL: the
point is the sealed index. So each new study copies the column values of a study really
stored by this run (a one-instance 64x64 MR of the dataset: patient, study, series and
instance rows, their ``meta_json`` included) and changes what differs (UIDs, patient,
date, accession, keys), through the vault's own engine: ``Sealed``/``Fixed`` columns are
encrypted by their column types, and the blind tokens come from ``index.blind.row_tokens``
(what ``blind.write`` inserts at store). Object ids are random with no object behind them
(queries never read one); the data keys are random bytes no key unwraps.

The new studies are the dataset's own filler studies (same UIDs, patients, dates as the
files), then deterministic extra ones past the dataset, so the expected match counts come
from ``Corpus.expected_matches`` as for every other query row.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import random
import statistics
import time
import uuid
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, column, func, insert, select, table, text
from sqlalchemy.orm import sessionmaker

from bench.compare import dataset
from pacsvault.index import blind, sealing
from pacsvault.index.matching import normalise_name
from pacsvault.index.models import (
    DataKey,
    Instance,
    Patient,
    Series,
    Study,
    patient_tokens,
    series_tokens,
    study_tokens,
)

BATCH = 2000
PAGE = 101
SEED = 1616
_BASELINE = table("bench_plain_studies", column("pk"), column("name_norm"),
                  column("study_date"), column("meta_json"))


MODALITIES = ("CT", "MR", "CR", "US", "DX")


def modality_of(item: dataset.Item) -> str:
    """The modality of an item's study: the dataset's own kinds, and for the
    deterministic studies past the dataset one of five in turn (so that a
    ModalitiesInStudy filter has something to narrow at 100,000 studies)."""
    if item.path.startswith("SYN/"):
        return MODALITIES[int(item.path[4:]) % len(MODALITIES)]
    return {"CT": "CT", "CR": "CR"}.get(item.kind, "MR")


def with_patients(corpus: dataset.Corpus, total_studies: int) -> dataset.Corpus:
    """``corpus`` with enough synthetic patients for ``total_studies`` (0.3 per study,
    as in the dataset): the dataset's own names first (unchanged, so its files and
    expected counts still hold), then more from the same 200 prefixes."""
    want = max(len(corpus.patient_names),
               round(total_studies * dataset.PATIENTS_PER_STUDY))
    more = dataset._names(want, random.Random(SEED))[len(corpus.patient_names):]
    return replace(corpus, patient_names=corpus.patient_names + more)


def extra_items(corpus: dataset.Corpus, total_studies: int) -> list[dataset.Item]:
    """The studies to add so that the index holds ``total_studies``: the dataset's filler
    studies first, then deterministic ones past it (patients from the dataset's names,
    dates over 2020-2024)."""
    have = len(corpus.studies(corpus.main))
    want = max(0, total_studies - have)
    out = list(corpus.filler[:want])
    rng = random.Random(SEED)
    base = have + len(corpus.filler)
    for s in range(base, base + want - len(out)):
        p = rng.randrange(len(corpus.patient_names))
        date = (dataset.DATE0 + dt.timedelta(days=rng.randrange(dataset.DAYS))).strftime(
            "%Y%m%d")
        out.append(dataset.Item(f"SYN/{s}", "FILL", dataset.uid(1, s + 1),
                                dataset.uid(2, s + 1, 1), dataset.uid(3, s + 1, 1, 1), 0, p,
                                date))
    return out


def _row(conn: Any, tbl: Any, where: Any) -> dict[str, Any]:
    found = conn.execute(select(*tbl.columns).where(where)).mappings().first()
    if found is None:
        raise RuntimeError(f"no template row in {tbl.name}")
    return dict(found)


def _meta(raw: str, values: dict[str, Any]) -> str:
    """The template's DICOM JSON with the given tags rewritten (only those it holds)."""
    meta = json.loads(raw)
    for tag, value in values.items():
        if tag in meta:
            meta[tag] = {**meta[tag], "Value": [value]}
    return json.dumps(meta, separators=(",", ":"))


def load(engine: Engine, corpus: dataset.Corpus, items: list[dataset.Item],
         say: Callable[[str], None]) -> float:
    """Insert ``items`` (one study, series and instance each) into the sealed index of
    ``engine``; seconds taken."""
    sealer = sealing.sealer_of(engine.dialect)
    if sealer is None:
        raise RuntimeError("not a sealed index")
    t0 = time.perf_counter()
    pt, st, se, it = (Patient.__table__, Study.__table__, Series.__table__,
                      Instance.__table__)
    mr = corpus.of_kind("MR")[0]
    rng = random.Random(SEED + len(items))
    with engine.begin() as conn:
        t_study = _row(conn, st, st.c.study_uid == mr.study)
        t_pat = _row(conn, pt, pt.c.pk == t_study["patient_pk"])
        t_ser = _row(conn, se, se.c.study_pk == t_study["pk"])
        t_ins = _row(conn, it, it.c.series_pk == t_ser["pk"])
        patients = {pid: pk for pk, pid in conn.execute(select(Patient.pk, Patient.patient_id))}
        keys = dict(conn.execute(select(Patient.patient_id, Patient.key_id)).all())
        nxt = {name: int(conn.execute(select(func.coalesce(func.max(m.pk), 0))).scalar_one())
               for name, m in (("p", Patient), ("s", Study), ("se", Series), ("i", Instance))}
    now = dt.datetime.now(dt.UTC)
    for start in range(0, len(items), BATCH):
        chunk = items[start:start + BATCH]
        new_keys: list[dict[str, Any]] = []
        rows: dict[str, list[dict[str, Any]]] = {"p": [], "s": [], "se": [], "i": []}
        toks: dict[str, list[dict[str, Any]]] = {"p": [], "s": [], "se": []}
        for item in chunk:
            pid = f"PVB{item.patient:07d}"
            name = corpus.patient_names[item.patient]
            if pid not in patients:
                nxt["p"] += 1
                patients[pid] = nxt["p"]
                key_id = keys[pid] = str(uuid.UUID(bytes=os.urandom(16), version=4))
                new_keys.append({"key_id": key_id, "wrapped": os.urandom(40), "created": now})
                sex = "MF"[item.patient % 2]
                rows["p"].append({**t_pat, "pk": nxt["p"], "patient_id": pid, "name": name,
                                  "name_norm": normalise_name(name), "sex": sex,
                                  "key_id": key_id, "created": now, "meta_json": _meta(
                                      t_pat["meta_json"], {"00100010": {"Alphabetic": name},
                                                           "00100020": pid, "00100040": sex})})
                toks["p"] += [{"token": t, "row_pk": nxt["p"]} for t in sorted(
                    blind.row_tokens(sealer, {"PatientName": normalise_name(name),
                                              "PatientBirthDate": t_pat["birth_date"]}))]
            nxt["s"] += 1
            nxt["se"] += 1
            nxt["i"] += 1
            modality = modality_of(item)
            ident = {"00100010": {"Alphabetic": name}, "00100020": pid,
                     "0020000D": item.study, "00080020": item.date, "00080021": item.date,
                     "00080050": f"A{item.patient:07d}", "00080060": modality}
            rows["s"].append({**t_study, "pk": nxt["s"], "patient_pk": patients[pid],
                              "study_uid": item.study, "study_date": item.date,
                              "accession_number": f"A{item.patient:07d}", "created": now,
                              "modalities": modality,
                              "meta_json": _meta(t_study["meta_json"], ident)})
            toks["s"] += [{"token": t, "row_pk": nxt["s"]} for t in sorted(blind.row_tokens(
                sealer, {"StudyDate": item.date,
                         "ReferringPhysicianName": t_study["referring_physician_norm"]}))]
            rows["se"].append({**t_ser, "pk": nxt["se"], "study_pk": nxt["s"],
                               "series_uid": item.series, "series_date": item.date,
                               "modality": modality,
                               "meta_json": _meta(t_ser["meta_json"],
                                                  {**ident, "0020000E": item.series})})
            toks["se"] += [{"token": t, "row_pk": nxt["se"]} for t in sorted(blind.row_tokens(
                sealer, {"SeriesDate": item.date,
                         "PerformedProcedureStepStartDate": t_ser["performed_start_date"]}))]
            rows["i"].append({**t_ins, "pk": nxt["i"], "series_pk": nxt["se"],
                              "sop_uid": item.sop, "content_date": item.date,
                              "object_id": f"{rng.getrandbits(128):032x}",
                              "key_id": keys[pid], "sha256": rng.randbytes(32),
                              "received": now, "meta_json": _meta(
                                  t_ins["meta_json"], {**ident, "0020000E": item.series,
                                                       "00080018": item.sop})})
        with engine.begin() as conn:
            if new_keys:
                conn.execute(insert(DataKey), new_keys)
            for name, model in (("p", Patient), ("s", Study), ("se", Series), ("i", Instance)):
                if rows[name]:
                    conn.execute(insert(model), rows[name])
            for name, tok in (("p", patient_tokens), ("s", study_tokens),
                              ("se", series_tokens)):
                if toks[name]:
                    conn.execute(insert(tok), toks[name])
        done = start + len(chunk)
        if done == len(items) or done % (BATCH * 10) == 0:
            say(f"sealed rows: {done}/{len(items)} studies, {time.perf_counter() - t0:.0f} s")
    with engine.begin() as conn:
        for model in (Patient, Study, Series, Instance):  # past the keys written here
            conn.execute(select(func.setval(
                func.pg_get_serial_sequence(model.__tablename__, "pk"),
                select(func.max(model.pk)).scalar_subquery())))
        conn.execute(text("ANALYZE"))
    return time.perf_counter() - t0


def write_baseline(engine: Engine) -> None:
    """``bench_plain_studies``: every study's name, date and header in clear, B-tree
    indexed as a plaintext index would be (names with ``text_pattern_ops`` for a prefix
    LIKE), in the same database: the same data without the encryption."""
    with engine.begin() as conn:
        conn.execute(text("DROP TABLE IF EXISTS bench_plain_studies"))
        conn.execute(text("CREATE TABLE bench_plain_studies (pk integer PRIMARY KEY, "
                          "name_norm text, study_date text, meta_json text)"))
        found = conn.execute(select(Study.pk, Patient.name_norm, Study.study_date,
                                    Study.meta_json).join(Patient)).all()
        for i in range(0, len(found), BATCH):
            conn.execute(insert(_BASELINE), [
                {"pk": r[0], "name_norm": r[1], "study_date": r[2], "meta_json": r[3]}
                for r in found[i:i + BATCH]])
        conn.execute(text("CREATE INDEX ON bench_plain_studies (study_date)"))
        conn.execute(text("CREATE INDEX ON bench_plain_studies "
                          "(name_norm text_pattern_ops)"))
        conn.execute(text("ANALYZE bench_plain_studies"))


def matching_cost(engine: Engine, filters: dict[str, dict[str, str]], reps: int
                  ) -> dict[str, dict[str, list[float] | int]]:
    """First QIDO page (``QueryEngine.page``, limit 101) on the sealed index against the
    same page in plain SQL on ``bench_plain_studies``, in process, alternating; ms."""
    from pydicom.dataset import Dataset

    from pacsvault.index.query import QueryEngine

    qe = QueryEngine(sessionmaker(engine, expire_on_commit=False), "BENCH", time_budget=60)
    out: dict[str, dict[str, list[float] | int]] = {}
    for label, filt in filters.items():
        def sealed(filt: dict[str, str] = filt) -> int:
            ident = Dataset()
            for keyword in ("StudyInstanceUID", "PatientName", "PatientID", "StudyDate",
                            "AccessionNumber", "ModalitiesInStudy"):
                setattr(ident, keyword, "")
            for keyword, value in filt.items():
                setattr(ident, keyword, value)
            return len(qe.page("STUDY", ident, limit=PAGE).answers)

        def plain(filt: dict[str, str] = filt) -> int:
            where = []
            if "PatientName" in filt:
                where.append(_BASELINE.c.name_norm.like(
                    normalise_name(filt["PatientName"]).replace("*", "%")))
            if "StudyDate" in filt:
                lo, _, hi = filt["StudyDate"].partition("-")
                where.append(_BASELINE.c.study_date.between(lo, hi or lo))
            with engine.connect() as conn:
                got = conn.execute(select(_BASELINE.c.pk, _BASELINE.c.meta_json)
                                   .where(*where).order_by(_BASELINE.c.pk).limit(PAGE)).all()
            return len([json.loads(r[1]) for r in got])

        times: dict[str, list[float]] = {"sealed": [], "plain": []}
        counts = {"sealed": sealed(), "plain": plain()}  # warm
        for _ in range(reps):
            for kind, fn in (("sealed", sealed), ("plain", plain)):
                t0 = time.perf_counter()
                counts[kind] = fn()
                times[kind].append((time.perf_counter() - t0) * 1000)
        out[label] = {"sealed_ms": times["sealed"], "plain_ms": times["plain"],
                      "sealed_n": counts["sealed"], "plain_n": counts["plain"]}
    return out


def median(values: list[float]) -> float:
    return float(statistics.median(values))


def engine_of(data: Path, key: Path) -> tuple[Any, Engine]:
    """The vault (to close) and its sealed engine."""
    from pacsvault.vault import Vault

    vault = Vault.open(data, key)
    return vault, vault.engine
