"""Retention: until when each patient's images must be kept, and who is past it.

Why a rule per *study*: the French rule (Code de la santé publique R1112-7) counts from
the last exam, and a per-modality period (``per_modality = { MG = 30 }``) applies to the
exams made with that modality. So each study ends at its date + the longest period among
its modalities' rules (default ``years``), the patient's retention ends at the latest of
their studies' ends, and, when the birth date is known, never before their
``minor_until_age``-th birthday (28: a minor's images are kept until they are 28). A
study without a usable date counts from the day it was received (never earlier than the
truth: an unknown date keeps longer, not shorter).

Nothing here erases: ``expiring`` lists, and the daily ``tick`` (a ``serve`` job) records
only how many patients are due (``retention.due``, no patient data): the list itself is
shown to an authenticated administrator (admin page, ``pacsvault patient
list-expiring``), and erasure needs their confirmation (``storage.erasure``).
"""

from __future__ import annotations

import datetime as dt
import json
import logging
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from sqlalchemy import Engine, func, select

from pacsvault.config import RetentionSettings
from pacsvault.index.models import Instance, Patient, Series, Study

if TYPE_CHECKING:
    from pacsvault.vault import Vault

log = logging.getLogger("pacsvault.retention")

META_KEY = "retention"  # vault.json: {"listed": "YYYY-MM-DD"} of the last daily listing


def parse_da(value: str) -> dt.date | None:
    """A DICOM DA value (YYYYMMDD), or None when empty or not a date."""
    value = (value or "").strip()
    if len(value) != 8 or not value.isdigit():
        return None
    try:
        return dt.date(int(value[:4]), int(value[4:6]), int(value[6:]))
    except ValueError:
        return None


def add_years(day: dt.date, years: int) -> dt.date:
    """``day`` + ``years`` calendar years; 29 February becomes 1 March (later, not
    earlier: a retention end is never brought forward)."""
    try:
        return day.replace(year=day.year + years)
    except ValueError:
        return dt.date(day.year + years, 3, 1)


@dataclass(frozen=True)
class Exam:
    """One study as retention sees it."""

    day: dt.date
    modalities: tuple[str, ...] = ()


def study_end(exam: Exam, rules: RetentionSettings) -> tuple[dt.date, str]:
    """When this exam's retention ends, and which rule decided ("years" or "MG")."""
    years, rule = rules.years, "years"
    for modality in exam.modalities:
        extra = rules.per_modality.get(modality.upper())
        if extra is not None and extra > years:
            years, rule = extra, modality.upper()
    return add_years(exam.day, years), rule


def retention_end(exams: Iterable[Exam], birth_date: dt.date | None,
                  rules: RetentionSettings) -> tuple[dt.date, str]:
    """The end of a patient's retention (the latest of their exams' ends, and of their
    ``minor_until_age``-th birthday when the birth date is known) and the deciding rule:
    "years", a modality, or "minor". A patient without exams is kept by the minor rule
    alone, or ends today (nothing of theirs is left to keep)."""
    end: dt.date | None = None
    rule = "years"
    for exam in exams:
        day, why = study_end(exam, rules)
        if end is None or day > end:
            end, rule = day, why
    if birth_date is not None and rules.minor_until_age:
        adult = add_years(birth_date, rules.minor_until_age)
        if end is None or adult > end:
            end, rule = adult, "minor"
    return (end or dt.date.min), rule


@dataclass(frozen=True)
class PatientRetention:
    """One patient's retention, for an administrator's screen only (never logs)."""

    pk: int
    patient_id: str
    issuer: str
    name: str
    birth_date: str
    last_exam: dt.date | None
    modalities: tuple[str, ...]
    studies: int
    instances: int
    ends: dt.date
    rule: str

    def expired(self, today: dt.date) -> bool:
        return self.ends <= today


def _day(value: dt.datetime | None) -> dt.date:
    if value is None:
        return dt.datetime.now(dt.UTC).date()
    return value.date()


