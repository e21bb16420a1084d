"""Issue 20 item 6: an audit page a DPO can use (real application and HTTPS listener
in-process, one vault for the module: two patients, four images).

A physician viewing a study through WADO-RS (series search, metadata, one request per
frame) makes one grouped row with the image count, the raw records behind it; the page
names the patient; filters by patient, user, device, action and period; pagination; CSV
and PDF exports of the filtered view, each recorded (no patient data in the record's
readable part); the patient access report (GDPR art. 15) lists who accessed that patient
and nothing of another patient's; physicians are refused; French action names.
"""

from __future__ import annotations

import csv
import datetime as dt
import html
import io
import json
import re
import zoneinfo
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pypdf
import pytest

from pacsvault.audit.grouping import VIEW, group_records
from pacsvault.audit.trail import Record
from pacsvault.web import audit_page
from pacsvault.web.audit_rows import Directory, patients_named
from tests.browser import chromium, new_page, password_step, second_factor, shot
from tests.harness.backends import Backend
from tests.helpers import new_vault
from tests.test_erasure import Obj, make, store
from tests.test_web_pages import check_page
from tests.web_helpers import Authenticator, FakeClock, LocalWeb, csrf_of, local_web

PASSWORD = "registre-des-acces-du-cabinet"
JSON = {"accept": "application/dicom+json"}
OCTET = {"accept": 'multipart/related; type="application/octet-stream"'}
FRENCH = {"accept-language": "fr-FR,fr;q=0.9"}
ZONE = "Asia/Kolkata"  # UTC+05:30 all year: unmistakable on the page
pytestmark = pytest.mark.slow  # the module's vault, server and sign-ins: ~10 s


@dataclass
class Env:
    web: LocalWeb
    dpo: httpx.Client
    martin: httpx.Client
    blanc: httpx.Client
    alice: list[Obj]  # PVDPO1, Durand^Alice: one study, three images
    louis: Obj  # PVDPO2, Petit^Louis: one image
    dpo_app: Authenticator  # the DPO's second factor (the browser test signs in again)


def _view(browser: httpx.Client, study: str, objs: list[Obj]) -> None:
    """What a viewer does to open a study: series, metadata, then each image's frame."""
    res = browser.get(f"/dicom-web/studies/{study}/series", headers=JSON)
    assert res.status_code == 200, res.text
    res = browser.get(f"/dicom-web/studies/{study}/metadata", headers=JSON)
    assert res.status_code == 200, res.text
    for o in objs:
        res = browser.get(f"/dicom-web/studies/{study}/series/{o.series}/instances/{o.sop}"
                          "/frames/1", headers=OCTET)
        assert res.status_code == 200, res.text


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    vault = new_vault(tmp_path_factory.mktemp("dpo") / "v")
    vault.set_toml("web", "time_zone", f'"{ZONE}"')  # the practice's zone
    study = "1.2.826.0.1.3680043.10.1234.1"
    alice = [make("PVDPO1", study=study, name="Durand^Alice", study_date="20240312")
             for _ in range(3)]
    louis = make("PVDPO2", name="Petit^Louis")
    with local_web(vault, FakeClock()) as web:
        for o in alice:
            assert web.vault.archive.store(o.raw, source_ae="CT1").status.name == "STORED"
        web.vault.archive.settle()
        store(web.vault, louis)  # source TEST
        store(web.vault, make("PVDPO3", name="Durand^Bernard"))  # a namesake, never viewed
        for name, roles in (("drmartin", ["physician"]), ("drblanc", ["physician"]),
                            ("dpo", ["auditor"])):
            web.accounts.add_user(name, roles, PASSWORD)
        dpo, martin, blanc = web.browser(), web.browser(), web.browser()
        try:
            dpo_app = web.sign_in(dpo, "dpo", PASSWORD).authenticator
            for browser, name in ((martin, "drmartin"), (blanc, "drblanc")):
                web.sign_in(browser, name, PASSWORD)
            _view(martin, study, alice)
            _view(martin, louis.study, [louis])
            _view(blanc, louis.study, [louis])
            for _ in range(60):  # enough rows for two pages and more
                bad = blanc.get("/dicom-web/studies/1.2.3/metadata", headers=JSON)
                assert bad.status_code == 404
            yield Env(web, dpo, martin, blanc, alice, louis, dpo_app)
        finally:
            for b in (dpo, martin, blanc):
                b.close()


def _search(env: Env, headers: dict[str, str] | None = None, **form: str) -> str:
    page = env.dpo.get("/audit", headers=headers)
    assert page.status_code == 200, page.text
    res = env.dpo.post("/audit", data={"csrf": csrf_of(page.text), **form}, headers=headers)
    assert res.status_code == 200, res.text
    return res.text


