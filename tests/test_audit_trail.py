"""The tamper-evident audit trail: ``audit verify`` catches every kind of edit and names the
first bad record; retention seals old records and the chain still verifies; ``audit show``
answers "who accessed this patient's data" from a real server driven by dcmtk; patient
references are encrypted in the trail; ``serve`` checks the trail at start; the server and
CLI commands append to one trail concurrently without corrupting it.

Most ``pacsvault`` commands run in-process through ``pacsvault.cli.main.main`` (the same
code path as the console script, without a 1-3 s interpreter start each); a few run as real
subprocesses to pin the exit codes a user sees.
"""

from __future__ import annotations

import base64
import contextlib
import datetime as dt
import hashlib
import io
import json
import shutil
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from pydicom import dcmread

from pacsvault.audit import AuditEvent, EventCode, Outcome
from pacsvault.cli.main import main
from pacsvault.vault import Vault
from tests import corpus
from tests.helpers import (
    AE,
    Server,
    VaultDir,
    dcmtk,
    dcmtk_env,
    echoscu,
    events,
    make_vault,
    start_server,
    storescu,
    wait_events,
)

pytestmark = pytest.mark.slow

GENESIS = "0" * 64
N_EVENTS = 20
LOCAL = "127.0.0.1"
MODALITY, WS = "MODALITY", "WS"


# --- helpers ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Run:
    returncode: int
    stdout: str
    stderr: str

    @property
    def output(self) -> str:
        return self.stdout + self.stderr


def cli(vault: VaultDir, *args: str | Path) -> Run:
    """``pacsvault ARGS --data … --key-file …`` in-process; returns its exit code and output."""
    out, err = io.StringIO(), io.StringIO()
    argv = [*map(str, args), "--data", str(vault.data), "--key-file", str(vault.key)]
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code: int | str | None = main(argv)
        except SystemExit as exc:
            code = exc.code
    return Run(code if isinstance(code, int) else (0 if code is None else 2),
               out.getvalue(), err.getvalue())


def clone(template: VaultDir, dest: Path) -> VaultDir:
    """A copy of a closed vault (same key): cheaper than ``pacsvault init`` per test."""
    shutil.copytree(template.root, dest)
    return VaultDir(dest, dest / template.key.relative_to(template.root), template.recovery_code)


def trail_path(vault: VaultDir) -> Path:
    return vault.data / "audit" / "trail.jsonl"


def read_lines(vault: VaultDir) -> list[bytes]:
    return trail_path(vault).read_bytes().splitlines()


def write_lines(vault: VaultDir, lines: list[bytes]) -> None:
    trail_path(vault).write_bytes(b"".join(line + b"\n" for line in lines))


def emit(vault: VaultDir, make: Iterator[AuditEvent]) -> None:
    v = Vault.open(vault.data, vault.key)
    try:
        for event in make:
            v.recorder.emit(event)
    finally:
        v.close()


def canonical(body: dict[str, Any]) -> bytes:
    return json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def other_char(byte: int) -> int:
    """A different character of the same class (keeps JSON, hex and base64 valid)."""
    for lo, hi in ((0x30, 0x39), (0x41, 0x5A), (0x61, 0x7A)):
        if lo <= byte <= hi:
            return lo if byte == hi else byte + 1
    raise AssertionError(f"not alphanumeric: {chr(byte)!r}")


def change_one_byte(line: bytes, marker: bytes, offset: int = 0) -> bytes:
    """Change one byte of the string value following ``marker``: the first letter or digit
    from ``offset`` characters in (base64 may have ``+`` or ``/`` there)."""
    start = line.index(marker) + len(marker)
    end = line.index(b'"', start)
    at = start + offset
    while not chr(line[at]).isalnum():
        at += 1
    assert at < end, "ran past the end of the value"
    changed = line[:at] + bytes([other_char(line[at])]) + line[at + 1:]
    assert sum(a != b for a, b in zip(line, changed, strict=True)) == 1
    json.loads(changed)  # still a well-formed record: only the signature can tell
    return changed


def resign(lines: list[bytes], key: Ed25519PrivateKey, *, start: int = 0) -> list[bytes]:
    """Re-hash and re-sign lines[start:] consistently, as a forger without the vault key."""
    out = list(lines[:start])
    prev = GENESIS
    if start:
        body = json.loads(lines[start - 1])
        body.pop("sig")
        prev = hashlib.sha256(canonical(body)).hexdigest()
    for line in lines[start:]:
        body = json.loads(line)
        body.pop("sig")
        body["prev"] = prev
        prev = hashlib.sha256(canonical(body)).hexdigest()
        body["sig"] = base64.b64encode(key.sign(bytes.fromhex(prev))).decode()
        out.append(canonical(body))
    return out


