"""Same-run wire ceilings (issue 17, part 3): what the DICOM wire allows on this machine.

Why: a pacsvault or Orthanc figure alone does not say whether the archive or the wire is
the bound. Each ceiling moves the same files with the same dcmtk client as the rows it is
compared with, one association, into (or out of) a receiver that does no work of its own:

- ``store_dcmtk``: dcmtk ``storescp --ignore`` (receives, discards);
- ``store_pyn_16k`` / ``store_pyn_unlimited``: a bare pynetdicom SCP whose C-STORE handler
  only answers Success, maximum PDU 16 KB (pynetdicom's default) and unlimited (0);
- ``get_pyn_16k`` / ``get_pyn_128k``: a bare pynetdicom C-GET SCP that holds the study's
  files in memory and sends each one's dataset bytes as they are (``dicom/retrieve``'s
  hook, so no pydicom encoding), to ``getscu`` receiving in PDUs of 16 KB (its default, as
  in the C-GET row) and 128 KB (the largest ``getscu`` accepts);
- ``get_dcmtk``: dcmtk's own archive, ``dcmqrscp``, serving the same study by C-GET from its
  storage area (files read from the page cache, warmed by an untimed C-GET) to the same
  ``getscu`` at 16 KB PDUs: what a C++ retrieval path without encryption, authentication or
  audit reaches on this wire (the "gap to dcmtk" the issue reads the pynetdicom rows against);
- ``web_https`` / ``web_http``: a bare Starlette app on uvicorn (the stack pacsvault's web
  server is built on) answering the CT series as a multipart from memory, one part per
  instance, to the same ``httpx`` client as the WADO-RS row, over HTTPS (as pacsvault is
  measured) and plain HTTP (as Orthanc is).

The receivers run in their own processes (``python -m bench.compare.ceilings ...``), like
a server. At ``--small`` size each ceiling costs well under a second of transfer.
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from bench.compare.procs import DCMTK_ENV, Service, dcmtk, free_port, rmtree, wait_port
from bench.ingest import push

ROOT = Path(__file__).resolve().parent.parent.parent
MB = 1e6
CEILING_AE = "CEILING"

STORE = ("store_dcmtk", "store_pyn_16k", "store_pyn_unlimited")
GET = ("get_pyn_16k", "get_pyn_128k", "get_dcmtk")
WEB = ("web_https", "web_http")
LABELS = {
    "store_dcmtk": "dcmtk storescp --ignore (discards)",
    "store_pyn_16k": "bare pynetdicom SCP that discards, max PDU 16 KB",
    "store_pyn_unlimited": "bare pynetdicom SCP that discards, max PDU unlimited",
    "get_pyn_16k": "bare pynetdicom C-GET SCP from memory -> getscu, PDU 16 KB",
    "get_pyn_128k": "bare pynetdicom C-GET SCP from memory -> getscu, PDU 128 KB",
    "get_dcmtk": "dcmtk dcmqrscp C-GET SCP (its storage, page cache) -> getscu, PDU 16 KB",
    "web_https": "bare uvicorn/Starlette multipart from memory, HTTPS (same client)",
    "web_http": "bare uvicorn/Starlette multipart from memory, plain HTTP (same client)",
}
SHORT = {"store_dcmtk": "dcmtk", "store_pyn_16k": "pyn 16K", "store_pyn_unlimited": "pyn ∞",
         "get_pyn_16k": "pyn 16K", "get_pyn_128k": "pyn 128K", "get_dcmtk": "dcmtk",
         "web_https": "HTTPS", "web_http": "HTTP"}
# which ceilings a row is read against: "store" (ingest rows) or "get" (C-GET rows)
KINDS = {"store": STORE, "get": GET, "web": WEB}


def _service(args: list[str], log: Path) -> tuple[Service, int]:
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    svc = Service([sys.executable, "-m", "bench.compare.ceilings", *args, "--port", str(port)],
                  log, env=env)
    wait_port(port, svc.proc, log)
    return svc, port


def _storescp(port: int, log: Path) -> Service:
    # -dhl: no host lookup; --ignore: receive every PDU, store nothing
    svc = Service([dcmtk("storescp"), "-dhl", "--ignore", "-aet", CEILING_AE, "+xa", str(port)],
                  log, env=DCMTK_ENV)
    wait_port(port, svc.proc, log)
    return svc


def _store_once(key: str, files: list[Path], work: Path) -> float:
    logs = work / key
    logs.mkdir(parents=True, exist_ok=True)
    if key == "store_dcmtk":
        port = free_port()
        svc = _storescp(port, logs / "server.log")
    else:
        svc, port = _service(["discard", "--max-pdu",
                              "16384" if key == "store_pyn_16k" else "0"], logs / "server.log")
    try:
        # untimed: a fresh interpreter's first association pays its imports, which a
        # running server (the rows it frames) has paid long before
        push(port, CEILING_AE, files[:1], 1, [], logs)
        secs = push(port, CEILING_AE, files, 1, [], logs)
    finally:
        svc.stop()
    return sum(f.stat().st_size for f in files) / secs / MB


def dcmqrscp(files: list[Path], logs: Path, studies: int = 500) -> tuple[Service, int]:
    """dcmqrscp with one storage area (anyone may store, get, find) holding up to
    ``studies`` studies, filled by storescu (also the ``find_dcmtk`` query ceiling)."""
    area = logs / "area"
    rmtree(area)
    area.mkdir(parents=True)
    port = free_port()
    config = logs / "dcmqrscp.cfg"
    config.write_text(
        f"NetworkTCPPort = {port}\nMaxPDUSize = 16384\nMaxAssociations = 16\n"
        "HostTable BEGIN\nHostTable END\nVendorTable BEGIN\nVendorTable END\n"
        f"AETable BEGIN\n{CEILING_AE} {area} RW ({studies}, 1024mb) ANY\nAETable END\n")
    svc = Service([dcmtk("dcmqrscp"), "-c", str(config), "-dhl"],
                  logs / "server.log", env=DCMTK_ENV)
    wait_port(port, svc.proc, logs / "server.log")
    try:
        push(port, CEILING_AE, files, 1, [], logs)
    except BaseException:
        svc.stop()
        raise
    return svc, port


def _get_once(key: str, files: list[Path], study: str, work: Path) -> float:
    logs = work / key
    out = logs / "received"
    out.mkdir(parents=True, exist_ok=True)
    for old in out.iterdir():
        old.unlink()
    if key == "get_dcmtk":
        svc, port = dcmqrscp(files, logs)
    else:
        listing = logs / "files.txt"
        listing.write_text("\n".join(str(f) for f in files))
        svc, port = _service(["get", "--files", str(listing)], logs / "server.log")
    pdu = "131072" if key == "get_pyn_128k" else "16384"
    cmd = [dcmtk("getscu"), "-S", "-pdu", pdu, "-aet", "BENCHSCU", "-aec", CEILING_AE,
           "-k", "QueryRetrieveLevel=STUDY", "-k", f"StudyInstanceUID={study}",
           "-od", str(out), "127.0.0.1", str(port)]
    try:
        # untimed warm-up (the server process's first C-GET pays its imports)
        subprocess.run(cmd, capture_output=True, env=DCMTK_ENV, timeout=1800, check=False)
        for old in out.iterdir():
            old.unlink()
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True, env=DCMTK_ENV, timeout=1800,
                              check=False)
        secs = time.perf_counter() - t0
    finally:
        svc.stop()
    got = list(out.iterdir())
    if proc.returncode != 0 or len(got) != len(files):
        raise RuntimeError(f"ceiling {key}: getscu rc {proc.returncode}, {len(got)}/"
                           f"{len(files)} files: {proc.stderr[-1500:]}")
    return sum(p.stat().st_size for p in got) / secs / MB


def _web_once(key: str, files: list[Path], work: Path, reps: int) -> list[float]:
    import httpx

    from bench.ingest import make_peer_pki

    logs = work / key
    logs.mkdir(parents=True, exist_ok=True)
    pki = work / "web-pki"
    if not (pki / "ca.crt").exists():
        make_peer_pki(pki)
    listing = logs / "files.txt"
    listing.write_text("\n".join(str(f) for f in files))
    tls = key == "web_https"
    svc, port = _service(["web", "--files", str(listing),
                          *(["--pki", str(pki)] if tls else [])], logs / "server.log")
    url = f"{'https' if tls else 'http'}://127.0.0.1:{port}/series"
    out: list[float] = []
    try:
        with httpx.Client(verify=str(pki / "ca.crt"), trust_env=False, timeout=300) as client:
            for _ in range(reps + 1):  # the first one warms the connection up
                t0 = time.perf_counter()
                with client.stream("GET", url) as res:
                    res.raise_for_status()
                    n = sum(len(c) for c in res.iter_raw(1 << 20))
                out.append(n / (time.perf_counter() - t0) / MB)
    finally:
        svc.stop()
    return out[1:]


def measure(work: Path, store_files: list[Path], get_files: list[Path], study: str,
            rounds: int, web_files: list[Path], web_reps: int = 3) -> dict[str, float]:
    """Median MB/s of each ceiling over ``rounds`` rounds, the receivers alternated."""
    samples: dict[str, list[float]] = {k: [] for k in (*STORE, *GET, *WEB)}
    for r in range(rounds):
        store = STORE if r % 2 == 0 else STORE[::-1]
        for key in store:
            samples[key].append(_store_once(key, store_files, work / "ceilings"))
        for key in (GET if r % 2 == 0 else GET[::-1]):
            samples[key].append(_get_once(key, get_files, study, work / "ceilings"))
        for key in (WEB if r % 2 == 0 else WEB[::-1]):
            samples[key] += _web_once(key, web_files, work / "ceilings", web_reps)
    return {k: float(statistics.median(v)) for k, v in samples.items()}


def markdown(ceilings: dict[str, float]) -> str:
    lines = ["| wire ceiling (same run, one association, same files and client) | MB/s |",
             "|---|---:|"]
    lines += [f"| {LABELS[k]} | {v:.1f} |" for k, v in ceilings.items()]
    return "\n".join(lines)


# --- the receivers (run as ``python -m bench.compare.ceilings discard|get``) ---------------


def _no_delay(event: Any) -> None:
    sock = getattr(event.assoc.dul.socket, "socket", None)
    if sock is not None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def _syntaxes() -> list[str]:
    """Explicit VR Little Endian first: the acceptor takes the first of its own list that
    was proposed, and the files are explicit little endian (sent as they are)."""
    from pydicom.uid import ExplicitVRLittleEndian
    from pynetdicom import ALL_TRANSFER_SYNTAXES

    return [ExplicitVRLittleEndian, *(t for t in ALL_TRANSFER_SYNTAXES
                                      if t != ExplicitVRLittleEndian)]


def serve_discard(port: int, max_pdu: int) -> None:
    from pynetdicom import AE, AllStoragePresentationContexts, evt

    ae = AE(ae_title=CEILING_AE)
    ae.maximum_pdu_size = max_pdu
    for cx in AllStoragePresentationContexts:
        ae.add_supported_context(str(cx.abstract_syntax), _syntaxes())
    ae.start_server(("127.0.0.1", port), block=True, evt_handlers=[
        (evt.EVT_C_STORE, lambda _event: 0x0000), (evt.EVT_CONN_OPEN, _no_delay)])


def serve_get(port: int, listing: Path) -> None:
    from pydicom import dcmread
    from pynetdicom import AE, StoragePresentationContexts, evt
    from pynetdicom.sop_class import (  # type: ignore[attr-defined]
        StudyRootQueryRetrieveInformationModelGet,
    )

    from pacsvault.dicom import retrieve

    retrieve.install()
    studies: dict[str, list[retrieve.Raw]] = {}
    for line in listing.read_text().splitlines():
        data = Path(line).read_bytes()
        found = retrieve.split(data)
        if found is None:
            raise SystemExit(f"not a plain Part 10 file: {line}")
        syntax, offset = found
        ds = dcmread(line, stop_before_pixels=True)
        studies.setdefault(str(ds.StudyInstanceUID), []).append(retrieve.Raw(
            str(ds.SOPClassUID), str(ds.SOPInstanceUID), syntax, data[offset:]))

    def on_get(event: Any) -> Iterator[Any]:
        wanted = str(event.identifier.get("StudyInstanceUID", ""))
        objects = studies.get(wanted, [])
        yield len(objects)
        for raw in objects:
            yield 0xFF00, raw

    ae = AE(ae_title=CEILING_AE)
    ae.add_supported_context(StudyRootQueryRetrieveInformationModelGet)
    for cx in StoragePresentationContexts:
        ae.add_supported_context(str(cx.abstract_syntax), _syntaxes(), scu_role=True,
                                 scp_role=True)
    ae.start_server(("127.0.0.1", port), block=True, evt_handlers=[
        (evt.EVT_C_GET, on_get), (evt.EVT_CONN_OPEN, _no_delay)])


def serve_web(port: int, listing: Path, pki: Path | None) -> None:
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import StreamingResponse
    from starlette.routing import Route

    boundary = "ceiling-boundary"
    parts = [b"".join((f"--{boundary}\r\nContent-Type: application/dicom\r\nContent-Length: "
                       f"{len(data)}\r\n\r\n".encode("ascii"), data, b"\r\n"))
             for data in (Path(line).read_bytes() for line in listing.read_text().splitlines())]

    async def series(_request: Request) -> StreamingResponse:
        async def body() -> Any:
            for part in parts:
                yield part
            yield f"--{boundary}--\r\n".encode("ascii")
        return StreamingResponse(body(), media_type="multipart/related; "
                                 f'type="application/dicom"; boundary={boundary}')

    _run_uvicorn(Starlette(routes=[Route("/series", series)]), port, pki)


def _run_uvicorn(app: Any, port: int, pki: Path | None) -> None:
    import uvicorn

    tls: dict[str, Any] = ({"ssl_keyfile": str(pki / "server.key"),
                            "ssl_certfile": str(pki / "server.crt")} if pki else {})
    uvicorn.run(app, host="127.0.0.1", port=port, log_level="error", access_log=False, **tls)


# (the query ceilings' receivers: ``query_ceilings``)


def serve_find(port: int, answers: Path) -> None:
    from pydicom import Dataset, dcmread
    from pynetdicom import AE, evt
    from pynetdicom.sop_class import (  # type: ignore[attr-defined]
        PatientRootQueryRetrieveInformationModelFind,
        StudyRootQueryRetrieveInformationModelFind,
    )

    # identifiers, not files: the elements without their file meta
    datasets = [Dataset(dcmread(p, force=True)) for p in sorted(answers.iterdir())
                if p.is_file()]

    def on_find(_event: Any) -> Iterator[Any]:
        for ds in datasets:
            yield 0xFF00, ds

    ae = AE(ae_title=CEILING_AE)
    ae.add_supported_context(StudyRootQueryRetrieveInformationModelFind)
    ae.add_supported_context(PatientRootQueryRetrieveInformationModelFind)
    ae.start_server(("127.0.0.1", port), block=True, evt_handlers=[(evt.EVT_C_FIND, on_find)])


def serve_qido(port: int, body_file: Path, pki: Path | None) -> None:
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import Response
    from starlette.routing import Route

    body = body_file.read_bytes()

    async def studies(_request: Request) -> Response:
        return Response(body, media_type="application/dicom+json")

    app = Starlette(routes=[Route("/dicom-web/studies", studies)])
    _run_uvicorn(app, port, pki)


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.compare.ceilings")
    sub = ap.add_subparsers(dest="cmd", required=True)
    d = sub.add_parser("discard")
    d.add_argument("--max-pdu", type=int, default=16384)
    d.add_argument("--port", type=int, required=True)
    g = sub.add_parser("get")
    g.add_argument("--files", type=Path, required=True)
    g.add_argument("--port", type=int, required=True)
    w = sub.add_parser("web")
    w.add_argument("--files", type=Path, required=True)
    w.add_argument("--pki", type=Path)
    w.add_argument("--port", type=int, required=True)
    f = sub.add_parser("find")
    f.add_argument("--answers", type=Path, required=True)
    f.add_argument("--port", type=int, required=True)
    q = sub.add_parser("qido")
    q.add_argument("--body", type=Path, required=True)
    q.add_argument("--pki", type=Path)
    q.add_argument("--port", type=int, required=True)
    args = ap.parse_args(argv)
    if args.cmd == "discard":
        serve_discard(args.port, args.max_pdu)
    elif args.cmd == "get":
        serve_get(args.port, args.files)
    elif args.cmd == "web":
        serve_web(args.port, args.files, args.pki)
    elif args.cmd == "find":
        serve_find(args.port, args.answers)
    else:
        serve_qido(args.port, args.body, args.pki)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
