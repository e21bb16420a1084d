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
- ``move_dcmtk``: the same ``dcmqrscp`` moving the study by C-MOVE (``movescu``) to a dcmtk
  ``storescp`` workstation, as the C-MOVE row is fed (``workloads.cmove``);
- ``web_https`` / ``web_http``: a bare Starlette app on uvicorn (the stack pacsvault's web
  server is built on) answering the CT series as a multipart from memory, one part per
  instance, to the same ``httpx`` client as the WADO-RS row, over HTTPS (as pacsvault is
  measured) and plain HTTP (as Orthanc is).

The ``store_*`` ceilings above have the shape of the "ingest plain, 1 assoc." row. Every
other ingest row is read against ceilings of its own shape (``SHAPES``; issue 17's "Done
when" reads a row against the ceiling rows), the same three receivers fed exactly as that
row is fed (``bench.ingest.push``: the same ``storescu`` clients, every n-th file to each of
n associations): ``store_plain4_*`` (4 associations, the main files), ``store_tls1_*`` /
``store_tls4_*`` (mutual TLS with the same ``storescu`` options as the TLS rows, the bench's
own PKI that the Orthanc TLS rows use; dcmtk ``storescp`` does TLS in this build) and
``store_fill4_*`` (the index filler's one-instance 64x64 MR studies, 4 associations). dcmtk
runs with ``--fork`` there (one process per association, as it would serve 4 clients).

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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.compare.procs import DCMTK_ENV, Service, dcmtk, free_port, rmtree, wait_port
from bench.ingest import push, tls_args

ROOT = Path(__file__).resolve().parent.parent.parent
MB = 1e6
CEILING_AE = "CEILING"

STORE = ("store_dcmtk", "store_pyn_16k", "store_pyn_unlimited")
GET = ("get_pyn_16k", "get_pyn_128k", "get_dcmtk")
MOVE = ("move_dcmtk",)
WEB = ("web_https", "web_http")
LABELS = {
    "store_dcmtk": "dcmtk storescp --ignore (discards)",
    "store_pyn_16k": "bare pynetdicom SCP that discards, max PDU 16 KB",
    "store_pyn_unlimited": "bare pynetdicom SCP that discards, max PDU unlimited",
    "get_pyn_16k": "bare pynetdicom C-GET SCP from memory -> getscu, PDU 16 KB",
    "get_pyn_128k": "bare pynetdicom C-GET SCP from memory -> getscu, PDU 128 KB",
    "get_dcmtk": "dcmtk dcmqrscp C-GET SCP (its storage, page cache) -> getscu, PDU 16 KB",
    "move_dcmtk": "dcmtk dcmqrscp C-MOVE SCP (its storage, page cache) -> storescp, "
                  "PDU 16 KB",
    "web_https": "bare uvicorn/Starlette multipart from memory, HTTPS (same client)",
    "web_http": "bare uvicorn/Starlette multipart from memory, plain HTTP (same client)",
}
SHORT = {"store_dcmtk": "dcmtk", "store_pyn_16k": "pyn 16K", "store_pyn_unlimited": "pyn ∞",
         "get_pyn_16k": "pyn 16K", "get_pyn_128k": "pyn 128K", "get_dcmtk": "dcmtk",
         "move_dcmtk": "dcmtk",
         "web_https": "HTTPS", "web_http": "HTTP"}
# which ceilings a row is read against: "store" (ingest rows), "get" (C-GET), "move"
KINDS = {"store": STORE, "get": GET, "move": MOVE, "web": WEB}


@dataclass(frozen=True)
class Shape:
    """How an ingest row feeds its receiver: the ceilings of that row are fed the same way."""

    tls: bool
    assocs: int
    files: str  # "main" (the ingest cells' files) or "filler" (the index filler's)
    label: str  # the ceiling table's "shape" column
    tag: str  # after the receiver's short name in a row's share column


SHAPES = {
    "store": Shape(False, 1, "main", "plain, 1 assoc., the ingest cells' files", ""),
    "store_plain4": Shape(False, 4, "main", "plain, 4 assoc. (every 4th file each), the ingest "
                          "cells' files", "×4"),
    "store_tls1": Shape(True, 1, "main", "mutual TLS, 1 assoc., the ingest cells' files",
                        "TLS"),
    "store_tls4": Shape(True, 4, "main", "mutual TLS, 4 assoc. (every 4th file each), the "
                        "ingest cells' files", "TLS ×4"),
    "store_fill4": Shape(False, 4, "filler", "plain, 4 assoc., the index filler's one-instance "
                         "64x64 MR studies", "filler ×4"),
}
RECEIVERS = ("dcmtk", "pyn_16k", "pyn_unlimited")
_RECEIVER_LABELS = {"dcmtk": "dcmtk storescp --ignore --fork (discards)",
                    "pyn_16k": LABELS["store_pyn_16k"],
                    "pyn_unlimited": LABELS["store_pyn_unlimited"]}


def store_key(shape: str, receiver: str) -> str:
    """``store_dcmtk`` for the one-association plain shape (its key before shapes existed),
    else ``<shape>_<receiver>`` (``store_tls4_pyn_16k``)."""
    return f"store_{receiver}" if shape == "store" else f"{shape}_{receiver}"


SHAPED = tuple(store_key(s, r) for s in SHAPES if s != "store" for r in RECEIVERS)
for _shape, _s in SHAPES.items():
    if _shape != "store":
        KINDS[_shape] = tuple(store_key(_shape, r) for r in RECEIVERS)
        for _r in RECEIVERS:
            LABELS[store_key(_shape, _r)] = _RECEIVER_LABELS[_r]
            SHORT[store_key(_shape, _r)] = f"{SHORT[store_key('store', _r)]} {_s.tag}"
SHAPE_OF = {store_key(s, r): s for s in SHAPES for r in RECEIVERS}
OTHER_SHAPES = {**dict.fromkeys(GET, "C-GET of the CT study, 1 assoc., plain"),
                **dict.fromkeys(MOVE, "C-MOVE of the CT study to a storescp, plain"),
                **dict.fromkeys(WEB, "the CT series as one multipart, 1 connection")}


def shape_label(key: str) -> str:
    """What a ceiling's figure is the shape of (the ceiling table's "shape" column)."""
    return SHAPES[SHAPE_OF[key]].label if key in SHAPE_OF else OTHER_SHAPES[key]


def kind(tls: bool, assocs: int) -> str:
    """The ``KINDS`` key of an ingest cell of the main files (``Row.ceiling``)."""
    return next(s for s, sh in SHAPES.items()
                if sh.files == "main" and sh.tls == tls and sh.assocs == assocs)


def images_per_s(ceilings: dict[str, float],
                 sets: dict[str, tuple[int, int]]) -> dict[str, float]:
    """Each store ceiling in images/s: ``sets`` maps "main"/"filler" to (files, bytes)."""
    out = {}
    for k, v in ceilings.items():
        if (shape := SHAPE_OF.get(k)) and (fed := sets.get(SHAPES[shape].files)):
            count, size = fed
            out[k] = v * count / (size / MB)
    return out


def _service(args: list[str], log: Path) -> tuple[Service, int]:
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    svc = Service([sys.executable, "-m", "bench.compare.ceilings", *args, "--port", str(port)],
                  log, env=env)
    wait_port(port, svc.proc, log)
    return svc, port


def _storescp(port: int, log: Path, extra: tuple[str, ...] = ()) -> Service:
    # -dhl: no host lookup; --ignore: receive every PDU, store nothing
    svc = Service([dcmtk("storescp"), "-dhl", "--ignore", "-aet", CEILING_AE, "+xa", *extra,
                   str(port)], log, env=DCMTK_ENV)
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


def _shapes_once(receiver: str, tls: bool, shapes: list[str], files: dict[str, list[Path]],
                 work: Path, pki: Path) -> dict[str, float]:
    """One receiver process (plain or TLS), fed each of ``shapes`` in turn: MB/s of each."""
    logs = work / f"{receiver}-{'tls' if tls else 'plain'}"
    logs.mkdir(parents=True, exist_ok=True)
    cli_tls = tls_args(pki / "client.key", pki / "client.crt", pki / "ca.crt") if tls else []
    if receiver == "dcmtk":
        port = free_port()
        srv_tls = (tls_args(pki / "server.key", pki / "server.crt", pki / "ca.crt")
                   if tls else [])
        svc = _storescp(port, logs / "server.log", ("--fork", *srv_tls))
    else:
        svc, port = _service(["discard", "--max-pdu", "16384" if receiver == "pyn_16k" else "0",
                              *(["--pki", str(pki)] if tls else [])], logs / "server.log")
    out: dict[str, float] = {}
    try:
        push(port, CEILING_AE, files["main"][:1], 1, cli_tls, logs)  # untimed: imports
        for shape in shapes:
            sh = SHAPES[shape]
            sent = files[sh.files]
            secs = push(port, CEILING_AE, sent, sh.assocs, cli_tls, logs)
            out[store_key(shape, receiver)] = sum(f.stat().st_size for f in sent) / secs / MB
    finally:
        svc.stop()
    return out


def measure_shapes(work: Path, main_files: list[Path], filler_files: list[Path], rounds: int,
                   pki: Path) -> dict[str, float]:
    """Median MB/s of the ceilings of every ingest shape but the first (``SHAPED``) over
    ``rounds`` rounds, the receivers alternated per round as in ``measure``. One receiver
    process per transport and round runs its shapes one after the other (a pynetdicom
    process takes about a second to start). ``pki``: ``bench.ingest.make_peer_pki``'s."""
    files = {"main": main_files, "filler": filler_files}
    samples: dict[str, list[float]] = {k: [] for k in SHAPED}
    for r in range(rounds):
        for receiver in (RECEIVERS if r % 2 == 0 else RECEIVERS[::-1]):
            for tls in (False, True):
                shapes = [s for s, sh in SHAPES.items()
                          if s != "store" and sh.tls == tls and files[sh.files]]
                got = _shapes_once(receiver, tls, shapes, files, work / "ceilings", pki)
                for k, v in got.items():
                    samples[k].append(v)
    return {k: float(statistics.median(v)) for k, v in samples.items() if v}


def dcmqrscp(files: list[Path], logs: Path, studies: int = 500,
             move_to: int = 0) -> tuple[Service, int]:
    """dcmqrscp with one storage area (anyone may store, get, find) holding up to
    ``studies`` studies, filled by storescu (also the ``find_dcmtk`` query ceiling);
    ``move_to``: the port of ``BENCHSCU`` on 127.0.0.1 as its C-MOVE destination."""
    area = logs / "area"
    rmtree(area)
    area.mkdir(parents=True)
    port = free_port()
    config = logs / "dcmqrscp.cfg"
    config.write_text(
        f"NetworkTCPPort = {port}\nMaxPDUSize = 16384\nMaxAssociations = 16\n"
        "HostTable BEGIN\n"
        + (f"benchscu = (BENCHSCU, 127.0.0.1, {move_to})\n" if move_to else "")
        + "HostTable END\nVendorTable BEGIN\nVendorTable END\n"
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


def _move_once(files: list[Path], study: str, work: Path) -> float:
    """``dcmqrscp`` moves the study to a ``storescp`` workstation (``workloads.cmove``)."""
    from bench.compare.workloads import MoveFrom, cmove

    logs = work / "move_dcmtk"
    logs.mkdir(parents=True, exist_ok=True)
    dest = free_port()
    svc, port = dcmqrscp(files, logs, move_to=dest)
    try:
        source = MoveFrom(CEILING_AE, port)
        cmove(source, study, logs / "received", dest)  # untimed warm-up (page cache)
        got = cmove(source, study, logs / "received", dest)
    finally:
        svc.stop()
    received = len(list((logs / "received").iterdir()))
    if received != len(files):
        raise RuntimeError(f"ceiling move_dcmtk: {received}/{len(files)} files")
    return got.nbytes / got.seconds / MB


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
    samples: dict[str, list[float]] = {k: [] for k in (*STORE, *GET, *MOVE, *WEB)}
    for r in range(rounds):
        store = STORE if r % 2 == 0 else STORE[::-1]
        for key in store:
            samples[key].append(_store_once(key, store_files, work / "ceilings"))
        for key in (GET if r % 2 == 0 else GET[::-1]):
            samples[key].append(_get_once(key, get_files, study, work / "ceilings"))
        samples["move_dcmtk"].append(_move_once(get_files, study, work / "ceilings"))
        for key in (WEB if r % 2 == 0 else WEB[::-1]):
            samples[key] += _web_once(key, web_files, work / "ceilings", web_reps)
    return {k: float(statistics.median(v)) for k, v in samples.items()}


def markdown(ceilings: dict[str, float], images: dict[str, float] | None = None) -> str:
    """The ceiling table; ``images``: the store ceilings in images/s (``images_per_s``)."""
    per = images or {}
    lines = ["| wire ceiling (same run, same files, client and split as the rows it frames) "
             "| shape | MB/s | images/s |", "|---|---|---:|---:|"]
    lines += [f"| {LABELS[k]} | {shape_label(k)} | {v:.1f} | "
              f"{f'{per[k]:.0f}' if k in per else ''} |" for k, v in ceilings.items()]
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


def serve_discard(port: int, max_pdu: int, pki: Path | None = None) -> None:
    """``pki``: behind mutual TLS (TLS 1.2+, a client certificate from the CA required, as
    dcmtk ``storescp +tls`` and pacsvault's ``--client-cert`` nodes require)."""
    import ssl

    from pynetdicom import AE, AllStoragePresentationContexts, evt

    ctx = None
    if pki is not None:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ctx.load_cert_chain(pki / "server.crt", pki / "server.key")
        ctx.load_verify_locations(cafile=str(pki / "ca.crt"))
        ctx.verify_mode = ssl.CERT_REQUIRED
    ae = AE(ae_title=CEILING_AE)
    ae.maximum_pdu_size = max_pdu
    for cx in AllStoragePresentationContexts:
        ae.add_supported_context(str(cx.abstract_syntax), _syntaxes())
    ae.start_server(("127.0.0.1", port), block=True, ssl_context=ctx, evt_handlers=[
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
    d.add_argument("--pki", type=Path)
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
        serve_discard(args.port, args.max_pdu, args.pki)
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