def show_json(vault: VaultDir, *filters: str) -> list[dict[str, Any]]:
    res = cli(vault, "audit", "show", *filters, "--json")
    assert res.returncode == 0, res.output
    return [json.loads(line) for line in res.stdout.splitlines() if line.strip()]


# --- vaults ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def blank(tmp_path_factory: pytest.TempPathFactory) -> VaultDir:
    """One ``pacsvault init`` for the module; tests work on copies. Its trail is emptied:
    ``init`` records the alert channel chosen (issue 19), and these tests number records
    from 1 (the trail file and its anchors go back to what they are before any record)."""
    vault = make_vault(tmp_path_factory.mktemp("blank") / "v")
    assert [json.loads(line)["action"] for line in read_lines(vault)] == ["alerts.choice"]
    v = Vault.open(vault.data, vault.key)
    try:
        with v.engine.begin() as conn:
            for table in ("audit_head", "audit_lines"):
                conn.exec_driver_sql(f"DELETE FROM {table}")  # noqa: S608 (fixed names)
    finally:
        v.close()
    trail_path(vault).write_bytes(b"")
    return vault


def _twenty_events() -> Iterator[AuditEvent]:
    for n in range(1, N_EVENTS + 1):
        refs = n % 3 == 0
        yield AuditEvent(
            action=("node.add", "dicom.find", "export", "dicom.get")[n % 4],
            outcome=Outcome.SUCCESS, code=EventCode.APPLICATION_ACTIVITY,
            actor_ae=f"NODE{n:02d}", actor_address=LOCAL, actor_user="local-admin",
            message=f"event number {n}", detail={"node": f"NODE{n:02d}", "count": n},
            study_uids=(f"1.2.826.0.1.3680043.10.999.{n}",) if refs else (),
            sop_uids=(f"1.2.826.0.1.3680043.10.999.{n}.1",) if refs else (),
            patient_ids=(f"PVAUDIT{n:03d}",) if refs else (),
        )


@pytest.fixture(scope="module")
def twenty(blank: VaultDir, tmp_path_factory: pytest.TempPathFactory) -> VaultDir:
    """A vault whose trail holds exactly records 1..20, some with sealed references."""
    vault = clone(blank, tmp_path_factory.mktemp("twenty") / "v")
    emit(vault, _twenty_events())
    lines = read_lines(vault)
    assert [json.loads(line)["seq"] for line in lines] == list(range(1, N_EVENTS + 1))
    assert all("refs" in json.loads(lines[n - 1]) for n in (3, 6, 9))
    return vault


@pytest.fixture
def trail20(twenty: VaultDir, tmp_path: Path) -> VaultDir:
    return clone(twenty, tmp_path / "v")


# === 1. tampering =======================================================================


def test_pristine_trail_verifies_with_the_real_cli(trail20: VaultDir) -> None:
    res = trail20.cli("audit", "verify", check=False)
    assert res.returncode == 0, res.stdout + res.stderr
    assert f"audit trail intact: {N_EVENTS} records" in res.stdout
    # verify is itself recorded, and the trail still verifies afterwards
    last = json.loads(read_lines(trail20)[-1])
    assert (last["seq"], last["action"], last["outcome"]) == (N_EVENTS + 1, "audit.verify",
                                                              "success")
    again = cli(trail20, "audit", "verify")
    assert again.returncode == 0 and f"intact: {N_EVENTS + 1} records" in again.stdout


def test_one_changed_byte_is_reported_by_the_real_cli(trail20: VaultDir) -> None:
    lines = read_lines(trail20)
    lines[6] = change_one_byte(lines[6], b'"action":"')
    write_lines(trail20, lines)
    res = trail20.cli("audit", "verify", check=False)
    assert res.returncode == 1, res.stdout + res.stderr
    assert "AUDIT TRAIL BROKEN" in res.stdout
    assert "record 7 (line 7)" in res.stdout, res.stdout


@pytest.mark.parametrize(
    ("line", "marker", "offset"),
    [
        pytest.param(7, b'"action":"', 0, id="action"),
        pytest.param(8, b'"node":"', 5, id="detail-value"),
        pytest.param(9, b'"refs":"', 20, id="sealed-refs-blob"),
        pytest.param(10, b'"time":"', 18, id="time"),
        pytest.param(11, b'"prev":"', 30, id="prev-hash"),
        pytest.param(12, b'"ae":"', 1, id="actor-ae"),
        pytest.param(13, b'"sig":"', 10, id="signature"),
        pytest.param(20, b'"message":"', 2, id="last-record"),
    ],
)
def test_one_changed_byte_names_the_record(
    trail20: VaultDir, line: int, marker: bytes, offset: int
) -> None:
    lines = read_lines(trail20)
    lines[line - 1] = change_one_byte(lines[line - 1], marker, offset)
    write_lines(trail20, lines)
    res = cli(trail20, "audit", "verify")
    assert res.returncode == 1, res.output
    assert f"record {line} (line {line})" in res.stdout, res.stdout
    assert "altered or forged" in res.stdout
    # the failed verification is itself recorded as a security alert
    last = json.loads(read_lines(trail20)[-1])
    assert (last["action"], last["outcome"], last["code"]) == (
        "audit.verify", "major_failure", EventCode.SECURITY_ALERT.value)


