"""boto3 or obstore for the S3 object store (issue 16, part 2): a short measurement.

    python -m bench.s3_clients --endpoint http://127.0.0.1:PORT --bucket B \
        --credentials FILE [--count 200] [--size 512000] [--threads 4]

Puts then gets ``count`` random objects of ``size`` bytes with each client, one at a time
(what one ``Archive.store`` does: a PUT on the response's path) and with ``threads``
workers (several associations), and prints objects/s and MB/s. The endpoint is a local
SeaweedFS (``weed server -s3``); credentials come from a 0600 file in the format of
``storage.s3`` (``access_key_id = ...`` / ``secret_access_key = ...``). A decision
benchmark, run by hand; the result is in docs/object-storage.md.
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any


def _credentials(path: Path) -> tuple[str, str]:
    values: dict[str, str] = {}
    for line in path.read_text("utf-8").splitlines():
        name, sep, value = line.partition("=")
        if sep and not line.lstrip().startswith("#"):
            values[name.strip()] = value.strip().strip('"')
    return values["access_key_id"], values["secret_access_key"]


def _boto3(endpoint: str, bucket: str, key: str, secret: str) -> tuple[Callable[..., Any], ...]:
    import boto3
    from botocore.config import Config

    client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1",
                          aws_access_key_id=key, aws_secret_access_key=secret,
                          config=Config(max_pool_connections=16,
                                        retries={"max_attempts": 2, "mode": "standard"}))

    def put(name: str, body: bytes) -> None:
        client.put_object(Bucket=bucket, Key=name, Body=body)

    def get(name: str) -> bytes:
        data: bytes = client.get_object(Bucket=bucket, Key=name)["Body"].read()
        return data

    return put, get


def _obstore(endpoint: str, bucket: str, key: str, secret: str) -> tuple[Callable[..., Any], ...]:
    import obstore
    from obstore.store import S3Store

    store = S3Store(bucket, endpoint=endpoint, region="us-east-1", access_key_id=key,
                    secret_access_key=secret, client_options={"allow_http": True})

    def put(name: str, body: bytes) -> None:
        obstore.put(store, name, body)

    def get(name: str) -> bytes:
        return bytes(obstore.get(store, name).bytes())

    return put, get


def _run(label: str, put: Callable[..., Any], get: Callable[..., Any], count: int,
         size: int, threads: int) -> None:
    bodies = [os.urandom(size) for _ in range(count)]
    names = [f"bench/{label}/{threads}/{i:04d}" for i in range(count)]
    for workers in (1, threads):
        def do_put(i: int) -> None:
            put(names[i], bodies[i])

        def do_get(i: int) -> None:
            get(names[i])

        calls: tuple[tuple[str, Callable[[int], None]], ...] = (("put", do_put),
                                                                 ("get", do_get))
        for verb, call in calls:
            start = time.perf_counter()
            if workers == 1:
                for i in range(count):
                    call(i)
            else:
                with ThreadPoolExecutor(workers) as pool:
                    list(pool.map(call, range(count)))
            took = time.perf_counter() - start
            print(f"{label:8} {verb} x{workers}: {count / took:7.1f} objects/s "
                  f"{count * size / took / 1e6:7.1f} MB/s")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--endpoint", required=True)
    parser.add_argument("--bucket", required=True)
    parser.add_argument("--credentials", type=Path, required=True)
    parser.add_argument("--count", type=int, default=200)
    parser.add_argument("--size", type=int, default=500 * 1024)
    parser.add_argument("--threads", type=int, default=4)
    args = parser.parse_args()
    key, secret = _credentials(args.credentials)
    put, get = _boto3(args.endpoint, args.bucket, key, secret)
    try:
        put("bench/probe", b"x")
    except Exception:
        import boto3

        boto3.client("s3", endpoint_url=args.endpoint, region_name="us-east-1",
                     aws_access_key_id=key, aws_secret_access_key=secret
                     ).create_bucket(Bucket=args.bucket)
    for label, make in (("boto3", _boto3), ("obstore", _obstore)):
        put, get = make(args.endpoint, args.bucket, key, secret)
        _run(label, put, get, args.count, args.size, args.threads)


if __name__ == "__main__":
    main()
