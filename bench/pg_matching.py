"""Encrypted matching on PostgreSQL at 100,000 studies against a plaintext baseline
(issue 16, part 1): what the sealed index's blind tokens and residual checks cost.

    python -m bench.pg_matching --url postgresql+psycopg://USER@HOST:PORT/DB \
        [--studies 100000] [--runs 30]

The database named by ``--url`` must be empty and is used twice: the pacsvault tables,
sealed (``index.sealing``, tokens of ``index.blind``), filled with ``--studies`` studies
over ten years (2015-2024) of ``studies / 3`` patients with names drawn from a skewed
list; and ``baseline_studies``, the same values in clear with B-tree indexes (dates;
names with ``text_pattern_ops`` for prefix LIKE), queried with plain SQL. Rows are
written directly (not through ``Archive.store``: the matching is measured, not ingest).

Queries, each a QIDO-RS first page (limit 101, ``QueryEngine.page``) against the same
page in SQL: a one-year StudyDate range, one day, a name prefix (``SMI*``), and both.
Prints p50/p95 in milliseconds. A decision benchmark, run by hand, a few minutes; not a
test. Only 127.0.0.1 or a Unix socket.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import statistics
import time
import uuid
from collections.abc import Callable
from typing import Any

from pydicom.dataset import Dataset
from sqlalchemy import ColumnElement, Engine, column, create_engine, insert, select, table
from sqlalchemy.orm import sessionmaker

from pacsvault.crypto.keys import MasterKey
from pacsvault.index import blind, sealing
from pacsvault.index.models import Base, DataKey, Patient, Study
from pacsvault.index.query import QueryEngine

FAMILY = ["SMITH", "JOHNSON", "WILLIAMS", "BROWN", "JONES", "GARCIA", "MILLER", "DAVIS",
          "MARTIN", "DUBOIS", "MÜLLER", "SCHMIDT", "ROSSI", "NGUYEN", "YAMADA", "SMIRNOV",
          "SMITHERS", "LEE", "WALKER", "HALL", "ALLEN", "YOUNG", "KING", "WRIGHT", "SCOTT",
          "GREEN", "BAKER", "ADAMS", "NELSON", "HILL", "MOORE", "CLARK", "LEWIS", "ROBERTS"]
GIVEN = ["JOHN", "MARY", "ANNA", "PAUL", "MARIE", "LUCA", "SOPHIE", "TARO", "EMMA", "NOAH"]
PAGE = 101
_PLAIN = table("baseline_studies", column("pk"), column("name_norm"),
               column("study_date"), column("meta_json"))


def _meta(name: str, pid: str, date: str, uid: str, acc: str) -> str:
    """A stored header of a typical size (~1 KB)."""
    return json.dumps({
        "00080020": {"vr": "DA", "Value": [date]}, "00080030": {"vr": "TM", "Value": ["101500"]},
        "00080050": {"vr": "SH", "Value": [acc]}, "00080060": {"vr": "CS", "Value": ["CT"]},
        "00081030": {"vr": "LO", "Value": ["CT THORAX ABDOMEN WITH CONTRAST"]},
        "00100010": {"vr": "PN", "Value": [{"Alphabetic": name}]},
        "00100020": {"vr": "LO", "Value": [pid]}, "0020000D": {"vr": "UI", "Value": [uid]},
        "00081090": {"vr": "LO", "Value": ["SCANNER MODEL 64 SLICE"]},
        "00180050": {"vr": "DS", "Value": [1.25]}, "00200010": {"vr": "SH", "Value": ["1"]},
        "00080090": {"vr": "PN", "Value": [{"Alphabetic": "HOUSE^GREGORY"}]},
        "00321060": {"vr": "LO", "Value": ["REQUESTED PROCEDURE DESCRIPTION " * 8]},
    })


def _load(engine: Engine, sealer: sealing.Sealer, studies: int) -> None:
    rng = random.Random(16)
    patients = max(1, studies // 3)
    Base.metadata.create_all(engine)
    names: list[str] = []
    for _ in range(patients):
        family = FAMILY[min(int(rng.paretovariate(1.2)) - 1, len(FAMILY) - 1)
                        if rng.random() < 0.5 else rng.randrange(len(FAMILY))]
        names.append(f"{family}^{rng.choice(GIVEN)}")
    start = time.monotonic()
    keys = [str(uuid.uuid4()) for _ in range(patients)]
    with engine.begin() as conn:
        conn.execute(insert(DataKey), [{"key_id": k, "wrapped": os.urandom(40)}
                                                 for k in keys])
        conn.execute(insert(Patient), [
            {"pk": i + 1, "patient_id": f"PID{i:07d}", "issuer": "", "name": names[i],
             "name_norm": names[i], "birth_date": f"19{40 + i % 60:02d}0{1 + i % 9}15",
             "sex": "F" if i % 2 else "M", "key_id": keys[i], "meta_json": "{}"}
            for i in range(patients)])
        study_rows: list[dict[str, Any]] = []
        for s in range(studies):
            p = rng.randrange(patients)
            year, doy = 2015 + s * 10 // studies, rng.randrange(365)
            month, mday = 1 + doy // 31 % 12, 1 + doy % 28
            day = year * 10000 + month * 100 + mday
            uid = f"1.2.826.0.1.3680043.8.498.{s + 1}"
            acc = f"A{s:08d}"
            study_rows.append({
                "pk": s + 1, "patient_pk": p + 1, "study_uid": uid, "study_date": str(day),
                "study_time": "101500.000000", "accession_number": acc, "study_id": "1",
                "description": "CT THORAX", "referring_physician": "HOUSE^GREGORY",
                "referring_physician_norm": "HOUSE^GREGORY", "modalities": "CT",
                "num_series": 1, "num_instances": 1,
                "meta_json": _meta(names[p], f"PID{p:07d}", str(day), uid, acc)})
        conn.execute(insert(Study), study_rows)
    print(f"rows written in {time.monotonic() - start:.0f} s")
    start = time.monotonic()
    raw: Any = engine.raw_connection()
    try:
        with raw.cursor() as cur:
            with cur.copy("COPY patient_tokens (token, row_pk) FROM STDIN") as copy:
                for i, name in enumerate(names):
                    values = {"PatientName": name,
                              "PatientBirthDate": f"19{40 + i % 60:02d}0{1 + i % 9}15"}
                    for token in blind.row_tokens(sealer, values):
                        copy.write_row((token, i + 1))
            with cur.copy("COPY study_tokens (token, row_pk) FROM STDIN") as copy:
                for row in study_rows:
                    values = {"StudyDate": row["study_date"],
                              "ReferringPhysicianName": row["referring_physician_norm"]}
                    for token in blind.row_tokens(sealer, values):
                        copy.write_row((token, row["pk"]))
            cur.execute("""CREATE TABLE baseline_studies AS
                SELECT s.pk AS pk, %s::text AS name_norm, ''::text AS study_date,
                       ''::text AS meta_json FROM studies s WHERE false""", ("",))
            with cur.copy("COPY baseline_studies (pk, name_norm, study_date, meta_json) "
                          "FROM STDIN") as copy:
                for row in study_rows:
                    copy.write_row((row["pk"], names[row["patient_pk"] - 1],
                                    row["study_date"], row["meta_json"]))
            cur.execute("CREATE INDEX ON baseline_studies (study_date)")
            cur.execute("CREATE INDEX ON baseline_studies (name_norm text_pattern_ops)")
            cur.execute("ANALYZE")
        raw.commit()
    finally:
        raw.close()
    print(f"tokens and baseline written in {time.monotonic() - start:.0f} s")


def _ms(run: Callable[[], int], runs: int) -> tuple[float, float, int]:
    run()  # warm
    times: list[float] = []
    found = 0
    for _ in range(runs):
        start = time.perf_counter()
        found = run()
        times.append((time.perf_counter() - start) * 1000)
    times.sort()
    return statistics.median(times), times[max(0, int(len(times) * 0.95) - 1)], found


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", required=True)
    parser.add_argument("--studies", type=int, default=100_000)
    parser.add_argument("--runs", type=int, default=30)
    parser.add_argument("--reuse", action="store_true",
                        help="the database was filled by an earlier run: query only")
    args = parser.parse_args(argv)
    engine = create_engine(args.url)
    # synthetic data only: a fixed key lets --reuse read what an earlier run wrote
    sealer = sealing.sealer_for(MasterKey(hashlib.sha256(b"bench.pg_matching").digest()),
                                "bench-pg-matching")
    sealing.attach(engine, sealer)
    if not args.reuse:
        _load(engine, sealer, args.studies)
    qe = QueryEngine(sessionmaker(engine, expire_on_commit=False), "BENCH",
                     time_budget=30)

    def sealed(keys: dict[str, str]) -> Callable[[], int]:
        def run() -> int:
            ident = Dataset()
            for keyword in ("StudyInstanceUID", "PatientName", "PatientID", "StudyDate",
                            "AccessionNumber", "ModalitiesInStudy"):
                setattr(ident, keyword, "")
            for keyword, value in keys.items():
                setattr(ident, keyword, value)
            return len(qe.page("STUDY", ident, limit=PAGE).answers)
        return run

    def plain(*where: ColumnElement[bool]) -> Callable[[], int]:
        def run() -> int:
            with engine.connect() as conn:
                rows = conn.execute(select(_PLAIN.c.pk, _PLAIN.c.meta_json).where(*where)
                                    .order_by(_PLAIN.c.pk).limit(PAGE)).all()
            return len([json.loads(r[1]) for r in rows])
        return run

    name, date = _PLAIN.c.name_norm, _PLAIN.c.study_date

    cases = [
        ("StudyDate one year", {"StudyDate": "20230101-20231231"},
         plain(date.between("20230101", "20231231"))),
        ("StudyDate one day", {"StudyDate": "20230314"}, plain(date == "20230314")),
        ("PatientName SMI*", {"PatientName": "SMI*"}, plain(name.like("SMI%"))),
        ("PatientName MÜLLER^ANNA", {"PatientName": "MÜLLER^ANNA"},
         plain(name == "MÜLLER^ANNA")),
        ("SMI* + one year", {"PatientName": "SMI*", "StudyDate": "20230101-20231231"},
         plain(name.like("SMI%"), date.between("20230101", "20231231"))),
    ]
    print(f"{args.studies} studies, first page of {PAGE}, {args.runs} runs each (ms)")
    print(f"{'query':28} {'sealed p50':>10} {'p95':>8} {'n':>4}   "
          f"{'plain p50':>9} {'p95':>8} {'n':>4}")
    for label, keys, baseline in cases:
        s50, s95, sn = _ms(sealed(keys), args.runs)
        p50, p95, pn = _ms(baseline, args.runs)
        print(f"{label:28} {s50:10.1f} {s95:8.1f} {sn:4d}   {p50:9.1f} {p95:8.1f} {pn:4d}")


if __name__ == "__main__":
    main()
