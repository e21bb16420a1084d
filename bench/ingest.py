"""DICOM ingest benchmark: dcmtk ``storescu`` -> pacsvault, with dcmtk ``storescp`` as peer.

Why: ingest speed is what a practice notices first (a CT study is hundreds of slices), and an
absolute images/s figure means little on its own machine. So every scenario is run against
dcmtk's ``storescp`` writing to disk in the same run, and the table reports the ratio
pacsvault/storescp -- the project's rule for benchmarks. This is a benchmark, not a test.

Usage: ``python bench/ingest.py [--count N] [--workdir DIR] [--keep] [--json OUT]``
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import functools
import importlib.util
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import UID, CTImageStorage, ExplicitVRLittleEndian, generate_uid

# `python bench/ingest.py`: the repository root holds tests/harness, the dcmtk/ports harness
# the tests use too (one copy: a fix reaches both)
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from tests.harness import peers
from tests.harness.peers import dcmtk_env, free_port

__all__ = ["DCMTK_ENV", "dcmtk", "free_port", "main", "make_peer_pki", "pacsvault_cmd", "push",
           "run", "server", "tls_args"]

SCU_AE, SERVER_AE, PEER_AE = "BENCHSCU", "PACSVAULT", "STORESCP"
SEED = 20240611
# Debian's dcmtk only disables Nagle when asked; without it every C-STORE waits ~40 ms.
DCMTK_ENV = dcmtk_env()


@dataclass
class Result:
    """One measured cell of the table (median over rounds)."""

    peer: str
    transport: str
    associations: int
    images: int
    seconds: float
    images_per_s: float
    mb_per_s: float
    ratio: float = 1.0

    @property
    def key(self) -> tuple[str, int]:
        return self.transport, self.associations


def uid(*parts: object) -> UID:
    """Deterministic UID under pydicom's root, so reruns produce byte-identical corpora."""
    return generate_uid(entropy_srcs=["pacsvault-bench", *map(str, parts)])


def make_corpus(out: Path, count: int) -> list[Path]:
    """Write ``count`` 512x512 16-bit CT slices of one study/series.

    A water-disc phantom plus seeded noise rather than pure noise: realistic CT is partly
    compressible, and pure noise would penalise any compress-then-encrypt storage path.
    """
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(SEED)
    yy, xx = np.mgrid[-256:256, -256:256]
    r2 = xx.astype(np.int32) ** 2 + yy**2
    phantom = np.where(r2 < 220**2, 1024, 0) + np.where(r2 < 30**2, 700, 0)  # water, "bone"
    study, series, frame = uid("study"), uid("series"), uid("frame")
    files = []
    for i in range(count):
        noise = rng.normal(0.0, 20.0, size=(512, 512))
        pixels = np.clip(phantom + noise, 0, 4095).astype(np.uint16)
        sop = uid("image", i)
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = CTImageStorage, sop
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, sop
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study, series, frame
        ds.PatientName, ds.PatientID, ds.PatientSex = "BENCH^PATIENT", "BENCH0001", "O"
        ds.PatientBirthDate, ds.StudyDate, ds.StudyTime = "19700101", "20240101", "120000"
        ds.AccessionNumber, ds.StudyID, ds.ReferringPhysicianName = "BENCH1", "1", ""
        ds.Modality, ds.Manufacturer = "CT", "pacsvault-bench"
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.SeriesNumber, ds.InstanceNumber = 1, i + 1
        z = 0.0 - 1.25 * i  # not -0.0
        ds.ImagePositionPatient = [-250.0, -250.0, z]
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.SliceThickness, ds.SliceLocation, ds.PixelSpacing = 1.25, z, [0.9765625] * 2
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.Rows = ds.Columns = 512
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
        ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = -1024, 1, "HU"
        ds.WindowCenter, ds.WindowWidth = 40, 400
        ds.PixelData = pixels.tobytes()
        path = out / f"CT{i + 1:06d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        files.append(path)
    return files


def dcmtk(name: str) -> str:
    """dcmtk's ``name`` (tests/harness/peers.py), or exit with how to install it."""
    try:
        return peers.dcmtk(name)
    except RuntimeError as e:
        sys.exit(f"error: {e}")


@functools.cache
def pacsvault_cmd() -> tuple[str, ...]:
    """Same interpreter as the bench if possible, else the ``pacsvault`` console script."""
    if importlib.util.find_spec("pacsvault") is not None:
        return (sys.executable, "-m", "pacsvault")
    if exe := shutil.which("pacsvault"):
        return (exe,)
    sys.exit("error: pacsvault is not importable; run `pip install -e .` first")


def run(cmd: list[str]) -> str:
    """Run a setup command; fail loudly with its output, since a half-set-up bench lies."""
    p = subprocess.run(cmd, capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=300)
    if p.returncode != 0:
        sys.exit(f"error: {' '.join(map(str, cmd))} -> rc {p.returncode}\n{p.stdout}{p.stderr}")
    return str(p.stdout)


