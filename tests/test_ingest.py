"""Modalities push a varied corpus with dcmtk over plain DICOM and DICOM TLS; export
returns every instance intact; nothing about the patients is readable at rest or in logs."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydicom import dcmread

from tests import corpus
from tests.helpers import Server, VaultDir, echoscu, make_vault, start_server, storescu

pytestmark = pytest.mark.slow
TRAILING_PADDING = 0xFFFCFFFC


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, object]]:
    root = tmp_path_factory.mktemp("ingest")
    vault = make_vault(root / "v")
    vault.add_node("MODALITY")
    vault.add_node("TLSMOD", "--tls")
    vault.add_node("CERTMOD", "--client-cert")
    certs = root / "certs"
    vault.cli("node", "cert", "CERTMOD", "--out", certs)
    server = start_server(vault)
    files = {
        "plain": corpus.build(root / "corpus-plain"),
        "tls-anon": corpus.build(root / "corpus-tls-anon"),
        "tls-cert": corpus.build(root / "corpus-tls-cert"),
    }
    yield {"vault": vault, "server": server, "certs": certs, "files": files, "root": root}
    server.stop()


def _tls_args(env: dict[str, object], with_cert: bool) -> tuple[str, ...]:
    vault: VaultDir = env["vault"]  # type: ignore[assignment]
    certs: Path = env["certs"]  # type: ignore[assignment]
    ca = str(vault.data / "tls" / "ca.crt")
    if with_cert:
        return ("+tls", str(certs / "CERTMOD.key"), str(certs / "CERTMOD.crt"), "-pw", "+cf", ca)
    return ("+tla", "+cf", ca)


def test_echo_plain_and_tls(env: dict[str, object]) -> None:
    server: Server = env["server"]  # type: ignore[assignment]
    assert echoscu(server.port, calling="MODALITY").returncode == 0
    res = echoscu(server.tls_port, calling="CERTMOD", tls=_tls_args(env, True))
    assert res.returncode == 0, res.stderr


@pytest.mark.parametrize(
    ("kind", "port_key", "calling", "with_cert"),
    [
        ("plain", "dicom_port", "MODALITY", None),
        ("tls-anon", "dicom_tls_port", "TLSMOD", False),
        ("tls-cert", "dicom_tls_port", "CERTMOD", True),
    ],
)
def test_storescu_pushes_corpus(
    env: dict[str, object], kind: str, port_key: str, calling: str, with_cert: bool | None
) -> None:
    server: Server = env["server"]  # type: ignore[assignment]
    files: list[corpus.CorpusFile] = env["files"][kind]  # type: ignore[index]
    tls = () if with_cert is None else _tls_args(env, with_cert)
    for f in files:
        res = storescu(server.ports[port_key], [f.path], calling=calling, tls=tls,
                       extra=f.proposal)
        assert res.returncode == 0, f"{f.path.name}: {res.stdout}{res.stderr}"


def test_export_returns_every_instance_identical(env: dict[str, object], tmp_path: Path) -> None:
    vault: VaultDir = env["vault"]  # type: ignore[assignment]
    files: dict[str, list[corpus.CorpusFile]] = env["files"]  # type: ignore[assignment]
    sent = [f for group in files.values() for f in group]
    status = json.loads(vault.cli("status", "--json").stdout)
    assert status["counts"]["instances"] == len(sent)
    out = tmp_path / "export"
    vault.cli("export", "--all", "--out", out)
    exported = {p.stem: p for p in out.rglob("*.dcm")}
    assert len(exported) == len(sent)
    for f in sent:
        original = dcmread(f.path)
        back = dcmread(exported[f.sop_uid])
        assert back.file_meta.TransferSyntaxUID == f.transfer_syntax, f.path.name
        assert back.file_meta.MediaStorageSOPInstanceUID == f.sop_uid
        # storescu drops Data Set Trailing Padding (FFFC,FFFC) when sending, as PS3.5
        # 7.5 allows; everything else must come back exactly.
        if TRAILING_PADDING in original:
            del original[TRAILING_PADDING]
        assert [e.tag for e in back] == [e.tag for e in original], f.path.name
        for elem in original:
            assert back[elem.tag].value == elem.value, f"{f.path.name} {elem.tag}"
        assert back.PixelData == original.PixelData


def test_export_by_study_and_patient(env: dict[str, object], tmp_path: Path) -> None:
    vault: VaultDir = env["vault"]  # type: ignore[assignment]
    some = env["files"]["plain"][3]  # type: ignore[index]
    vault.cli("export", "--study", some.study_uid, "--out", tmp_path / "s")
    assert [p.stem for p in (tmp_path / "s").rglob("*.dcm")] == [some.sop_uid]
    vault.cli("export", "--patient", some.patient_id, "--out", tmp_path / "p")
    same_patient = {
        f.sop_uid for group in env["files"].values()  # type: ignore[attr-defined]
        for f in group if f.patient_id == some.patient_id
    }
    assert len(same_patient) == 3  # one per corpus copy
    assert {p.stem for p in (tmp_path / "p").rglob("*.dcm")} == same_patient
    res = vault.cli("export", "--patient", "NOSUCHPATIENT", "--out", tmp_path / "n", check=False)
    assert res.returncode == 2 and "nothing matches" in res.stderr


def _needles(values: list[str]) -> list[bytes]:
    out: list[bytes] = []
    for v in values:
        for enc in ("utf-8", "latin-1", "utf-16-le", "utf-16-be"):
            with contextlib.suppress(UnicodeEncodeError):
                out.append(v.encode(enc))
    return out


def _scan(root: Path, needles: list[bytes]) -> list[str]:
    hits = []
    for path in root.rglob("*"):
        if path.is_file():
            data = path.read_bytes()
            hits += [f"{path}: {n!r}" for n in needles if n in data]
    return hits


def test_no_patient_data_at_rest_or_in_logs(env: dict[str, object]) -> None:
    vault: VaultDir = env["vault"]  # type: ignore[assignment]
    server: Server = env["server"]  # type: ignore[assignment]
    files: dict[str, list[corpus.CorpusFile]] = env["files"]  # type: ignore[assignment]
    every = [f for group in files.values() for f in group]
    needles = _needles(corpus.secrets_of(every))
    # the scan must be able to find what it looks for: the sent files contain the needles
    assert _scan(every[0].path.parent, needles)
    assert vault.data.is_dir() and server.tmpdir.is_dir()
    hits = []
    for root in (vault.data, vault.key.parent, server.tmpdir):
        hits += _scan(root, needles)
    log = server.log_path.read_bytes()
    hits += [f"server log: {n!r}" for n in needles if n in log]
    assert not hits, "\n".join(hits)
