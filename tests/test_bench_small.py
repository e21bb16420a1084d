"""``python -m bench compare --small`` end to end, as CI runs it.

Both servers (pacsvault and Debian's Orthanc), every workload, on 127.0.0.1 only. The test
asserts that every workload produced a figure for both servers and that what came back equals
what was sent: the bench's own checks, and an independent comparison of the retrieved copies
(WADO-RS series, C-GET, WADO-RS frames) with the generated files. It never asserts a speed.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from pydicom import dcmread

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
SERVERS = ("pacsvault", "orthanc")
WORKLOADS = [
    "ingest plain, 1 assoc.", "ingest plain, 4 assoc.", "ingest TLS, 1 assoc.",
    "ingest TLS, 4 assoc.", "peak RSS, ingest plain, 1 assoc.", "peak RSS, ingest TLS, 4 assoc.",
    "disk footprint", "C-FIND (findscu) name prefix", "C-FIND (findscu) date range",
    "QIDO-RS /studies name prefix", "QIDO-RS /studies date range", "WADO-RS series",
    "WADO-RS single frame (CT", "WADO-RS single frame (CR", "C-GET study",
    "C-MOVE study", "ingest index filler",
]


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if shutil.which("Orthanc") is None or not Path("/usr/bin/getscu").exists():
        pytest.skip("needs Debian's orthanc, orthanc-dicomweb and dcmtk (scripts/install.sh)")
    out = tmp_path_factory.mktemp("bench") / "out"
    proc = subprocess.run(
        [sys.executable, "-m", "bench", "compare", "--small", "--out", str(out), "--keep-data"],
        cwd=ROOT, capture_output=True, text=True, timeout=900, stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    assert "| workload | metric | pacsvault | Orthanc |" in proc.stdout
    return out


def _rows(out: Path) -> list[dict[str, object]]:
    rows: list[dict[str, object]] = json.loads((out / "results.json").read_text())["rows"]
    return rows


@pytest.mark.timeout(900)
def test_every_workload_has_a_figure_for_both_servers(run: Path) -> None:
    rows = _rows(run)
    names = [str(r["workload"]) for r in rows]
    for w in WORKLOADS:
        assert any(n.startswith(w) for n in names), f"no row for {w}"
    # queries with the dataset loaded and again with the large index (200 studies in --small)
    assert sum(n.startswith("QIDO-RS") for n in names) == 8
    assert sum(n.startswith("C-FIND") for n in names) == 8
    for r in rows:
        for s in SERVERS:
            fig = r[s]
            assert isinstance(fig, dict)
            assert fig["value"] is not None and fig["value"] > 0, (r["workload"], r["metric"], s)
        assert r["ratio"] is not None
    md = (run / "results.md").read_text()
    assert "physical limit" in md and "loopback TCP" in md
    # issue 17: the embedded rows run the product's default (``serve --workers auto``),
    # named in the run description, with the one-process contrast row beside them
    workers = json.loads((run / "results.json").read_text())["pv_workers"]
    assert workers["option"] == "auto" and workers["processes"] >= 1
    assert "serve --workers auto" in md
    if workers["processes"] > 1:
        assert "ingest plain, 4 assoc., serve --workers 1" in names


@pytest.mark.timeout(900)
def test_every_query_row_has_its_stack_ceilings(run: Path) -> None:
    """Issue 17: each C-FIND / QIDO-RS row is read against pacsvault's own answer sent by a
    bare pynetdicom / uvicorn stack to the same client (``query_ceilings``)."""
    rows = [r for r in _rows(run) if str(r["workload"]).startswith(("C-FIND", "QIDO-RS"))]
    assert len(rows) == 16
    for r in rows:
        ceilings = r["ceilings"]
        assert isinstance(ceilings, dict)
        want = {"find_pyn", "find_dcmtk"} if str(r["workload"]).startswith("C-FIND") \
            else {"qido_https", "qido_http"}
        assert set(ceilings) == want, r["workload"]
        for c in ceilings.values():
            assert c["value"] is not None and c["value"] > 0
        for s in SERVERS:
            shares = r[s]["fraction_of_ceilings"]  # type: ignore[index]
            assert set(shares) == want and all(v > 0 for v in shares.values())
    assert "% HTTPS" in (run / "results.md").read_text()


@pytest.mark.timeout(900)
def test_bench_checks_passed_for_both_servers(run: Path) -> None:
    checked = [r for r in _rows(run) if r["checks"]]
    kinds = {str(r["workload"]).split(" (")[0].split(",")[0] for r in checked}
    assert {"WADO-RS series", "WADO-RS single frame", "C-GET study", "C-MOVE study"} <= kinds
    assert any(str(r["workload"]).startswith("QIDO-RS") for r in checked)
    assert any(str(r["workload"]).startswith("C-FIND") for r in checked)
    for r in checked:
        checks = r["checks"]
        assert isinstance(checks, dict)
        for s in SERVERS:
            assert str(checks.get(s, "")).startswith("ok"), (r["workload"], s, checks.get(s))


@pytest.mark.timeout(900)
def test_retrieved_copies_equal_the_generated_files(run: Path) -> None:
    data = run / "data"
    manifest = json.loads((data / "dataset" / "manifest.json").read_text())
    ct = [i for i in manifest["main"] if i["kind"] == "CT"]
    cr = [i for i in manifest["main"] if i["kind"] == "CR"]
    by_sop = {i["sop"]: i for i in manifest["main"]}
    series = {i["sop"] for i in ct if i["series"] == ct[0]["series"]}
    study = {i["sop"] for i in ct if i["study"] == ct[0]["study"]}

    def pixels(sop: str) -> bytes:
        return bytes(dcmread(data / "dataset" / by_sop[sop]["path"]).PixelData)

    for s in SERVERS:
        got = data / "retrieved" / s
        for what, want in (("wado", series), ("cget", study), ("cmove", study)):
            files = sorted((got / what).iterdir())
            assert len(files) == len(want), (s, what)
            back = {str(ds.SOPInstanceUID): ds for ds in map(dcmread, files)}
            assert set(back) == want, (s, what)
            for sop, ds in back.items():
                assert bytes(ds.PixelData) == pixels(sop), (s, what)
                assert str(ds.StudyInstanceUID) == by_sop[sop]["study"]
        for kind, items in (("CT", ct), ("CR", cr)):
            frames = sorted((got / f"frames-{kind}").iterdir())
            assert frames, (s, kind)
            for f in frames:
                sop = f.name.removesuffix(".raw")
                assert sop in {i["sop"] for i in items}
                assert f.read_bytes() == pixels(sop), (s, kind, sop)


@pytest.mark.timeout(900)
def test_wire_ceilings_measured_and_rows_read_against_them(run: Path) -> None:
    """Issue 17, part 3: the same-run ceilings (dcmtk storescp --ignore, bare pynetdicom
    SCPs that discard at 16 KB and unlimited PDUs, a bare pynetdicom C-GET SCP at 16 and
    128 KB, dcmtk's dcmqrscp C-GET and C-MOVE SCP at 16 KB, a bare uvicorn multipart over
    HTTPS and HTTP) have figures, and the ingest, C-GET, C-MOVE and WADO-RS series rows carry
    both servers' shares."""
    result = json.loads((run / "results.json").read_text())
    ceilings = result["ceilings"]
    shaped = {f"store_{s}_{r}" for s in ("plain4", "tls1", "tls4", "fill4")
              for r in ("dcmtk", "pyn_16k", "pyn_unlimited")}  # each ingest row's own shape
    assert set(ceilings) == {"store_dcmtk", "store_pyn_16k", "store_pyn_unlimited",
                             "get_pyn_16k", "get_pyn_128k", "get_dcmtk", "move_dcmtk",
                             "web_https", "web_http", *shaped}
    assert all(v > 0 for v in ceilings.values())
    shared = [r for r in result["rows"] if r["pacsvault"].get("fraction_of_ceilings")]
    names = [str(r["workload"]) for r in shared]
    assert any(n.startswith("ingest plain, 1 assoc.") for n in names)
    for r in shared:  # an ingest row read against the ceilings of its own shape only
        if str(r["workload"]).startswith(("ingest TLS, 4", "ingest index filler")):
            assert {k.split("_")[1] for k in r["pacsvault"]["fraction_of_ceilings"]} == (
                {"tls4"} if "TLS" in str(r["workload"]) else {"fill4"})
    assert any(n.startswith("C-GET study") for n in names)
    assert any(n.startswith("C-MOVE study") for n in names)
    assert any(n.startswith("WADO-RS series") for n in names)
    for r in shared:
        assert r["orthanc"]["fraction_of_ceilings"]
    md = (run / "results.md").read_text()
    assert "wire ceiling" in md and "% of wire ceilings" in md
