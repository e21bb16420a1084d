"""The workloads, identical for both servers: each returns raw measurements, never a verdict."""

from __future__ import annotations

import re
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import psutil

from bench.compare.base import SCU_AE, Target
from bench.compare.procs import DCMTK_ENV, RssSampler, Service, dcmtk, wait_port
from bench.ingest import push

RETURN_KEYS = ["PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate",
               "StudyTime", "AccessionNumber", "StudyID", "StudyDescription",
               "ReferringPhysicianName", "ModalitiesInStudy", "NumberOfStudyRelatedSeries",
               "NumberOfStudyRelatedInstances"]
SERIES_ACCEPT = 'multipart/related; type="application/dicom"; transfer-syntax=*'
FRAME_ACCEPT = 'multipart/related; type="application/octet-stream"'


@dataclass
class Ingest:
    seconds: float
    rss_peak: int
    footprint: tuple[int, int] = (0, 0)
    pss_peak: int = 0  # the tree's peak PSS sum (``procs.pss_bytes``), 0 if unknown


def ingest(target: Target, files: list[Path], nassoc: int, logs: Path) -> Ingest:
    """storescu ``files`` over ``nassoc`` associations; wall time incl. process start."""
    logs.mkdir(parents=True, exist_ok=True)
    with RssSampler(target.pid) as rss:
        secs = push(target.dicom_port, target.called_ae, files, nassoc, target.scu_tls, logs)
    return Ingest(secs, rss.peak, pss_peak=rss.pss_peak)


def findscu(target: Target, filters: dict[str, str], out: Path) -> tuple[float, int]:
    """One STUDY-level C-FIND with dcmtk findscu (one process, one association)."""
    out.mkdir(parents=True, exist_ok=True)
    for old in out.iterdir():
        old.unlink()
    keys = ["-k", "QueryRetrieveLevel=STUDY", "-k", "StudyInstanceUID"]
    for k in RETURN_KEYS:
        keys += ["-k", f"{k}={filters[k]}" if k in filters else k]
    cmd = [dcmtk("findscu"), "-S", "-aet", SCU_AE, "-aec", target.called_ae, *target.scu_tls,
           *keys, "-X", "-od", str(out), "127.0.0.1", str(target.dicom_port)]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=DCMTK_ENV, timeout=120,
                          check=False)
    secs = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"findscu to {target.name} rc {proc.returncode}: {proc.stderr[-1500:]}")
    return secs, sum(1 for _ in out.iterdir())


def http_client(target: Target) -> httpx.Client:
    return httpx.Client(headers=target.http_headers, verify=str(target.ca_file),
                        trust_env=False, timeout=300)


def qido(client: httpx.Client, target: Target, filters: dict[str, str]) -> tuple[float, int]:
    """QIDO-RS /studies with the same filters. The query string is written by hand: httpx
    would percent-encode ``*`` (``%2A``), which Orthanc 1.10 then matches literally."""
    t0 = time.perf_counter()
    res = client.get(_qido_url(target, filters), headers={"Accept": "application/dicom+json"})
    secs = time.perf_counter() - t0
    if res.status_code == 204:
        return secs, 0
    res.raise_for_status()
    return secs, len(res.json())


def qido_body(client: httpx.Client, target: Target, filters: dict[str, str]) -> bytes:
    """The body of ``target``'s QIDO-RS answer to ``filters`` (for ``query_ceilings``)."""
    res = client.get(_qido_url(target, filters), headers={"Accept": "application/dicom+json"})
    res.raise_for_status()
    return res.content


def _qido_url(target: Target, filters: dict[str, str]) -> str:
    query = "&".join(f"{k}={v}" for k, v in filters.items())
    return f"{target.dicomweb_url}/studies?{query}"


def split_multipart(content_type: str, body: bytes) -> list[bytes]:
    m = re.search(r'boundary="?([^";]+)"?', content_type)
    if not m:
        raise ValueError(f"not multipart: {content_type}")
    delim = b"--" + m.group(1).encode()
    parts = []
    for chunk in body.split(delim)[1:]:
        if chunk.startswith(b"--"):
            break
        _head, sep, payload = chunk.partition(b"\r\n\r\n")
        if not sep:
            continue
        parts.append(payload[:-2] if payload.endswith(b"\r\n") else payload)
    return parts


@dataclass
class Retrieved:
    seconds: float
    nbytes: int  # bytes on the wire (HTTP body) or written by getscu
    parts: list[bytes] = field(default_factory=list)