def make_peer_pki(out: Path) -> None:
    """CA, server and client certs for storescp, so its TLS baseline is mutual TLS too."""
    from ipaddress import IPv4Address

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat
    from cryptography.x509.oid import NameOID

    out.mkdir(parents=True, exist_ok=True)
    now = dt.datetime.now(dt.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "pacsvault-bench CA")])
    san = [x509.DNSName("localhost"), x509.IPAddress(IPv4Address("127.0.0.1"))]
    for name in ("ca", "server", "client"):
        key = ca_key if name == "ca" else ec.generate_private_key(ec.SECP256R1())
        cn = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"bench-{name}")])
        builder = x509.CertificateBuilder(
            issuer_name=ca_name,
            subject_name=ca_name if name == "ca" else cn,
            public_key=key.public_key(),
            serial_number=x509.random_serial_number(),
            not_valid_before=now - dt.timedelta(hours=1),
            not_valid_after=now + dt.timedelta(days=2),
        ).add_extension(x509.BasicConstraints(ca=name == "ca", path_length=None), critical=True)
        if name != "ca":
            builder = builder.add_extension(x509.SubjectAlternativeName(san), critical=False)
        cert = builder.sign(ca_key, hashes.SHA256())
        (out / f"{name}.crt").write_bytes(cert.public_bytes(Encoding.PEM))
        pem = key.private_bytes(Encoding.PEM, PrivateFormat.PKCS8, NoEncryption())
        (out / f"{name}.key").write_bytes(pem)