def _delete(lines: list[bytes]) -> list[bytes]:
    return lines[:9] + lines[10:]


def _swap(lines: list[bytes]) -> list[bytes]:
    return [*lines[:4], lines[5], lines[4], *lines[6:]]


def _truncate_tail(lines: list[bytes]) -> list[bytes]:
    return lines[:-3]


def _drop_head(lines: list[bytes]) -> list[bytes]:
    return lines[3:]


def _append_copy(lines: list[bytes]) -> list[bytes]:
    return [*lines, lines[3]]


def _duplicate(lines: list[bytes]) -> list[bytes]:
    return [*lines[:5], lines[4], *lines[5:]]


def _empty(lines: list[bytes]) -> list[bytes]:
    return []


@pytest.mark.parametrize(
    ("tamper", "expected"),
    [
        pytest.param(_delete, ["record 11 (line 10)", "expected record 10"], id="delete"),
        pytest.param(_swap, ["record 6 (line 5)", "expected record 5"], id="swap"),
        pytest.param(_truncate_tail, [f"ends at record {N_EVENTS - 3}",
                                      f"record {N_EVENTS} was written", "truncated"],
                     id="truncate-tail"),
        pytest.param(_drop_head, ["record 4 (line 1)", "expected record 1"], id="drop-head"),
        pytest.param(_append_copy, [f"record 4 (line {N_EVENTS + 1})",
                                    f"expected record {N_EVENTS + 1}"], id="append-copy"),
        pytest.param(_duplicate, ["record 5 (line 6)", "expected record 6"], id="duplicate"),
        pytest.param(_empty, ["ends at record 0", "truncated"], id="emptied"),
    ],
)
def test_moved_or_missing_records_are_located(
    trail20: VaultDir, tamper: Callable[[list[bytes]], list[bytes]], expected: list[str]
) -> None:
    write_lines(trail20, tamper(read_lines(trail20)))
    res = cli(trail20, "audit", "verify")
    assert res.returncode == 1, res.output
    assert "AUDIT TRAIL BROKEN" in res.stdout
    for text in expected:
        assert text in res.stdout, res.stdout


@pytest.mark.parametrize("junk", [b"garbage", b"{}", b"[]", b'{"v":"pacsvault-audit/1"'],
                         ids=["text", "empty-object", "array", "cut-record"])
def test_a_line_that_is_not_a_record_is_located(trail20: VaultDir, junk: bytes) -> None:
    lines = read_lines(trail20)
    lines.insert(7, junk)
    write_lines(trail20, lines)
    res = cli(trail20, "audit", "verify")
    assert res.returncode == 1, res.output
    assert "line 8 is not a valid record" in res.stdout, res.stdout


@pytest.mark.parametrize("junk", [b"null", b"5", b'"text"', b"true"])
def test_a_json_scalar_line_is_located_not_a_crash(trail20: VaultDir, junk: bytes) -> None:
    lines = read_lines(trail20)
    lines.insert(7, junk)
    write_lines(trail20, lines)
    res = cli(trail20, "audit", "verify")
    assert res.returncode == 1 and "line 8" in res.stdout, res.output
    assert cli(trail20, "audit", "show").returncode == 0


def test_missing_trail_file_is_reported(trail20: VaultDir) -> None:
    trail_path(trail20).unlink()
    res = cli(trail20, "audit", "verify")
    assert res.returncode == 1 and "missing" in res.stdout, res.output


def test_rehashed_forgery_without_the_key_fails_on_record_1(trail20: VaultDir) -> None:
    """The forger deletes record 5, renumbers, re-chains and re-signs with their own key."""
    lines = read_lines(trail20)
    bodies = [json.loads(line) for line in lines[:4] + lines[5:]]
    for seq, body in enumerate(bodies, start=1):
        body["seq"] = seq
    forged = resign([canonical(b) for b in bodies], Ed25519PrivateKey.generate())
    # the forgery is internally consistent: every prev is the hash of the record before
    prev = GENESIS
    for line in forged:
        body = json.loads(line)
        assert body["prev"] == prev
        body.pop("sig")
        prev = hashlib.sha256(canonical(body)).hexdigest()
    write_lines(trail20, forged)
    res = cli(trail20, "audit", "verify")
    assert res.returncode == 1, res.output
    assert "record 1 (line 1)" in res.stdout and "forged" in res.stdout, res.stdout