def patients(engine: Engine, rules: RetentionSettings,
             only: Iterable[int] | None = None) -> list[PatientRetention]:
    """Every patient (or those whose primary key is in ``only``) with their retention end,
    from the index alone (no object is decrypted)."""
    wanted = None if only is None else set(only)
    with engine.connect() as conn:
        people = {int(r[0]): r for r in conn.execute(
            select(Patient.pk, Patient.patient_id, Patient.issuer, Patient.name,
                   Patient.birth_date))
            if wanted is None or int(r[0]) in wanted}
        studies: dict[int, list[tuple[int, str, dt.datetime | None]]] = {}
        for pk, patient_pk, study_date, created in conn.execute(
                select(Study.pk, Study.patient_pk, Study.study_date, Study.created)):
            if int(patient_pk) in people:
                studies.setdefault(int(patient_pk), []).append((int(pk), study_date, created))
        modalities: dict[int, set[str]] = {}
        for study_pk, modality in conn.execute(
                select(Series.study_pk, Series.modality).distinct()):
            if modality:
                modalities.setdefault(int(study_pk), set()).add(str(modality))
        counts: dict[int, int] = {int(pk): int(n) for pk, n in conn.execute(
            select(Study.patient_pk, func.count(Instance.pk))
            .join(Series, Series.study_pk == Study.pk)
            .join(Instance, Instance.series_pk == Series.pk)
            .group_by(Study.patient_pk))}
    found: list[PatientRetention] = []
    for pk, row in people.items():
        exams = [Exam(parse_da(date) or _day(created), tuple(sorted(modalities.get(spk, ()))))
                 for spk, date, created in studies.get(pk, [])]
        ends, rule = retention_end(exams, parse_da(row[4]), rules)
        found.append(PatientRetention(
            pk=pk, patient_id=str(row[1]), issuer=str(row[2] or ""), name=str(row[3] or ""),
            birth_date=str(row[4] or ""),
            last_exam=max((e.day for e in exams), default=None),
            modalities=tuple(sorted({m for e in exams for m in e.modalities})),
            studies=len(exams), instances=counts.get(pk, 0), ends=ends, rule=rule))
    return found


def expiring(engine: Engine, rules: RetentionSettings, *, within_days: int = 0,
             today: dt.date | None = None) -> list[PatientRetention]:
    """Patients whose retention has ended, or ends within ``within_days``: soonest first."""
    today = today or dt.datetime.now(dt.UTC).date()
    horizon = today + dt.timedelta(days=max(0, within_days))
    due = [p for p in patients(engine, rules) if p.ends <= horizon]
    return sorted(due, key=lambda p: (p.ends, p.pk))


def tick(vault: Vault) -> None:
    """The ``retention`` job: once a day, count the patients past their retention and
    record it (``retention.due``: counts only, the list stays in the admin's views)."""
    from pacsvault.audit import AuditEvent, EventCode, Outcome

    today = dt.datetime.now(dt.UTC).date()
    try:
        meta = json.loads(vault.layout.meta.read_text("utf-8"))
    except (OSError, ValueError):
        meta = {}
    state = meta.get(META_KEY) if isinstance(meta, dict) else None
    if isinstance(state, dict) and state.get("listed") == today.isoformat():
        return
    rules = vault.settings.retention
    due = expiring(vault.engine, rules, within_days=30, today=today)
    expired = sum(1 for p in due if p.expired(today))
    vault.recorder.emit(AuditEvent(
        action="retention.due", outcome=Outcome.SUCCESS, code=EventCode.APPLICATION_ACTIVITY,
        message=(f"Daily retention check: {expired} patient(s) past their retention period, "
                 f"{len(due) - expired} more within 30 days; an administrator decides on "
                 "erasure (Administration > Erasure)."),
        detail={"expired": expired, "within_30_days": len(due) - expired},
    ))

    def mark(data: dict[str, object]) -> None:
        data[META_KEY] = {"listed": today.isoformat()}

    vault.update_meta(mark)
    log.info("retention check: %d patient(s) due", expired)
