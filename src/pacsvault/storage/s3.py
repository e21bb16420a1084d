"""The object store in an S3 bucket (``[storage] url = "s3://bucket/prefix"``).

Same objects as the local store: the ``pacsvault-obj/1`` ciphertext, byte for byte, under
a random id. Key ``<prefix>/ab/cd/<id>.pvo``; no user metadata (``x-amz-meta-*``), no
Content-Disposition, no tag, no Content-Type chosen by us: nothing in a listing, a header
or a tag names a patient or a UID. Only the S3 API is used (PUT/GET/HEAD/DELETE object,
ListObjectsV2), so AWS, OVH, Scaleway, Ceph, MinIO and SeaweedFS behave alike.

**Durability** (``ObjectBackend``'s contract, docs/object-storage.md):
``stage_spare`` PUTs the whole object with its Content-MD5 (the server refuses a body
that does not match it) and returns only when the PUT answered 200 with the ETag of that
MD5 (``check_etag``; SSE-KMS/SSE-C buckets answer other ETags: turn it off there, the
Content-MD5 check by the server stays). The caller commits the index row after that, and
acknowledges after the commit. So an indexed object always exists in the bucket: **a row
without its object is impossible by construction**. The reverse, an object without a row
(a crash or a failed commit between PUT and commit, a DELETE after a failed commit that
did not go through), is removed by ``sweep``: a listing of the bucket whose objects
older than the **grace period** (``orphan_grace_seconds``, 1 h) that no row names are
deleted. The grace is what protects a batch in flight (PUT done, commit pending, possibly
on another instance sharing the bucket): such an object is seconds old. More orphans than
``orphan_limit`` (1000) means an index that does not go with this bucket (a vault restored
from an older backup onto the same bucket, a prefix shared by mistake): then nothing is
deleted and the sweep says so.

Failures (endpoint down, timeout, 5xx, an unconfirmed PUT) raise ``StorageUnavailable``
(an ``OSError``: C-STORE answers A700 "out of resources", STOW-RS a failure), never a
success; nothing is cached, so ingest resumes by itself once the endpoint answers again.
A missing object on read is ``FileNotFoundError``, as with files.
"""

from __future__ import annotations

import base64
import contextlib
import datetime as dt
import functools
import hashlib
import hmac
import logging
import re
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from pacsvault.storage.objects import ObjectStore, Recovery, StorageUnavailable, check_id

log = logging.getLogger("pacsvault.storage")

_SUFFIX = ".pvo"
_KEY = re.compile(r"^([0-9a-f]{2})/([0-9a-f]{2})/([0-9a-f]{32})\.pvo$")
_CHUNK = 500


@dataclass(frozen=True)
class Listed:
    """One object of the bucket under our prefix (a listing: no GET)."""

    object_id: str
    size: int
    modified: dt.datetime


@dataclass(frozen=True)
class Sweep:
    """What one orphan sweep saw and did (object ids are random: safe to show)."""

    listed: int
    removed: tuple[str, ...]
    young: int  # unindexed but within the grace: maybe in flight, kept
    foreign: int  # keys under the prefix that are not ours: left alone
    refused: int = 0  # more orphans than ``orphan_limit``: none deleted (see ``sweep``)


def _not_found(exc: Exception) -> bool:
    response: Any = getattr(exc, "response", None)
    if not isinstance(response, dict):
        return False
    code = str(response.get("Error", {}).get("Code", ""))
    status = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
    return code in ("NoSuchKey", "404", "NotFound") or status == 404


