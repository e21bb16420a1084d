"""Issue 14 item 5: retention periods (unit) and the daily listing job (in-process vault)."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path

import pytest

from pacsvault.config import RetentionSettings
from pacsvault.storage.retention import (
    Exam,
    add_years,
    expiring,
    parse_da,
    retention_end,
    tick,
)
from tests.helpers import events, new_vault
from tests.test_erasure import make, store

D = dt.date
RULES = RetentionSettings(per_modality={"MG": 30})


def test_adult_twenty_years_after_the_last_exam() -> None:
    exams = [Exam(D(2001, 5, 2), ("CT",)), Exam(D(2004, 1, 15), ("CR",))]
    assert retention_end(exams, D(1960, 1, 1), RULES) == (D(2024, 1, 15), "years")
    assert retention_end(exams, None, RULES) == (D(2024, 1, 15), "years")


def test_minor_until_the_28th_birthday_when_later() -> None:
    exams = [Exam(D(2010, 3, 1), ("CR",))]
    # born 2005: 20 years after 2010 = 2030 > 28th birthday 2033? no: 2033 is later
    assert retention_end(exams, D(2005, 6, 30), RULES) == (D(2033, 6, 30), "minor")
    # an exam at 17: 20 years later (2039) is after the 28th birthday (2028)
    assert retention_end([Exam(D(2017, 1, 1))], D(2000, 1, 1), RULES) == (
        D(2037, 1, 1), "years")


def test_per_modality_rule_counts_from_that_modality_s_last_exam() -> None:
    exams = [Exam(D(2000, 1, 1), ("MG",)), Exam(D(2005, 1, 1), ("CR",))]
    # MG: 2000 + 30 = 2030 beats CR 2005 + 20 = 2025
    assert retention_end(exams, None, RULES) == (D(2030, 1, 1), "MG")
    # a later CR exam pushes past the MG rule
    assert retention_end([*exams, Exam(D(2015, 1, 1), ("CR",))], None, RULES) == (
        D(2035, 1, 1), "years")
    # a shorter per-modality value never shortens the default
    short = RetentionSettings(per_modality={"US": 5})
    assert retention_end([Exam(D(2000, 1, 1), ("US",))], None, short) == (D(2020, 1, 1),
                                                                          "years")


def test_dates() -> None:
    assert add_years(D(2004, 2, 29), 20) == D(2024, 2, 29)
    assert add_years(D(2004, 2, 29), 1) == D(2005, 3, 1)  # later, never earlier
    assert parse_da("20240131") == D(2024, 1, 31)
    assert parse_da("") is None and parse_da("2024013") is None and parse_da("20241340") is None


def test_settings_reject_bad_values() -> None:
    with pytest.raises(ValueError):
        RetentionSettings(years=0)
    with pytest.raises(ValueError):
        RetentionSettings(per_modality={"mg; drop": 3})


def test_listing_and_daily_job_record_counts_only(tmp_path: Path) -> None:
    vault = new_vault(tmp_path / "v")
    v = vault.open()
    try:
        old = make("PVRET1", study_date="19990101", birth="19500101", name="Ancien^Patient")
        child = make("PVRET2", study_date="19990101", birth="19950101")  # 28 in 2023
        recent = make("PVRET3", study_date="20200101")
        undated = make("PVRET4", study_date="")  # counts from reception: kept
        store(v, old, child, recent, undated)
        due = expiring(v.engine, v.settings.retention, today=D(2026, 1, 1))
        assert [p.patient_id for p in due] == ["PVRET1", "PVRET2"]
        assert due[0].ends == D(2019, 1, 1) and due[1].rule == "minor"
        assert due[0].instances == 1 and due[0].last_exam == D(1999, 1, 1)
        soon = expiring(v.engine, v.settings.retention, within_days=365 * 20,
                        today=D(2026, 1, 1))
        assert "PVRET3" in [p.patient_id for p in soon]
        assert "PVRET4" not in [p.patient_id for p in soon]
        tick(v)
        tick(v)  # once a day
    finally:
        v.close()
    records = events(vault, "retention.due")
    assert len(records) == 1
    assert records[0]["expired"] == 2 and records[0]["patient_ids"] == []
    line = next(json.loads(x) for x in (vault.data / "audit" / "trail.jsonl").read_text()
                .splitlines() if '"retention.due"' in x)
    assert "PVRET" not in json.dumps(line) and "Ancien" not in json.dumps(line)
    assert "refs" not in line
    meta = json.loads((vault.data / "vault.json").read_text())
    assert meta["retention"]["listed"] == dt.datetime.now(dt.UTC).date().isoformat()
