"""Copying the encrypted objects, each one as it is.

The ``pacsvault-obj/1`` ciphertext is copied byte for byte under the same object id: no
object is decrypted or re-encrypted here, so the index rows (which name object ids) stay
valid and the data keys stay the ones the objects were sealed with. Each copy is read back
from the target and its SHA-256 compared with the source's before it counts; only then is
the progress saved (so a resumed run never skips an unverified object).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
from collections.abc import Callable, Iterator
from typing import Protocol, cast

from sqlalchemy import Engine, Table, select

from pacsvault.config import StorageSettings
from pacsvault.index.models import DataKey, Instance
from pacsvault.storage.objects import ObjectBackend, ObjectStore

_instances = cast(Table, Instance.__table__)
_keys = cast(Table, DataKey.__table__)
CHUNK = 200


class CopyError(Exception):
    """An object could not be copied or did not read back identical (user-facing; names
    object ids only, which are random)."""


class Sink(Protocol):
    """Where copies go: ``put`` stores ``blob`` under ``object_id`` durably and returns
    the SHA-256 of what reads back."""

    def put(self, object_id: str, blob: bytes) -> bytes: ...


class LocalSink:
    """A local object directory: staged (fsync'ed), published, read back."""

    def __init__(self, store: ObjectStore) -> None:
        self.store = store
        store.create()

    def put(self, object_id: str, blob: bytes) -> bytes:
        want = hashlib.sha256(blob).digest()
        final = self.store.path(object_id)
        if final.exists():  # a copy left by an earlier run (or the pre-migration files)
            have = hashlib.sha256(final.read_bytes()).digest()
            if hmac.compare_digest(have, want):
                return have
            raise CopyError(f"object {object_id} already exists in the target directory "
                            "with other bytes; nothing was overwritten")
        self.store.discard(object_id)  # a half-staged copy of an interrupted run
        self.store.stage(object_id, [blob])
        self.store.publish(object_id)
        return hashlib.sha256(self.store.read(object_id)).digest()


class S3Sink:
    """A bucket: PUT with its Content-MD5 (the server refuses other bytes), the answer's
    ETag checked like a store's PUT, then a GET of the whole object."""

    def __init__(self, settings: StorageSettings) -> None:
        from pacsvault.storage.backends import open_s3

        self.store = open_s3(settings)
        self.store.create()  # the bucket answers (made by the IT provider, never by us)

    def put(self, object_id: str, blob: bytes) -> bytes:
        md5 = hashlib.md5(blob, usedforsecurity=False).digest()
        # The store's own client and error mapping; the PUT names the id (a store's PUT
        # draws a new one).
        client = self.store._client
        answer = self.store._call("PUT", lambda: client.put_object(
            Bucket=self.store.bucket, Key=self.store.key(object_id), Body=blob,
            ContentMD5=base64.b64encode(md5).decode("ascii")))
        status = answer.get("ResponseMetadata", {}).get("HTTPStatusCode")
        etag = str(answer.get("ETag", "")).strip('"').lower()
        if status != 200 or (self.store.check_etag and not hmac.compare_digest(
                etag, md5.hex())):
            raise CopyError(f"the PUT of object {object_id} was not confirmed")
        return hashlib.sha256(self.store.read(object_id)).digest()


def sink_for(settings: StorageSettings, local: ObjectStore) -> Sink:
    return S3Sink(settings) if settings.url else LocalSink(local)


def instance_total(engine: Engine) -> int:
    from sqlalchemy import func

    with engine.connect() as conn:
        return int(conn.scalar(select(func.count()).select_from(_instances)) or 0)


def pending(engine: Engine, after_pk: int) -> Iterator[tuple[int, str, bool]]:
    """(pk, object id, key destroyed) of every instance after ``after_pk``, in pk order,
    read in chunks (each chunk one short read transaction)."""
    last = after_pk
    while True:
        with engine.connect() as conn:
            rows = conn.execute(
                select(_instances.c.pk, _instances.c.object_id,
                       _keys.c.wrapped.is_(None) | _keys.c.destroyed.is_not(None))
                .join(_keys, _keys.c.key_id == _instances.c.key_id, isouter=True)
                .where(_instances.c.pk > last).order_by(_instances.c.pk).limit(CHUNK)
            ).all()
        if not rows:
            return
        for pk, object_id, destroyed in rows:
            yield int(pk), str(object_id), bool(destroyed)
        last = int(rows[-1][0])


def copy_one(source: ObjectBackend, sink: Sink, object_id: str,
             destroyed: bool) -> int | None:
    """Copy one object and check it; its size, or None when it was erased on purpose
    (its data key destroyed: the file may be gone and could never be read anyway)."""
    try:
        blob = source.read(object_id)
    except FileNotFoundError:
        if destroyed:
            return None
        raise CopyError(f"indexed object {object_id} is missing in the source store; "
                        "nothing was switched (check it with 'pacsvault storage scrub' "
                        "or restore it from a backup)") from None
    readback = sink.put(object_id, blob)
    if not hmac.compare_digest(readback, hashlib.sha256(blob).digest()):
        raise CopyError(f"object {object_id} reads back different from the target; "
                        "nothing was switched")
    return len(blob)


def copy_all(source_engine: Engine, source: ObjectBackend, sink: Sink, after_pk: int,
             saved: Callable[[int, str, int | None], None]) -> None:
    """Copy every object after ``after_pk``; ``saved(pk, object_id, size)`` after each."""
    for pk, object_id, destroyed in pending(source_engine, after_pk):
        saved(pk, object_id, copy_one(source, sink, object_id, destroyed))