def test_rehashed_forgery_of_the_tail_fails_on_the_first_forged_record(
    trail20: VaultDir,
) -> None:
    lines = read_lines(trail20)
    lines[11] = change_one_byte(lines[11], b'"action":"')
    write_lines(trail20, resign(lines, Ed25519PrivateKey.generate(), start=11))
    res = cli(trail20, "audit", "verify")
    assert res.returncode == 1, res.output
    assert "record 12 (line 12)" in res.stdout, res.stdout


@pytest.mark.parametrize("tamper", ["truncate-tail", "emptied", "deleted"])
def test_truncation_stays_detected_after_more_events(trail20: VaultDir, tamper: str) -> None:
    if tamper == "deleted":
        trail_path(trail20).unlink()
    else:
        lines = read_lines(trail20)
        write_lines(trail20, lines[:-3] if tamper == "truncate-tail" else [])
    first = cli(trail20, "audit", "verify")
    assert first.returncode == 1, first.output
    emit(trail20, iter([AuditEvent(action="dicom.association.rejected",
                                   outcome=Outcome.MINOR_FAILURE,
                                   code=EventCode.SECURITY_ALERT, actor_ae="INTRUDER")]))
    again = cli(trail20, "audit", "verify")
    assert again.returncode == 1, again.output


# === 2. retention =======================================================================


def _aged(action: str, when: dt.datetime, n: int) -> AuditEvent:
    return AuditEvent(action=action, outcome=Outcome.SUCCESS, code=EventCode.QUERY,
                      actor_ae="OLDNODE", actor_address=LOCAL, time=when,
                      study_uids=(f"1.2.826.0.1.3680043.10.998.{n}",), detail={"n": n})


def _aged_events(now: dt.datetime) -> Iterator[AuditEvent]:
    n = 0
    for action, days in (("test.d500", 500), ("test.d400", 400), ("test.d40", 40),
                         ("test.d10", 10), ("test.d0", 0)):
        for i in range(2 if days in (40, 10, 0) else 3):
            n += 1
            yield _aged(action, now - dt.timedelta(days=days) + dt.timedelta(minutes=i), n)


def _body(line: bytes) -> dict[str, Any]:
    value: dict[str, Any] = json.loads(line)
    return value


def test_retention_purge_seals_old_records_and_the_chain_verifies(
    blank: VaultDir, tmp_path: Path
) -> None:
    vault = clone(blank, tmp_path / "v")
    now = dt.datetime.now(dt.UTC) - dt.timedelta(minutes=10)
    emit(vault, _aged_events(now))
    original = read_lines(vault)
    assert [_body(line)["action"] for line in original] == (
        ["test.d500"] * 3 + ["test.d400"] * 3 + ["test.d40"] * 2 + ["test.d10"] * 2
        + ["test.d0"] * 2)

    # a shorter window without a recorded reason is refused, and nothing is touched
    vault.set_toml("audit", "retention_days", "30")
    res = cli(vault, "audit", "purge")
    assert res.returncode == 2, res.output
    assert "retention_justification" in res.stderr and "365" in res.stderr, res.stderr
    assert read_lines(vault) == original

    # the default 365-day window: the 500- and 400-day-old records are sealed
    vault.set_toml("audit", "retention_days", "365")
    res = cli(vault, "audit", "purge")
    assert res.returncode == 0, res.output
    assert "Sealed 6 record(s)" in res.stderr
    after = read_lines(vault)
    seal = _body(after[0])
    assert (seal["kind"], seal["action"], seal["seq"]) == ("seal", "audit.retention", 6)
    assert seal["detail"] == {"sealed_records": 6, "first_sealed_seq": 1}
    assert "365 days" in seal["message"]
    assert seal["sealed_digest"] == hashlib.sha256(b"\n".join(original[:6])).hexdigest()
    assert after[1:7] == original[6:]  # kept records byte for byte
    purge = _body(after[7])
    assert (purge["action"], purge["detail"]) == ("audit.purge", {"sealed_records": 6})
    assert len(after) == 8
    assert not any(_body(line)["action"] in ("test.d500", "test.d400") for line in after)
    res = cli(vault, "audit", "verify")
    assert res.returncode == 0, res.output

    # records that are kept are still readable with their sealed references
    kept = show_json(vault, "--action", "test.")
    assert [r["action"] for r in kept] == ["test.d40"] * 2 + ["test.d10"] * 2 + ["test.d0"] * 2
    assert [r["study_uids"] for r in kept] == [
        [f"1.2.826.0.1.3680043.10.998.{n}"] for n in range(7, 13)]

    # a 30-day window with a recorded justification is accepted, used and recorded
    reason = "regional health authority instruction 2024-17 for this test"
    vault.set_toml("audit", "retention_days", "30")
    vault.set_toml("audit", "retention_justification", json.dumps(reason))
    before = read_lines(vault)
    res = cli(vault, "audit", "purge")
    assert res.returncode == 0, res.output
    assert "Sealed 2 record(s)" in res.stderr
    after = read_lines(vault)
    seal = _body(after[0])
    assert seal["kind"] == "seal" and seal["seq"] == 8
    assert seal["detail"] == {"sealed_records": 8, "first_sealed_seq": 1}  # accumulated
    assert "30 days" in seal["message"] and reason in seal["message"]
    assert seal["sealed_digest"] == hashlib.sha256(b"\n".join(before[:3])).hexdigest()
    assert after[1:-1] == before[3:]
    assert _body(after[-1])["action"] == "audit.purge" and reason in _body(after[-1])["message"]
    res = cli(vault, "audit", "verify")
    assert res.returncode == 0, res.output
    assert [r["action"] for r in show_json(vault, "--action", "test.")] == (
        ["test.d10"] * 2 + ["test.d0"] * 2)

    # purging again with nothing expired changes nothing, and still verifies
    before = read_lines(vault)
    res = cli(vault, "audit", "purge")
    assert res.returncode == 0 and "Sealed 0 record(s)" in res.stderr, res.output
    assert read_lines(vault) == before
    real = vault.cli("audit", "verify", check=False)
    assert real.returncode == 0, real.stdout + real.stderr