def wado(client: httpx.Client, target: Target, path: str, accept: str,
         keep: bool) -> Retrieved:
    """GET a WADO-RS multipart resource; ``keep`` returns its parts for checking."""
    url = f"{target.dicomweb_url}/{path}"
    t0 = time.perf_counter()
    with client.stream("GET", url, headers={"Accept": accept}) as res:
        res.raise_for_status()
        ctype = res.headers.get("content-type", "")
        if keep:
            body = res.read()
            n = len(body)
        else:
            n = sum(len(c) for c in res.iter_raw(1 << 20))
    secs = time.perf_counter() - t0
    return Retrieved(secs, n, split_multipart(ctype, body) if keep else [])


def cget(target: Target, study: str, out: Path) -> Retrieved:
    """C-GET of one study with dcmtk getscu (plain: Debian's getscu has no TLS)."""
    out.mkdir(parents=True, exist_ok=True)
    for old in out.iterdir():
        old.unlink()
    cmd = [dcmtk("getscu"), "-S", "-aet", SCU_AE, "-aec", target.called_ae,
           "-k", "QueryRetrieveLevel=STUDY", "-k", f"StudyInstanceUID={study}",
           "-od", str(out), "127.0.0.1", str(target.dicom_port)]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=DCMTK_ENV, timeout=1800,
                          check=False)
    secs = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"getscu from {target.name} rc {proc.returncode}: "
                           f"{proc.stderr[-1500:]}")
    return Retrieved(secs, sum(p.stat().st_size for p in out.iterdir()))


@dataclass
class MoveFrom:
    """What ``cmove`` needs of its source: a server under test, or a wire ceiling's."""

    called_ae: str
    dicom_port: int
    name: str = "ceiling"


def cmove(target: Target | MoveFrom, study: str, out: Path, port: int) -> Retrieved:
    """C-MOVE of one study with dcmtk movescu to a workstation: dcmtk ``storescp`` as
    ``SCU_AE`` on ``port`` (files under ``out``), which the server must know
    (``Target.allow_move``); timed from movescu's start to its end (the server's last
    C-MOVE response). Not movescu's own receiver (``--port``): it looks for the server's
    association only between 1-second waits for the C-MOVE response, ~1 s of every move.
    Plain: Debian's movescu has no TLS."""
    out.mkdir(parents=True, exist_ok=True)
    for old in out.iterdir():
        old.unlink()
    log = out.parent / f"{out.name}-storescp.log"
    dest = Service([dcmtk("storescp"), "-dhl", "-aet", SCU_AE, "+xa", "-od", str(out),
                    str(port)], log, env=DCMTK_ENV)
    try:
        wait_port(port, dest.proc, log)
        cmd = [dcmtk("movescu"), "-S", "-aet", SCU_AE, "-aem", SCU_AE,
               "-aec", target.called_ae, "-k", "QueryRetrieveLevel=STUDY",
               "-k", f"StudyInstanceUID={study}", "127.0.0.1", str(target.dicom_port)]
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True, env=DCMTK_ENV,
                              timeout=1800, check=False)
        secs = time.perf_counter() - t0
    finally:
        dest.stop()
    if proc.returncode != 0 or "Failed" in proc.stderr:
        raise RuntimeError(f"movescu from {target.name} rc {proc.returncode}: "
                           f"{proc.stderr[-1500:]}")
    return Retrieved(secs, sum(p.stat().st_size for p in out.iterdir()))


DURABILITY_CALLS = ("fsync", "fdatasync", "sync_file_range", "sync", "syncfs")


def durability_syscalls(target: Target, files: list[Path], logs: Path) -> dict[str, int] | None:
    """Count fsync-like system calls of the server while it stores ``files`` (one
    association, strace attached to every thread of the server and of its worker
    processes: with ``serve --workers`` the parent only supervises): how durable an
    acknowledgement is. None when strace is not installed."""
    strace = shutil.which("strace")
    if strace is None:
        return None
    logs.mkdir(parents=True, exist_ok=True)
    out = logs / "strace.txt"
    try:
        children = [c.pid for c in psutil.Process(target.pid).children(recursive=True)]
    except psutil.Error:
        children = []
    attach = [arg for pid in (target.pid, *children) for arg in ("-p", str(pid))]
    proc = subprocess.Popen([strace, "-f", "-c", "-e", "trace=" + ",".join(DURABILITY_CALLS),
                             "-o", str(out), *attach],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(1.0)  # attach to every thread before the first byte
    try:
        push(target.dicom_port, target.called_ae, files, 1, target.scu_tls, logs)
        time.sleep(0.3)
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(30)
    counts = dict.fromkeys(DURABILITY_CALLS, 0)
    for line in out.read_text().splitlines():
        cols = line.split()
        if cols and cols[-1] in counts and cols[3].isdigit():
            counts[cols[-1]] = int(cols[3])
    return counts
