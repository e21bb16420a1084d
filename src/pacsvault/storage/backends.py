"""Which object store a vault uses: ``[storage] url`` empty (the default) is the local
files under ``DATA/objects``; ``s3://bucket/prefix`` a bucket (``storage.s3``).

The S3 client is boto3 (measured against obstore in ``bench/s3_clients.py``; the reason is
in docs/object-storage.md). What it is given:

- **TLS verified**: certificates are always checked, against ``ca_file`` when set (a
  private CA: Ceph or MinIO inside the practice network) or the system's trust store.
  There is no switch to turn verification off. A plain ``http://`` endpoint is refused
  unless it is on this machine (loopback: a local SeaweedFS/MinIO, the tests).
- **Credentials** from ``credentials_file`` (0600, refused if readable by others), lines
  ``access_key_id = ...`` and ``secret_access_key = ...`` (optionally ``session_token``;
  the ``AWS_ACCESS_KEY_ID=...`` spelling of a restic credentials file is accepted too),
  else boto3's standard provider chain (environment, ``~/.aws``, instance profile). Never
  on a command line.
- Bounded time: 5 s to connect, 30 s per read, 3 attempts (standard retry mode), so a
  store with the endpoint down fails in seconds, not minutes.
"""

from __future__ import annotations

import ipaddress
import re
import stat
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from pacsvault.config import ConfigError, StorageSettings
from pacsvault.storage.objects import ObjectBackend, ObjectStore

if TYPE_CHECKING:
    from pacsvault.storage.s3 import S3Store

_URL = re.compile(r"^s3://([a-z0-9][a-z0-9.-]{1,61}[a-z0-9])(/[A-Za-z0-9._/-]*)?$")
_NAMES = {
    "access_key_id": "access_key_id", "aws_access_key_id": "access_key_id",
    "secret_access_key": "secret_access_key", "aws_secret_access_key": "secret_access_key",
    "session_token": "session_token", "aws_session_token": "session_token",
}


class StorageConfigError(ConfigError):
    """The ``[storage]`` settings cannot be used (message is user-facing, no secret): a
    ``ConfigError``, so every command reports it in one line."""


def parse_url(url: str) -> tuple[str, str]:
    """``s3://bucket/prefix`` -> (bucket, prefix without slashes at either end)."""
    match = _URL.match(url.strip())
    if match is None:
        raise StorageConfigError("storage url must look like s3://bucket/prefix (bucket: "
                                 "3-63 lowercase letters, digits, dots, hyphens)")
    prefix = (match[2] or "").strip("/")
    if any(part in ("", ".", "..") for part in prefix.split("/")) and prefix:
        raise StorageConfigError("the storage url's prefix has an empty or dot segment")
    return match[1], prefix


def read_credentials(path: Path) -> dict[str, str]:
    """The access key and secret from a 0600 file (format in the module docstring)."""
    try:
        info = path.stat()
    except OSError:
        raise StorageConfigError(f"the S3 credentials file {path} cannot be read") from None
    if stat.S_IMODE(info.st_mode) & 0o077:
        raise StorageConfigError(f"the S3 credentials file {path} must be private (chmod "
                                 "600): it holds a secret key")
    found: dict[str, str] = {}
    for line in path.read_text("utf-8").splitlines():
        text = line.strip()
        if not text or text.startswith("#"):
            continue
        name, sep, value = text.partition("=")
        field = _NAMES.get(name.strip().lower())
        if sep and field:
            found[field] = value.strip().strip('"').strip("'")
    if not found.get("access_key_id") or not found.get("secret_access_key"):
        raise StorageConfigError(f"the S3 credentials file {path} needs access_key_id and "
                                 "secret_access_key lines")
    return found


def _check_endpoint(endpoint: str) -> None:
    parts = urlsplit(endpoint)
    if parts.scheme == "https" and parts.hostname:
        return
    if parts.scheme == "http" and parts.hostname:
        host = parts.hostname
        try:
            loopback = ipaddress.ip_address(host).is_loopback
        except ValueError:
            loopback = host == "localhost"
        if loopback:
            return
        raise StorageConfigError("the S3 endpoint must use https:// (plain http only to "
                                 "this machine's loopback address)")
    raise StorageConfigError("the S3 endpoint must be an https:// URL")


def s3_client(settings: StorageSettings) -> Any:
    import boto3
    from botocore.config import Config

    if settings.endpoint:
        _check_endpoint(settings.endpoint)
    verify: str | bool = True
    if settings.ca_file:
        ca = Path(settings.ca_file)
        if not ca.is_file():
            raise StorageConfigError(f"the S3 CA file {ca} does not exist")
        verify = str(ca)
    creds = read_credentials(Path(settings.credentials_file)) \
        if settings.credentials_file else {}
    session = boto3.session.Session()
    client = session.client(
        "s3",
        endpoint_url=settings.endpoint or None,
        region_name=settings.region or None,
        aws_access_key_id=creds.get("access_key_id"),
        aws_secret_access_key=creds.get("secret_access_key"),
        aws_session_token=creds.get("session_token"),
        verify=verify,
        config=Config(
            connect_timeout=5, read_timeout=30,
            retries={"max_attempts": 3, "mode": "standard"},
            max_pool_connections=32,
            # Content-MD5 is what we send and check; no aws-chunked trailers, which some
            # S3-compatible stores do not accept.
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
            s3={"addressing_style": "path" if settings.path_style else "auto"},
        ),
    )
    return client


def open_s3(settings: StorageSettings) -> S3Store:
    from pacsvault.storage.s3 import S3Store

    bucket, prefix = parse_url(settings.url)
    # A wrong setting fails at open, not at the first store (the client itself, and
    # boto3 with it, is made at first use).
    if settings.endpoint:
        _check_endpoint(settings.endpoint)
    if settings.ca_file and not Path(settings.ca_file).is_file():
        raise StorageConfigError(f"the S3 CA file {settings.ca_file} does not exist")
    if settings.credentials_file:
        read_credentials(Path(settings.credentials_file))
    return S3Store(lambda: s3_client(settings), bucket, prefix,
                   orphan_grace=settings.orphan_grace_seconds,
                   orphan_limit=settings.orphan_limit,
                   check_etag=settings.check_etag)


def open_store(settings: StorageSettings, objects_dir: Path) -> ObjectBackend:
    """The vault's object store. The local directory exists either way (sealed-mode
    spares, backups' staging); with S3 it holds no object."""
    if settings.url:
        return open_s3(settings)
    return ObjectStore(objects_dir, settings.min_free_mb * 1024 * 1024)


def describe(settings: StorageSettings) -> str:
    """Where the objects go, for status lines (no credential)."""
    if not settings.url:
        return "local files"
    return f"{settings.url} at {settings.endpoint or 'AWS'}"


__all__ = ["StorageConfigError", "describe", "open_s3", "open_store", "parse_url",
           "read_credentials", "s3_client"]