def test_tampering_with_a_seal_is_detected(blank: VaultDir, tmp_path: Path) -> None:
    vault = clone(blank, tmp_path / "v")
    emit(vault, _aged_events(dt.datetime.now(dt.UTC) - dt.timedelta(minutes=10)))
    assert cli(vault, "audit", "purge").returncode == 0
    lines = read_lines(vault)
    lines[0] = lines[0].replace(b'"sealed_records":6', b'"sealed_records":1')
    write_lines(vault, lines)
    res = cli(vault, "audit", "verify")
    assert res.returncode == 1 and "record 6 (line 1)" in res.stdout, res.output


def test_purging_every_record_keeps_a_verifiable_chain(blank: VaultDir, tmp_path: Path) -> None:
    vault = clone(blank, tmp_path / "v")
    old = dt.datetime.now(dt.UTC) - dt.timedelta(days=400)
    emit(vault, (_aged("test.d400", old + dt.timedelta(minutes=i), i) for i in range(3)))
    res = cli(vault, "audit", "purge")
    assert res.returncode == 0 and "Sealed 3 record(s)" in res.stderr, res.output
    res = cli(vault, "audit", "verify")
    assert res.returncode == 0, res.output


# === 3, 4, 6: a real server, dcmtk peers, audit show ======================================


@dataclass
class Scenario:
    vault: VaultDir
    server: Server
    a: corpus.CorpusFile  # stored by MODALITY, retrieved by WS
    b: corpus.CorpusFile  # stored by MODALITY only
    get_out: Path


def _dcmtk(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(args), capture_output=True, text=True, env=dcmtk_env(),
                          timeout=timeout)


@pytest.fixture(scope="module")
def scenario(blank: VaultDir, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Scenario]:
    root = tmp_path_factory.mktemp("scenario")
    vault = clone(blank, root / "v")
    v = Vault.open(vault.data, vault.key)
    try:
        v.nodes.add(MODALITY, LOCAL, roles=("store",))
        v.nodes.add(WS, LOCAL, roles=("query", "retrieve"))
    finally:
        v.close()
    files = corpus.build(root / "corpus")
    a, b = files[0], files[1]  # CT_small and MR_small_implicit (UTF-8 name)
    assert a.patient_id != b.patient_id and a.study_uid != b.study_uid
    server = start_server(vault)
    try:
        for f in (a, b):  # one association each
            res = storescu(server.port, [f.path], calling=MODALITY, extra=f.proposal)
            assert res.returncode == 0, res.stdout + res.stderr
        stores = wait_events(vault, "dicom.store.association", count=2, timeout=15)
        assert len(stores) == 2
        out = root / "get"
        out.mkdir()
        res = _dcmtk(dcmtk("getscu"), "-S", "-aet", WS, "-aec", AE, "-od", str(out),
                     "-k", "QueryRetrieveLevel=STUDY", "-k", f"StudyInstanceUID={a.study_uid}",
                     LOCAL, str(server.port))
        assert res.returncode == 0, res.stdout + res.stderr
        assert [str(dcmread(p).SOPInstanceUID) for p in out.iterdir()] == [a.sop_uid]
        res = _dcmtk(dcmtk("findscu"), "-S", "-aet", WS, "-aec", AE,
                     "-k", "QueryRetrieveLevel=STUDY", "-k", f"PatientID={a.patient_id}",
                     "-k", "StudyInstanceUID", "-k", "PatientName", LOCAL, str(server.port))
        assert res.returncode == 0, res.stdout + res.stderr
        assert wait_events(vault, "dicom.get", lambda e: e["ae"] == WS, timeout=15)
        assert wait_events(vault, "dicom.find", lambda e: e["ae"] == WS, timeout=15)
        yield Scenario(vault, server, a, b, out)
    finally:
        server.stop()