def _rows(text: str) -> list[dict[str, Any]]:
    """The page's rows: action, cells (text), raw record actions."""
    body = text.split('<table id="audit">', 1)[1].split("</table>\n</div>", 1)[0]
    out = []
    for chunk in body.split('class="audit-row"')[1:]:
        action = re.search(r'data-action="([^"]*)"', chunk)
        main, _, raw = chunk.partition("<details>")
        cells = [html.unescape(re.sub(r"<[^>]+>", " ", c)).split()
                 for c in re.findall(r"<td(?: class=\"when\")?>(.*?)</td>", main, re.S)]
        out.append({"action": action.group(1) if action else "",
                    "cells": [" ".join(c) for c in cells],
                    "raw": re.findall(r"<tr><td>\d+</td><td[^>]*>[^<]*</td><td>([^<]*)</td>", raw)})
    return out


def _trail(env: Env, action: str) -> list[Any]:
    return [r for r in env.web.vault.audit.records() if r.action == action]


def _pdf_text(data: bytes) -> str:
    assert data.startswith(b"%PDF")
    reader = pypdf.PdfReader(io.BytesIO(data))
    return " ".join(" ".join((p.extract_text() or "") for p in reader.pages).split())


def test_one_viewing_is_one_row_with_its_images_and_records(env: Env) -> None:
    text = _search(env, patient="PVDPO1")
    rows = _rows(text)
    views = [r for r in rows if r["action"] == "view"]
    assert len(views) == 1, rows
    (view,) = views
    time, name, who, patient, study, images, outcome, records = view["cells"]
    assert name == "Viewed a study" and who.startswith("drmartin")
    assert "Durand Alice" in patient and "PVDPO1" in patient  # the index names the patient
    assert "2024-03-12" in study and "CT" in study
    assert images == "3" and outcome == "success"
    assert records == "5"  # series search, metadata, three frames: all behind the row
    assert view["raw"] == ["dicomweb.search", "dicomweb.retrieve", "dicomweb.retrieve",
                           "dicomweb.retrieve", "dicomweb.retrieve"]
    assert "frames" in text and "metadata" in text  # each record's details
    # only this patient: the other patient's viewings and name are not on the page
    assert "PVDPO2" not in text and "Petit" not in text
    assert re.fullmatch(r"\S+ \d\d:\d\d:\d\d–\d\d:\d\d:\d\d", time)  # start and end
    check_page(text, "/audit, by patient")  # labels, unique ids, no inline code
    shows = _trail(env, "audit.show")
    assert shows and shows[-1].refs.get("patient_ids") == ["PVDPO1"]


def test_filters_by_user_device_action_and_period(env: Env) -> None:
    rows = _rows(_search(env, user="drblanc"))
    assert rows and all(r["cells"][2].startswith("drblanc") for r in rows)
    rows = _rows(_search(env, user="drblanc", action="view"))
    assert [(r["cells"][2], r["cells"][5]) for r in rows] == [("drblanc (127.0.0.1)", "1")]

    rows = _rows(_search(env, action="view"))
    assert len(rows) == 3 and all(r["action"] == "view" for r in rows)
    assert sorted(r["cells"][5] for r in rows) == ["1", "1", "3"]

    rows = _rows(_search(env, node="CT1"))
    assert rows and all(r["cells"][2].startswith("CT1") for r in rows)
    assert all("PVDPO1" in r["cells"][3] for r in rows)

    rows = _rows(_search(env, action="auth."))
    assert rows and all(r["action"].startswith("auth.") for r in rows)

    today = dt.datetime.now(zoneinfo.ZoneInfo(ZONE)).date()  # the practice's day
    tomorrow, yesterday = today + dt.timedelta(days=1), today - dt.timedelta(days=1)
    assert _rows(_search(env, since=tomorrow.isoformat(), action="view")) == []
    assert _rows(_search(env, until=yesterday.isoformat(), action="view")) == []
    # a whole day, both ends included, in the practice's zone (either side of UTC)
    assert len(_rows(_search(env, since=yesterday.isoformat(), until=tomorrow.isoformat(),
                             action="view"))) == 3
    page = env.dpo.get("/audit")
    bad = env.dpo.post("/audit", data={"csrf": csrf_of(page.text), "since": "last week"})
    assert bad.status_code == 400 and 'aria-invalid="true"' in bad.text
    check_page(bad.text, "/audit, bad period")