class S3Store:
    """``ObjectBackend`` over one bucket and key prefix (see the module docstring)."""

    kind = "s3"

    def __init__(self, connect: Callable[[], Any], bucket: str, prefix: str, *,
                 orphan_grace: float = 3600.0, orphan_limit: int = 1000,
                 check_etag: bool = True) -> None:
        # The boto3 client, made at first use (``storage.backends.s3_client``): a CLI
        # command that never touches an object does not import boto3 (tests/test_cli_imports).
        self._connect = connect
        self._made: Any = None
        self._made_lock = threading.Lock()
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self.orphan_grace = orphan_grace
        self.orphan_limit = orphan_limit
        self.check_etag = check_etag

    @property
    def _client(self) -> Any:
        if self._made is None:
            with self._made_lock:
                if self._made is None:
                    self._made = self._connect()
        return self._made

    # --- names ------------------------------------------------------------------------

    def key(self, object_id: str) -> str:
        check_id(object_id)
        tail = f"{object_id[:2]}/{object_id[2:4]}/{object_id}{_SUFFIX}"
        return f"{self.prefix}/{tail}" if self.prefix else tail

    def _listing_prefix(self) -> str:
        return f"{self.prefix}/" if self.prefix else ""

    def _call(self, what: str, call: Callable[[], Any]) -> Any:
        """One S3 request; anything but an answer is ``StorageUnavailable`` (the type
        only: an S3 error message may quote the key, never a patient, but stays out)."""
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            return call()
        except ClientError as exc:
            if _not_found(exc):
                raise FileNotFoundError("object not found in the bucket") from None
            code = str(exc.response.get("Error", {}).get("Code", "?"))[:40]
            raise StorageUnavailable(f"S3 {what} failed ({code})") from None
        except BotoCoreError as exc:
            raise StorageUnavailable(f"S3 {what} failed ({type(exc).__name__})") from None

    # --- ObjectBackend ----------------------------------------------------------------

    def create(self) -> None:
        """Check that the bucket answers (made by the IT provider, never by us)."""
        self._call("bucket check", lambda: self._client.head_bucket(Bucket=self.bucket))

    def check_space(self, incoming: int) -> None:
        """A bucket has no free-space reserve to keep."""

    new_id = staticmethod(ObjectStore.new_id)

    def stage_spare(self, pieces: Iterable[bytes]) -> str:
        """PUT a new object; returns its id once the store confirmed it (200, ETag).

        The body is a ``bytearray``, not ``bytes``: botocore wraps ``bytes`` in a
        ``BytesIO``, and any file-like body gets ``Expect: 100-continue`` (one more wait
        for the server per PUT) and is sent in 8 KB reads through Python; a buffer goes
        out in one ``sendall`` (issue 16, scale-out ingest; the same
        request otherwise: Content-MD5, length, no payload hash over https)."""
        body = bytearray().join(pieces)
        object_id = self.new_id()
        digest = hashlib.md5(body, usedforsecurity=False).digest()
        answer = self._call("PUT", lambda: self._client.put_object(
            Bucket=self.bucket, Key=self.key(object_id), Body=body,
            ContentMD5=base64.b64encode(digest).decode("ascii")))
        status = answer.get("ResponseMetadata", {}).get("HTTPStatusCode")
        etag = str(answer.get("ETag", "")).strip('"').lower()
        if status != 200 or (self.check_etag
                             and not hmac.compare_digest(etag, digest.hex())):
            self.discard(object_id)  # (if it went through at all; else the sweep)
            raise StorageUnavailable("S3 PUT not confirmed (status or ETag differs)")
        return object_id

    def publish(self, object_id: str, *, durable: bool = True) -> None:
        """Nothing to move: a confirmed PUT is in its final place."""
        check_id(object_id)

    def discard(self, object_id: str) -> None:
        """Best effort (a store that failed): an object left behind is an orphan that the
        sweep removes after the grace period."""
        try:
            self.delete(object_id)
        except OSError as exc:
            log.warning("an unacknowledged object could not be deleted now (%s); the "
                        "orphan sweep will", type(exc).__name__)

    def exists(self, object_id: str) -> bool:
        try:
            self._call("HEAD", lambda: self._client.head_object(
                Bucket=self.bucket, Key=self.key(object_id)))
        except FileNotFoundError:
            return False
        return True

    def recover(self, is_indexed: Callable[[str], bool]) -> Recovery:
        """Nothing to settle at start: an indexed object is in the bucket by construction,
        and orphans are the sweep's (``sweep``, run by serve's job: listing a large bucket
        must not delay the start)."""
        return Recovery(0, 0)

    def read(self, object_id: str) -> bytes:
        answer = self._call("GET", lambda: self._client.get_object(
            Bucket=self.bucket, Key=self.key(object_id)))
        body = answer["Body"]
        try:
            data: bytes = self._call("GET", body.read)
        finally:
            body.close()
        return data

    def delete(self, object_id: str) -> None:
        with contextlib.suppress(FileNotFoundError):  # (gone already: fine)
            self._call("DELETE", lambda: self._client.delete_object(
                Bucket=self.bucket, Key=self.key(object_id)))

    def remove(self, object_ids: Sequence[str]) -> int:
        """Delete for good (a removal). S3's DELETE does not say whether the object was
        there: every id confirmed deleted counts. A failure raises (the removal's
        ``pending`` list keeps the rest for later)."""
        for object_id in object_ids:
            self.delete(object_id)
        return len(object_ids)

    # --- listing: the orphan sweep and the scrubber -----------------------------------

    def listing(self) -> Iterator[Listed | None]:
        """Every object under the prefix (``None`` for a key that is not ours)."""
        prefix = self._listing_prefix()
        token: str | None = None
        while True:
            kwargs: dict[str, Any] = {"Bucket": self.bucket, "Prefix": prefix,
                                      "MaxKeys": 1000}
            if token:
                kwargs["ContinuationToken"] = token
            page = self._call("LIST", functools.partial(self._client.list_objects_v2,
                                                         **kwargs))
            for item in page.get("Contents", []):
                match = _KEY.match(str(item["Key"])[len(prefix):])
                if match is None or match[3][:2] != match[1] or match[3][2:4] != match[2]:
                    yield None
                    continue
                yield Listed(match[3], int(item.get("Size", 0)), item["LastModified"])
            if not page.get("IsTruncated"):
                return
            token = page.get("NextContinuationToken")
            if not token:
                return

    def sweep(self, indexed: Callable[[list[str]], set[str]], *,
              grace: float | None = None, now: dt.datetime | None = None) -> Sweep:
        """Delete the objects no index row names that are older than the grace period.

        ``indexed`` answers which of a list of ids the index names (one query per chunk).
        Age is the bucket's LastModified against this machine's clock: the grace (an hour)
        dwarfs any sane clock skew.
        """
        grace = self.orphan_grace if grace is None else grace
        limit = (now or dt.datetime.now(dt.UTC)) - dt.timedelta(seconds=grace)
        listed = young = foreign = 0
        orphans: list[str] = []
        chunk: list[Listed] = []

        def settle() -> None:
            nonlocal young
            known = indexed([item.object_id for item in chunk])
            for item in chunk:
                if item.object_id in known:
                    continue
                if item.modified > limit:
                    young += 1
                    continue
                orphans.append(item.object_id)
            chunk.clear()

        for item in self.listing():
            if item is None:
                foreign += 1
                continue
            listed += 1
            chunk.append(item)
            if len(chunk) >= _CHUNK:
                settle()
        if chunk:
            settle()
        if len(orphans) > self.orphan_limit:
            # Crashes leave a batch or two; this many means an index that does not belong
            # with this bucket (restored from an older backup, another vault's prefix):
            # deleting would destroy images. Nothing is deleted; an administrator looks.
            log.error("orphan sweep: %d unindexed objects (limit %d): nothing deleted; is "
                      "this the index of this bucket and prefix?", len(orphans),
                      self.orphan_limit)
            return Sweep(listed, (), young, foreign, refused=len(orphans))
        for object_id in orphans:
            self.delete(object_id)
        if orphans:
            log.info("orphan sweep: %d unindexed object(s) older than %ds removed",
                     len(orphans), int(grace))
        return Sweep(listed, tuple(orphans), young, foreign)