def _concerns(record: dict[str, Any], f: corpus.CorpusFile) -> bool:
    return (f.study_uid in record.get("study_uids", [])
            or f.patient_id in record.get("patient_ids", []))


def test_show_patient_answers_who_accessed_it(scenario: Scenario) -> None:
    vault, a, b = scenario.vault, scenario.a, scenario.b
    records = show_json(vault, "--patient", a.patient_id)
    by_action: dict[str, list[dict[str, Any]]] = {}
    for r in records:
        by_action.setdefault(r["action"], []).append(r)
    # stored by the modality, then retrieved by the workstation: who, from where, when
    (store,) = by_action["dicom.store.association"]
    assert (store["node"], store["address"], store["outcome"]) == (MODALITY, LOCAL, "success")
    assert store["study_uids"] == [a.study_uid]
    (begin,) = by_action["dicom.get.begin"]
    (get,) = by_action["dicom.get"]
    for r in (begin, get):
        assert (r["node"], r["address"]) == (WS, LOCAL)
        assert r["study_uids"] == [a.study_uid]
    assert get["detail"]["sent"] == 1 and get["event_code"] == EventCode.INSTANCES_TRANSFERRED.value
    assert begin["event_code"] == EventCode.BEGIN_TRANSFERRING.value
    assert store["time"] < begin["time"] <= get["time"]
    for r in records:
        dt.datetime.fromisoformat(r["time"])
        assert _concerns(r, a), r
        assert not _concerns(r, b), r  # nothing about the other patient
    # the other patient: only its own store
    other = show_json(vault, "--patient", b.patient_id)
    assert [r["action"] for r in other if r["action"] != "audit.show"] == [
        "dicom.store.committed", "dicom.store.association"]
    assert all(not _concerns(r, a) for r in other)
    assert show_json(vault, "--patient", "NOSUCHPATIENT") == []


def test_show_patient_is_itself_recorded(scenario: Scenario) -> None:
    vault, a = scenario.vault, scenario.a
    before = len(events(vault, "audit.show"))
    matched = show_json(vault, "--patient", a.patient_id)
    shows = events(vault, "audit.show")
    assert len(shows) == before + 1
    last = shows[-1]
    assert last["patient_ids"] == [a.patient_id]
    assert last["user"] == "local-admin" and last["outcome"] == "success"
    assert last["code"] == EventCode.QUERY.value and last["matches"] == len(matched)
    # and it answers the next "who accessed this patient's data"
    again = show_json(vault, "--patient", a.patient_id)
    assert [r["seq"] for r in again if r["action"] == "audit.show"][-1] == last["seq"]


def test_show_patient_includes_queries_that_returned_the_patient(scenario: Scenario) -> None:
    records = show_json(scenario.vault, "--patient", scenario.a.patient_id)
    assert any(r["action"] == "dicom.find" and r["node"] == WS for r in records)


def test_show_study_node_action_filters(scenario: Scenario) -> None:
    vault, a, b = scenario.vault, scenario.a, scenario.b
    study = [r for r in show_json(vault, "--study", b.study_uid) if r["action"] != "audit.show"]
    # the batch committed with the image (defect 8 of issue 11), then the association's summary
    assert [(r["action"], r["node"]) for r in study] == [("dicom.store.committed", MODALITY),
                                                        ("dicom.store.association", MODALITY)]
    assert all(r["study_uids"] == [b.study_uid] for r in study)
    # --study reads data about a study: recorded too
    assert events(vault, "audit.show")[-1]["study_uids"] == [b.study_uid]

    # (serve's alert sink may add its own alert.* records about a node: not counted here)
    ws = show_json(vault, "--node", WS)
    assert all(r["node"] == WS for r in ws)
    assert {r["action"] for r in ws if r["action"].startswith("dicom.")} == {
        "dicom.association.accepted", "dicom.find", "dicom.get.begin", "dicom.get"}
    modality = show_json(vault, "--node", MODALITY)
    assert all(r["node"] == MODALITY for r in modality)
    assert [r["action"] for r in modality if r["action"].startswith("dicom.")] == [
        "dicom.association.accepted", "dicom.store.committed", "dicom.store.association"] * 2
    assert show_json(vault, "--node", "NOBODY") == []

    gets = show_json(vault, "--action", "dicom.get")
    assert [r["action"] for r in gets] == ["dicom.get.begin", "dicom.get"]
    stores = show_json(vault, "--action", "dicom.store")
    assert [sorted(r["study_uids"]) for r in stores] == [[a.study_uid]] * 2 + [[b.study_uid]] * 2
    exact = show_json(vault, "--action", "dicom.get.begin")
    assert [r["action"] for r in exact] == ["dicom.get.begin"]

    combined = show_json(vault, "--node", WS, "--action", "dicom.get", "--patient", a.patient_id)
    assert [r["action"] for r in combined] == ["dicom.get.begin", "dicom.get"]
    users = show_json(vault, "--user", "local-admin", "--action", "audit.show")
    assert users and all(r["user"] == "local-admin" for r in users)


