"""Same-run ceilings for the query rows (issue 17): what the stack alone answers in.

Why: a C-FIND or QIDO-RS latency alone does not say how much of it is the archive's work
(matching, the audit record made durable, authorisation) and how much is the protocol stack
a Python server is built on. Each query row of ``bench compare`` is read here against a
receiver that does no work of its own and sends **pacsvault's own answer** to the same
query, taken from memory, to the same client:

- ``find_pyn``: a bare pynetdicom C-FIND SCP (no authorisation, no index, no record) that
  yields the answer datasets pacsvault's last ``findscu`` run wrote (``-X``), to ``findscu``
  as in the row (a new process and association per query, as the row measures);
- ``find_dcmtk``: dcmtk's own archive, ``dcmqrscp``, holding the same studies (stored into
  it by ``storescu`` before the queries), answering the same ``findscu`` from its own index:
  a C++ query path without encryption, authentication or audit (the "gap to dcmtk" a row
  bound by pynetdicom is read against; its answers come from its index, not pacsvault's);
- ``qido_https`` / ``qido_http``: a bare Starlette app on uvicorn that returns the JSON body
  pacsvault answered, to the same ``httpx`` client settings as the row, over HTTPS (as
  pacsvault is measured) and plain HTTP (as Orthanc is).

The figure of a row is a latency (lower is better), so its share of a ceiling is the
ceiling's latency over the server's: 50 % = twice as long as the bare stack takes. The
receivers run in their own processes like the other ceilings' (``python -m
bench.compare.ceilings find|qido``).
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import httpx

from bench.compare.base import Target
from bench.compare.ceilings import CEILING_AE, _service
from bench.compare.procs import Service

FIND = ("find_pyn", "find_dcmtk")
QIDO = ("qido_https", "qido_http")
LABELS = {
    "find_pyn": "bare pynetdicom C-FIND SCP, pacsvault's answers from memory (same findscu)",
    "find_dcmtk": "dcmtk dcmqrscp holding the same studies, its own index (same findscu)",
    "qido_https": "bare uvicorn/Starlette, pacsvault's QIDO-RS body from memory, HTTPS",
    "qido_http": "bare uvicorn/Starlette, pacsvault's QIDO-RS body from memory, plain HTTP",
}
SHORT = {"find_pyn": "pyn", "find_dcmtk": "dcmtk", "qido_https": "HTTPS", "qido_http": "HTTP"}


class Bare(Target):
    """A ceiling receiver seen through ``workloads.findscu`` / ``workloads.qido``."""

    name = "ceiling"
    called_ae = CEILING_AE

    def __init__(self, root: Path, service: Service, port: int, *, http: str = "",
                 ca: Path | None = None) -> None:
        super().__init__(root, False)
        self.service = service
        self.dicom_port = self.https_port = port
        self._http, self._ca = http, ca

    def start(self) -> None:  # started by ``_start``
        pass

    @property
    def scu_tls(self) -> list[str]:
        return []

    @property
    def storage_dir(self) -> Path:
        return self.root

    @property
    def dicomweb_url(self) -> str:
        return f"{self._http}://127.0.0.1:{self.https_port}/dicom-web"

    @property
    def ca_file(self) -> Path:
        assert self._ca is not None
        return self._ca

    @property
    def http_headers(self) -> dict[str, str]:
        return {}


class DcmtkArchive:
    """``dcmqrscp`` holding ``files`` (stored by ``storescu``) for the ``find_dcmtk``
    ceiling of every query row of one index size; a context manager. dcmqrscp holds at
    most ``MAX_STUDIES`` studies per storage area (it lowers a larger setting to that,
    and aborted past it here), so the 10,000-study rows have no dcmtk ceiling."""

    MAX_STUDIES = 500

    def __init__(self, work: Path, files: list[Path]) -> None:
        self.work, self.files = work, files
        self.target: Bare | None = None

    def __enter__(self) -> DcmtkArchive:
        from bench.compare.ceilings import dcmqrscp

        self.work.mkdir(parents=True, exist_ok=True)
        svc, port = dcmqrscp(self.files, self.work, studies=len(self.files) + 16)
        self.target = Bare(self.work, svc, port)
        return self

    def __exit__(self, *_exc: object) -> None:
        if self.target is not None:
            self.target.stop()


def measure(work: Path, answers: Path, body: bytes, filters: dict[str, str], reps: int,
            warm: int, archive: DcmtkArchive | None = None) -> dict[str, list[float]]:
    """Latencies (ms) of each ceiling for ``filters``, ``warm`` untimed requests first;
    the receivers are asked in turn, one request each per round, like the row
    (``find_dcmtk`` only with an ``archive``)."""
    from bench.compare.workloads import findscu, qido
    from bench.ingest import make_peer_pki

    work.mkdir(parents=True, exist_ok=True)
    kept = work / "answers"
    shutil.rmtree(kept, ignore_errors=True)
    shutil.copytree(answers, kept)
    (work / "body.json").write_bytes(body)
    answered = sum(1 for p in kept.iterdir() if p.is_file())
    pki = work.parent / "query-ceiling-pki"
    if not (pki / "ca.crt").exists():
        make_peer_pki(pki)
    dcmtk = archive.target if archive is not None else None
    out: dict[str, list[float]] = {k: [] for k in (*FIND, *QIDO)
                                   if k != "find_dcmtk" or dcmtk is not None}
    started: list[Service] = []
    try:
        svc, port = _service(["find", "--answers", str(kept)], work / "find.log")
        started.append(svc)
        targets: dict[str, Bare] = {"find_pyn": Bare(work / "find", svc, port)}
        if dcmtk is not None:
            targets["find_dcmtk"] = dcmtk
        for key, scheme in (("qido_https", "https"), ("qido_http", "http")):
            svc, port = _service(["qido", "--body", str(work / "body.json"),
                                *(["--pki", str(pki)] if scheme == "https" else [])],
                               work / f"{key}.log")
            started.append(svc)
            targets[key] = Bare(work / key, svc, port, http=scheme, ca=pki / "ca.crt")
        clients = {k: httpx.Client(verify=str(pki / "ca.crt"), trust_env=False, timeout=60)
                   for k in QIDO}
        try:
            for rep in range(warm + reps):
                timed: dict[str, float] = {}
                for key in FIND:
                    if key in targets:
                        timed[key], got = findscu(targets[key], filters, work / "findscu-out")
                        if got != answered and rep == 0:  # its own index: said, not fatal
                            print(f"query ceiling {key}: {got} answers, pacsvault {answered}",
                                  file=sys.stderr)
                for key in QIDO:
                    timed[key], _ = qido(clients[key], targets[key], filters)
                if rep >= warm:
                    for key, value in timed.items():
                        out[key].append(value * 1000)
        finally:
            for client in clients.values():
                client.close()
    finally:
        for svc in started:
            svc.stop()
    return out