def wait_listening(
    proc: subprocess.Popen[bytes], port: int, log: Path, ready: Path | None, timeout: float = 60.0
) -> None:
    """Wait for ``ready`` (serve.json) to parse and the port to accept TCP; die if server dies."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            sys.exit(
                f"error: server exited with rc {proc.returncode}; log {log}:\n"
                + log.read_text(errors="replace")[-3000:]
            )
        with contextlib.suppress(OSError, ValueError):
            if ready is not None:
                json.loads(ready.read_text())
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        time.sleep(0.1)
    sys.exit(f"error: server not listening on {port} after {timeout:.0f}s; log {log}")


@contextlib.contextmanager
def server(
    cmd: list[str],
    port: int,
    log: Path,
    ready: Path | None = None,
    env: dict[str, str] | None = None,
) -> Iterator[None]:
    """Run a server in its own process group; SIGTERM the leader, SIGKILL the group if stuck."""
    with log.open("wb") as fh:
        proc = subprocess.Popen(
            cmd,
            stdout=fh,
            stderr=subprocess.STDOUT,
            env=env,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
    try:
        wait_listening(proc, port, log, ready)
        yield
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            rc = proc.wait(timeout=15)
            if rc not in (0, -signal.SIGTERM) and ready is not None:
                print(
                    f"warning: server exited rc {rc} on SIGTERM (log {log})",
                    file=sys.stderr,
                )
        except subprocess.TimeoutExpired:
            print(f"warning: server ignored SIGTERM for 15 s, killing (log {log})", file=sys.stderr)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)  # our own group: --fork children, stragglers
        proc.wait()


def tls_args(key: Path, crt: Path, ca: Path) -> list[str]:
    """dcmtk mutual-TLS options; ``-pw``: the PEM keys are unencrypted (no password prompt)."""
    return ["+tls", str(key), str(crt), "-pw", "+cf", str(ca)]


def push(port: int, called: str, files: list[Path], n: int, tls: list[str], logs: Path) -> float:
    """Send ``files`` over ``n`` concurrent storescu processes; wall seconds incl. startup."""
    procs = []
    start = time.perf_counter()
    for k in range(n):  # one storescu = one association; every n-th file, in order
        cmd = [dcmtk("storescu"), "-aet", SCU_AE, "-aec", called, *tls, "127.0.0.1", str(port)]
        with (logs / f"storescu-{k}.log").open("wb") as fh:
            procs.append(
                subprocess.Popen(
                    cmd + [str(f) for f in files[k::n]],
                    stdout=fh,
                    stderr=subprocess.STDOUT,
                    env=DCMTK_ENV,
                )
            )
    rcs = [p.wait(timeout=3600) for p in procs]
    elapsed = time.perf_counter() - start
    for k, rc in enumerate(rcs):
        if rc != 0:
            log = (logs / f"storescu-{k}.log").read_text(errors="replace")
            sys.exit(f"error: storescu to {called} rc {rc}:\n{log[-3000:]}")
    return elapsed


def run_storescp(root: Path, pki: Path, tls: bool, nassoc: int, files: list[Path]) -> float:
    """Peer baseline: storescp (forking, writing every object to disk) on a fresh dir."""
    out = root / "received"
    out.mkdir(parents=True)
    port = free_port()
    srv_tls = tls_args(pki / "server.key", pki / "server.crt", pki / "ca.crt") if tls else []
    cli_tls = tls_args(pki / "client.key", pki / "client.crt", pki / "ca.crt") if tls else []
    cmd = [dcmtk("storescp"), "--fork", "-aet", PEER_AE, "-od", str(out), *srv_tls, str(port)]
    with server(cmd, port, root / "storescp.log", env=DCMTK_ENV):
        secs = push(port, PEER_AE, files, nassoc, cli_tls, root)
    if (got := sum(1 for _ in out.iterdir())) != len(files):
        sys.exit(f"error: storescp stored {got} of {len(files)} objects ({root})")
    return secs


def run_pacsvault(root: Path, tls: bool, nassoc: int, files: list[Path]) -> float:
    """Fresh vault per cell: TLS needs the node registered --tls, and runs stay independent."""
    pv, data, key = pacsvault_cmd(), root / "vault", root / "vault.key"
    run([*pv, "init", "--data", str(data), "--key-file", str(key), "--ae-title", SERVER_AE])
    mtls = ["--tls", "--client-cert"] if tls else []
    run([*pv, "node", "add", SCU_AE, "--host", "127.0.0.1", "--data", str(data), *mtls])
    cli_tls: list[str] = []
    if tls:
        certs = root / "client"
        run([*pv, "node", "cert", SCU_AE, "--out", str(certs), "--data", str(data)])
        cli_tls = tls_args(certs / f"{SCU_AE}.key", certs / f"{SCU_AE}.crt", data / "tls/ca.crt")
    plain_port, tls_port = free_port(), free_port()
    ports = ["--dicom-port", str(plain_port), "--dicom-tls-port", str(tls_port),
             "--https-port", "0"]
    cmd = [*pv, "serve", "--data", str(data), "--key-file", str(key), "--bind", "127.0.0.1", *ports,
           "--workers", "1"]  # one process, as in RESULTS.md (the default is one per core)
    port = tls_port if tls else plain_port
    with server(cmd, port, root / "serve.log", ready=data / "serve.json"):
        info = json.loads((data / "serve.json").read_text())
        if (info.get("dicom_port"), info.get("dicom_tls_port")) != (plain_port, tls_port):
            print(f"warning: serve.json ports {info} differ from requested", file=sys.stderr)
        return push(port, SERVER_AE, files, nassoc, cli_tls, root)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--count", type=int, default=200, help="number of CT slices (default 200)")
    ap.add_argument("--workdir", type=Path, help="work directory (default: a temp dir)")
    ap.add_argument("--keep", action="store_true", help="keep the work directory and vaults")
    ap.add_argument("--json", type=Path, help="also write results as JSON here")
    ap.add_argument("--parallel", type=int, default=4, help="associations of the parallel row")
    ap.add_argument("--rounds", type=int, default=1, help="repeat each cell, report the median")
    ap.add_argument("--no-pacsvault", action="store_true", help="only run the storescp peer")
    args = ap.parse_args(argv)

    dcmtk("storescu"), dcmtk("storescp")  # fail before spending time on the corpus
    if not args.no_pacsvault:
        pacsvault_cmd()
    work = args.workdir or Path(tempfile.mkdtemp(prefix="pacsvault-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(work / "runs", ignore_errors=True)  # only the bench's own layout
    results: list[Result] = []
    ok = False
    try:
        t0 = time.perf_counter()
        files = make_corpus(work / "corpus", args.count)
        mb = sum(f.stat().st_size for f in files) / 1e6
        took = time.perf_counter() - t0
        print(f"corpus: {len(files)} files, {mb:.1f} MB, {took:.1f} s ({work})", file=sys.stderr)
        make_peer_pki(work / "peer-tls")
        peers = ["storescp"] + ([] if args.no_pacsvault else ["pacsvault"])
        assocs = sorted({1, max(1, args.parallel)})
        cells = [(t, n, p) for t in ("plain", "tls") for n in assocs for p in peers]
        for transport, nassoc, peer in cells:  # storescp first: its row is the ratio's base
            secs = []
            for rnd in range(args.rounds):
                root = work / "runs" / f"{peer}-{transport}-{nassoc}-{rnd}"
                root.mkdir(parents=True)
                tls = transport == "tls"
                if peer == "storescp":
                    secs.append(run_storescp(root, work / "peer-tls", tls, nassoc, files))
                else:
                    secs.append(run_pacsvault(root, tls, nassoc, files))
                if not args.keep:
                    shutil.rmtree(root)
            s = statistics.median(secs)
            r = Result(peer, transport, nassoc, len(files), s, len(files) / s, mb / s)
            base = next(b for b in [*results, r] if b.key == r.key)
            r.ratio = r.images_per_s / base.images_per_s
            results.append(r)
            print(f"  {peer} {transport} x{nassoc}: {s:.2f} s", file=sys.stderr)
        ok = True
    finally:
        if ok and not args.keep and args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)
        elif not ok:
            print(f"work dir kept for inspection: {work}", file=sys.stderr)

    print("| peer | transport | associations | images | seconds | images/s | MB/s | ratio |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for r in results:
        print(
            f"| {r.peer} | {r.transport} | {r.associations} | {r.images} | {r.seconds:.2f} "
            f"| {r.images_per_s:.1f} | {r.mb_per_s:.1f} | {r.ratio:.2f} |"
        )
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "count": args.count,
                    "megabytes": mb,
                    "rounds": args.rounds,
                    "cpus": os.cpu_count(),
                    "results": [asdict(r) for r in results],
                },
                indent=2,
            )
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