def test_show_since_until(scenario: Scenario) -> None:
    vault = scenario.vault

    def dicom_records(*extra: str) -> list[dict[str, Any]]:
        # association-accepted records interleave with the ones this test reasons about
        return [r for r in show_json(vault, "--action", "dicom.", *extra)
                if r["action"] != "dicom.association.accepted"]

    everything = dicom_records()
    times = {r["action"]: r["time"] for r in everything}
    stores = [r for r in everything if r["action"].startswith("dicom.store.")]
    # inclusive bounds, exact to the microsecond
    window = dicom_records("--since", times["dicom.get.begin"], "--until", times["dicom.get"])
    assert [r["action"] for r in window] == ["dicom.get.begin", "dicom.get"]
    # the same instant written with another UTC offset
    local = dt.datetime.fromisoformat(stores[-1]["time"]).astimezone(
        dt.timezone(dt.timedelta(hours=2)))
    assert local.isoformat().endswith("+02:00")
    upto = dicom_records("--until", local.isoformat())
    assert [r["seq"] for r in upto] == [r["seq"] for r in stores]
    since = dicom_records("--since", local.isoformat())
    assert since[0]["seq"] == stores[-1]["seq"]
    assert len(since) == len(everything) - len(stores) + 1
    # a whole-day window; a future since; an invalid date is a usage error
    day = dt.datetime.fromisoformat(stores[0]["time"]).date()
    assert len(dicom_records("--since", day.isoformat())) == len(everything)
    assert show_json(vault, "--since", (day + dt.timedelta(days=2)).isoformat()) == []
    assert cli(vault, "audit", "show", "--since", "yesterday").returncode == 2


def test_show_table(scenario: Scenario) -> None:
    vault = scenario.vault
    expected = show_json(vault, "--action", "dicom.")
    res = cli(vault, "audit", "show", "--action", "dicom.")
    assert res.returncode == 0, res.output
    lines = res.stdout.splitlines()
    header = lines[0]
    for column in ("time (UTC)", "action", "outcome", "who", "details"):
        assert column in header
    rows = lines[1:]
    assert len(rows) == len(expected) >= 5
    for row, record in zip(rows, expected, strict=True):
        assert row.startswith(record["time"][:19])
        assert record["action"] in row
        if record["node"]:
            assert f"{record['node']}@{record['address']}" in row
    empty = cli(vault, "audit", "show", "--node", "NOBODY")
    assert empty.returncode == 0 and empty.stdout == "" and "No matching" in empty.stderr


def _needles(values: list[str]) -> list[bytes]:
    out: list[bytes] = []
    for value in values:
        for encoding in ("ascii", "utf-8", "latin-1", "utf-16-le", "utf-16-be"):
            with contextlib.suppress(UnicodeEncodeError):
                out.append(value.encode(encoding))
    return out


def test_patient_identifiers_are_encrypted_in_the_trail(scenario: Scenario) -> None:
    vault, a, b = scenario.vault, scenario.a, scenario.b
    # reading the trail about these patients puts their IDs in it (sealed), too
    show_json(vault, "--patient", a.patient_id)
    show_json(vault, "--patient", b.patient_id)
    show_json(vault, "--study", a.study_uid)
    values = [*corpus.secrets_of([a, b]), a.study_uid, b.study_uid, a.sop_uid, b.sop_uid]
    needles = _needles(values)
    # the references are there, readable with the key
    assert any(_concerns(e, a) for e in events(vault, "audit.show"))
    hits = []
    for path in (vault.data / "audit").rglob("*"):
        if path.is_file():
            data = path.read_bytes()
            hits += [f"{path.name}: {n!r}" for n in needles if n in data]
    assert not hits, "\n".join(hits)
    assert trail_path(vault).stat().st_size > 0