def test_times_are_in_the_practice_zone(env: Env) -> None:
    text = _search(env, patient="PVDPO1", action="view")
    assert f"times in {ZONE}" in text
    (view,) = _rows(text)
    first = next(r for r in env.web.vault.audit.records() if r.actor_user == "drmartin"
                 and r.action == "dicomweb.search")
    utc = dt.datetime.fromisoformat(first.time)
    local = utc.astimezone(zoneinfo.ZoneInfo(ZONE))
    assert local.utcoffset() == dt.timedelta(hours=5, minutes=30)
    assert view["cells"][0].startswith(local.strftime("%Y-%m-%d %H:%M:%S"))


def test_pagination(env: Env) -> None:
    first = _search(env)
    total = int(re.search(r'id="audit-count">(\d+) rows', first).group(1))  # type: ignore[union-attr]
    assert total > audit_page.PER_PAGE
    pages = -(-total // audit_page.PER_PAGE)
    assert f"Page 1 of {pages}" in first and 'id="next-page"' in first
    seen = [re.findall(r'<tr id="(row-[^"]+)"', first)]
    for number in range(2, pages + 1):
        seen.append(re.findall(r'<tr id="(row-[^"]+)"', _search(env, page=str(number))))
    assert all(len(s) == audit_page.PER_PAGE for s in seen[:-1])
    keys = [k for s in seen for k in s]
    assert len(keys) == len(set(keys)) == total  # every row once, newest first
    last = _search(env, page=str(pages + 5))  # past the end: the last page
    assert f"Page {pages} of {pages}" in last


def test_csv_export_of_the_filtered_view_is_recorded(env: Env) -> None:
    page = env.dpo.get("/audit")
    res = env.dpo.post("/audit/export", data={"csrf": csrf_of(page.text),
                                              "patient": "PVDPO1", "format": "csv"})
    assert res.status_code == 200
    assert res.headers["content-type"].startswith("text/csv")
    assert "attachment" in res.headers["content-disposition"]
    assert "PVDPO1" not in res.headers["content-disposition"]
    lines = list(csv.DictReader(io.StringIO(res.text.lstrip("\ufeff"))))
    views = [x for x in lines if x["Action code"] == "view"]
    assert len(views) == 1 and views[0]["User"] == "drmartin"
    assert views[0]["Images"] == "3" and views[0]["Records"] == "5"
    assert views[0]["Patient ID"] == "PVDPO1" and views[0]["Patient name"] == "Durand Alice"
    assert views[0]["Action"] == "Viewed a study"
    assert dt.datetime.fromisoformat(views[0]["Start"]).tzinfo is not None
    assert not any("PVDPO2" in json.dumps(x) for x in lines)
    (event,) = _trail(env, "audit.export")
    assert event.detail == {"format": "csv", "rows": len(lines), "via": "web",
                            "records": sum(int(x["Records"]) for x in lines),
                            "filters": "patient"}
    assert event.actor_user == "dpo" and event.code == "110106"
    line = env.web.vault.audit.path.read_text().splitlines()
    written = next(x for x in line if '"audit.export"' in x)
    assert "PVDPO1" not in written and "Durand" not in written  # sealed, never in clear


def test_pdf_export_has_the_rows(env: Env) -> None:
    page = env.dpo.get("/audit")
    res = env.dpo.post("/audit/export", data={"csrf": csrf_of(page.text),
                                              "user": "drmartin", "format": "pdf"})
    assert res.status_code == 200 and res.headers["content-type"] == "application/pdf"
    text = _pdf_text(res.content)
    assert "Viewed a study" in text and "drmartin" in text
    assert "Durand Alice" in text and "Petit Louis" in text  # both of his viewings
    assert "drblanc" not in text
    assert any(e.detail.get("format") == "pdf" and e.detail["filters"] == "user"
               for e in _trail(env, "audit.export"))


def test_patient_access_report_lists_who_accessed_that_patient_only(env: Env) -> None:
    page = env.dpo.get("/audit")
    assert 'action="/audit/patient-report"' in _search(env, patient="PVDPO2")
    res = env.dpo.post("/audit/patient-report", data={"csrf": csrf_of(page.text),
                                                      "patient": "PVDPO1"})
    assert res.status_code == 200 and res.headers["content-type"] == "application/pdf"
    text = _pdf_text(res.content)
    assert "Patient access report" in text and "Durand Alice" in text and "PVDPO1" in text
    assert "drmartin" in text and "CT1" in text  # the viewer, the device that sent it
    assert "drblanc" not in text  # he saw the other patient only
    assert "Petit" not in text and "PVDPO2" not in text
    other = _pdf_text(env.dpo.post("/audit/patient-report", data={
        "csrf": csrf_of(page.text), "patient": "PVDPO2"}).content)
    assert "drblanc" in other and "drmartin" in other and "Durand" not in other
    reports = _trail(env, "audit.patient_report")
    assert [r.refs.get("patient_ids") for r in reports[-2:]] == [["PVDPO1"], ["PVDPO2"]]
    assert all(r.detail["format"] == "pdf" and "PVDPO" not in json.dumps(r.detail)
               for r in reports)
    empty = env.dpo.post("/audit/patient-report", data={"csrf": csrf_of(page.text)})
    assert empty.status_code == 400


def test_physicians_are_refused(env: Env) -> None:
    csrf = csrf_of(env.martin.get("/account").text)
    assert env.martin.get("/audit").status_code == 403
    for path, data in (("/audit", {}), ("/audit/export", {"format": "csv"}),
                       ("/audit/patient-report", {"patient": "PVDPO1"})):
        res = env.martin.post(path, data={"csrf": csrf, **data})
        assert res.status_code == 403, path
        assert "Durand" not in res.text


def test_french_action_names(env: Env) -> None:
    text = _search(env, headers=FRENCH, patient="PVDPO1")
    rows = _rows(text)
    (view,) = [r for r in rows if r["action"] == "view"]
    assert view["cells"][1] == "Consultation d’un examen"
    assert re.match(r"\d\d/\d\d/\d{4} \d\d:\d\d:\d\d", view["cells"][0])
    assert "Exporter en CSV" in text and "réussite" in text
    assert "Images enregistrées (DICOM)" in text  # the device's store


@pytest.mark.browser
def test_browser_groups_one_viewing_and_exports_csv(env: Env) -> None:
    """Chromium: the DPO signs in, filters by patient, sees the viewing as one row (its
    records behind "details"), and downloads the CSV of that view."""
    base = f"https://127.0.0.1:{env.web.port}"
    with chromium() as browser:
        page = new_page(browser)
        password_step(page, base, "dpo", PASSWORD)
        second_factor(page, env.dpo_app)
        page.goto(base + "/audit")
        page.fill("#patient", "PVDPO1")
        with page.expect_navigation():
            page.click("#audit-filters button[name=page]")
        assert "PVDPO1" not in page.url
        views = page.locator('tr.audit-row[data-action="view"]')
        assert views.count() == 1
        row = views.first
        assert "Viewed a study" in row.inner_text() and "Durand Alice" in row.inner_text()
        details = page.locator(f"#{row.get_attribute('id')} + tr.audit-records details")
        raw = details.locator("table.raw")
        assert not raw.is_visible()
        details.locator("summary").click()
        assert raw.is_visible() and raw.locator("tbody tr").count() == 5
        shot(page, "audit-dpo-viewing")
        with page.expect_download() as info:
            page.click("#export-csv")
        data = Path(info.value.path()).read_text("utf-8-sig")
        lines = list(csv.DictReader(io.StringIO(data)))
        (view,) = [x for x in lines if x["Action code"] == "view"]
        assert view["Images"] == "3" and view["Patient ID"] == "PVDPO1"
        assert info.value.suggested_filename.endswith(".csv")
        page.context.close()


def _rec(seq: int, minute: float, action: str = "dicomweb.retrieve", *, user: str = "dr",
         study: str = "S1", sops: tuple[str, ...] = (), outcome: str = "success",
         detail: dict[str, Any] | None = None) -> Record:
    when = dt.datetime(2026, 3, 2, 9, 0, tzinfo=dt.UTC) + dt.timedelta(minutes=minute)
    return Record(seq, when.isoformat(), "event", action, outcome, "110103", "",
                  "127.0.0.1", user, "", detail or {"resource": "frames"},
                  {"study_uids": [study], "sop_uids": list(sops)})


def test_grouping_rules_without_a_server() -> None:
    """A gap longer than ten minutes ends a viewing; another record in between does not;
    another user, study or API token, a failure, a search listing studies: rows of their
    own."""
    records = [
        _rec(1, 0, detail={"resource": "metadata", "instances": 4}),
        _rec(2, 1, sops=("a",)), _rec(3, 2, "auth.login"), _rec(4, 3, sops=("b",)),
        _rec(5, 4, sops=("b",)),  # the same image again: still two images
        _rec(6, 5, user="other", sops=("a",)),
        _rec(7, 6, study="S2", sops=("c",)),
        _rec(8, 7, outcome="minor_failure"),
        _rec(9, 8, detail={"resource": "frames", "token": "t1"}, sops=("a",)),
        _rec(10, 9, "dicomweb.search", detail={"level": "study"}),
        _rec(11, 10, "dicomweb.search", detail={"level": "series"}),
        _rec(12, 10.5, "dicomweb.search", user="third", detail={"level": "series"}),
        _rec(13, 25, sops=("d",)),  # 15 minutes after the last: a new viewing
        _rec(14, 26, study="S3", detail={"resource": "metadata", "instances": 4}),
        _rec(15, 27, "dicomweb.search", user="third", detail={"level": "study"}),
        _rec(16, 27.5, "dicomweb.search", detail={"level": "study", "matches": 2}),
    ]
    records[-1].refs["study_uids"].append("S9")  # a search listing two studies
    groups = group_records(records)
    assert [[r.seq for r in g.records] for g in groups] == [
        [1, 2, 4, 5, 10, 11], [3], [6], [7], [8], [9], [12], [13], [14], [15], [16]]
    # searches alone (no image read) stay searches, in their place
    assert [g.kind for g in groups] == [VIEW, "", VIEW, VIEW, "", VIEW, "", VIEW, VIEW,
                                        "", ""]
    assert groups[0].images == 2 and groups[0].study_uids == ["S1"]
    assert groups[8].images == 4  # metadata alone: the instances it covered
    assert groups[0].action == VIEW and groups[1].action == "auth.login"


def test_french_patient_access_report(env: Env) -> None:
    page = env.dpo.get("/audit", headers=FRENCH)
    res = env.dpo.post("/audit/patient-report", headers=FRENCH,
                       data={"csrf": csrf_of(page.text), "patient": "PVDPO2"})
    assert res.status_code == 200
    text = _pdf_text(res.content)
    assert "Rapport des accès au dossier du patient" in text and "RGPD, article 15" in text
    assert "Qui a accédé au dossier" in text and "Consultation d’un examen" in text
    assert re.search(r"\d\d/\d\d/\d{4} \d\d:\d\d", text)  # French dates


def test_a_patient_found_by_name(env: Env) -> None:
    """A DPO is asked by a person: the name finds the ID (any case, any order of the
    words); several namesakes are offered; the look-up is recorded."""
    text = _search(env, patient_name="durand")
    assert 'id="candidates"' in text and "Which patient?" in text
    block = text.split('id="candidates"', 1)[1].split("</section>", 1)[0]
    assert "Durand Alice" in block and "PVDPO1" in block
    assert "Durand Bernard" in block and "PVDPO3" in block and "PVDPO2" not in block
    check_page(text, "/audit, candidates")
    lookup = [r for r in _trail(env, "audit.show") if r.detail.get("lookup") == "name"][-1]
    assert lookup.detail["matches"] == 2 and "durand" not in json.dumps(lookup.detail).lower()
    assert sorted(lookup.refs.get("patient_ids", [])) == ["PVDPO1", "PVDPO3"]

    rows = _rows(_search(env, patient_name="ALICE  Durand", action="view"))
    assert [(r["cells"][3].split(" Access")[0], r["cells"][5]) for r in rows] == [
        ("Durand Alice PVDPO1", "3")]

    page = env.dpo.get("/audit")
    none = env.dpo.post("/audit", data={"csrf": csrf_of(page.text), "patient_name": "Zorro"})
    assert none.status_code == 404 and "No patient has this name." in none.text
    report = env.dpo.post("/audit/patient-report", data={"csrf": csrf_of(page.text),
                                                         "patient_name": "petit"})
    assert report.status_code == 200
    assert "PVDPO2" in _pdf_text(report.content)


def test_names_come_from_either_index(backend: Backend, tmp_path: Path) -> None:
    """The rows' patients and studies, and the look-up by name, on the embedded index and
    on sealed PostgreSQL (where names are sealed: matched by the index's own code)."""
    vault = backend.new_vault(tmp_path / "v")
    alice = make("PVIDX1", name="Durand^Alice", study_date="20240312")
    other = make("PVIDX2", name="Martin^Jeanne")
    v = vault.open()
    try:
        store(v, alice, other)
        found = Directory.load(v, [alice.study, other.study, "1.2.3.4"], ["PVIDX2", "NONE"])
        assert found.studies[alice.study].patient_id == "PVIDX1"
        assert found.studies[alice.study].date == "20240312"
        assert found.names == {"PVIDX1": "Durand^Alice", "PVIDX2": "Martin^Jeanne"}
        assert patients_named(v, "alice DURAND") == [("PVIDX1", "Durand Alice")]
        assert patients_named(v, "jeanne") == [("PVIDX2", "Martin Jeanne")]
        assert patients_named(v, "durand jeanne") == []
    finally:
        v.close()