def test_server_and_cli_append_concurrently(scenario: Scenario, tmp_path: Path) -> None:
    """The server (rejected associations), three CLI processes and in-process threads all
    append at once; the chain is intact and nothing is lost."""
    from pynetdicom import AE as ClientAE
    from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

    vault, server = scenario.vault, scenario.server
    start_seq = len(read_lines(vault))
    attempts, per_thread = 15, 15
    rejected: list[bool] = []

    def intruder() -> None:
        ae = ClientAE(ae_title="INTRUDER")
        ae.add_requested_context(Verification)
        for _ in range(attempts):
            assoc = ae.associate(LOCAL, server.port, ae_title=AE)
            rejected.append(assoc.is_rejected)
            if assoc.is_established:
                assoc.release()

    def writer(name: str) -> None:
        emit(vault, (AuditEvent(action="test.concurrent", outcome=Outcome.SUCCESS,
                                code=EventCode.APPLICATION_ACTIVITY, actor_user=name,
                                detail={"i": i}) for i in range(per_thread)))

    threads = [threading.Thread(target=intruder),
               *(threading.Thread(target=writer, args=(f"t{k}",)) for k in range(2))]
    procs = [subprocess.Popen(
        [sys.executable, "-m", "pacsvault", "node", "add", f"CONC{k}", "--host", LOCAL, "--data",
         str(vault.data), "--key-file", str(vault.key)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE) for k in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    for p in procs:
        _, err = p.communicate(timeout=60)
        assert p.returncode == 0, err
    assert rejected == [True] * attempts
    assert server.alive()

    lines = read_lines(vault)
    bodies = [_body(line) for line in lines]
    assert [b["seq"] for b in bodies] == list(range(1, len(bodies) + 1))
    new = bodies[start_seq:]
    actions = [b["action"] for b in new]
    assert actions.count("dicom.association.rejected") == attempts
    assert actions.count("test.concurrent") == 2 * per_thread
    assert sorted(b["detail"]["node"] for b in new if b["action"] == "node.add") == [
        "CONC0", "CONC1", "CONC2"]
    for name in ("t0", "t1"):  # each writer's records in its own order
        mine = [b["detail"]["i"] for b in new if b["user"] == name]
        assert mine == list(range(per_thread))
    res = vault.cli("audit", "verify", check=False)
    assert res.returncode == 0, res.stdout + res.stderr
    assert f"intact: {len(lines)} records" in res.stdout


# === 5. serve verifies the trail at start =================================================


def _served_vault(blank: VaultDir, dest: Path) -> VaultDir:
    vault = clone(blank, dest)
    v = Vault.open(vault.data, vault.key)
    try:
        v.nodes.add(MODALITY, LOCAL, roles=("store",))
    finally:
        v.close()
    emit(vault, (AuditEvent(action="test.before", outcome=Outcome.SUCCESS,
                            code=EventCode.APPLICATION_ACTIVITY, detail={"n": n})
                 for n in range(5)))
    return vault


def test_serve_records_a_security_alert_when_the_trail_does_not_verify(
    blank: VaultDir, tmp_path: Path
) -> None:
    vault = _served_vault(blank, tmp_path / "v")
    lines = read_lines(vault)
    lines[-1] = change_one_byte(lines[-1], b'"action":"')
    write_lines(vault, lines)
    server = start_server(vault)
    try:
        res = echoscu(server.port, calling=MODALITY)
        assert res.returncode == 0, res.stdout + res.stderr
        assert server.alive()
        alerts = events(vault, "audit.verify")
        assert len(alerts) == 1, alerts
        alert = alerts[0]
        assert alert["outcome"] == "major_failure"
        assert alert["code"] == EventCode.SECURITY_ALERT.value == "110113"
        assert alert["seq"] == 6 and "record 5" in str(alert["message"])
        assert "does not verify" in server.log()
        # the alert is in the trail before the server starts serving
        actions = [e["action"] for e in events(vault)
                   if not str(e["action"]).startswith(("alert.", "dicom.association."))]
        assert actions[-2:] == ["audit.verify", "application.start"]
    finally:
        server.stop()


def test_serve_with_an_intact_trail_records_no_alert(blank: VaultDir, tmp_path: Path) -> None:
    vault = _served_vault(blank, tmp_path / "v")
    server = start_server(vault)
    try:
        assert echoscu(server.port, calling=MODALITY).returncode == 0
    finally:
        server.stop()
    assert events(vault, "audit.verify") == []
    assert "does not verify" not in server.log()
    assert cli(vault, "audit", "verify").returncode == 0


def test_serve_alert_is_recorded_when_the_last_line_is_not_json(
    blank: VaultDir, tmp_path: Path
) -> None:
    vault = _served_vault(blank, tmp_path / "v")
    lines = read_lines(vault)
    assert lines[-1].endswith(b"}")
    lines[-1] = lines[-1][:-1] + b"|"  # flip the closing brace
    write_lines(vault, lines)
    server = start_server(vault)
    try:
        assert echoscu(server.port, calling=MODALITY).returncode == 0
        assert "does not verify" in server.log()
        alerts = events(vault, "audit.verify")
        assert alerts and alerts[0]["outcome"] == "major_failure"
    finally:
        server.stop()
