"""Where a migration goes: the index and object store a vault will use afterwards.

A target is the ``[index]`` and ``[storage]`` settings the settings file will hold at the
end. Either part may stay as it is (``--to-index`` or ``--to-storage`` alone): then that
part is not copied. Nothing here holds a secret: the PostgreSQL password and the S3 keys
stay in their 0600 files, named by path.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

from pacsvault.config import IndexSettings, Settings, StorageSettings

EMBEDDED, POSTGRESQL = "embedded", "postgresql"
LOCAL, S3 = "local", "s3"


class TargetError(Exception):
    """A target that cannot be used (message is user-facing, never a credential)."""


def index_kind(settings: IndexSettings) -> str:
    return POSTGRESQL if settings.is_postgres else EMBEDDED


def storage_kind(settings: StorageSettings) -> str:
    return S3 if settings.url else LOCAL


def _index_place(settings: IndexSettings) -> str:
    return settings.url or EMBEDDED


def _storage_place(settings: StorageSettings) -> str:
    return json.dumps([settings.url, settings.endpoint]) if settings.url else LOCAL


@dataclass(frozen=True)
class Target:
    index: IndexSettings
    storage: StorageSettings
    moves_index: bool
    moves_storage: bool

    @property
    def index_kind(self) -> str:
        return index_kind(self.index)

    @property
    def storage_kind(self) -> str:
        return storage_kind(self.storage)

    def fingerprint(self) -> str:
        """A digest naming this target in the state file (urls are not stored there)."""
        text = json.dumps([_index_place(self.index), _storage_place(self.storage)])
        return hashlib.sha256(text.encode()).hexdigest()

    def settings(self, current: Settings) -> Settings:
        return current.model_copy(update={"index": self.index, "storage": self.storage})


def choose(current: Settings, *, to_index: str | None, index_password_file: str = "",
           to_storage: str | None, endpoint: str = "", region: str = "",
           credentials_file: str = "", ca_file: str = "",
           path_style: bool | None = None) -> Target:
    """The target named on the command line, against the vault's current settings."""
    if not to_index and not to_storage:
        raise TargetError("say where to migrate: --to-index (postgresql://… or embedded) "
                          "and/or --to-storage (s3://bucket/prefix or local)")
    index = current.index
    if to_index:
        if to_index == EMBEDDED:
            if index_password_file:
                raise TargetError("--index-password-file goes with a postgresql:// index")
            index = IndexSettings()
        else:
            try:
                index = IndexSettings(url=to_index, password_file=index_password_file)
            except ValueError as exc:  # pydantic: the url check's one line
                raise TargetError(_first_message(exc)) from None
    elif index_password_file:
        raise TargetError("--index-password-file goes with --to-index")
    storage = current.storage
    if to_storage:
        update: dict[str, object]
        if to_storage == LOCAL:
            update = {"url": ""}
        else:
            update = {"url": to_storage, "endpoint": endpoint, "region": region,
                      "credentials_file": credentials_file, "ca_file": ca_file}
            if path_style is not None:
                update["path_style"] = path_style
        try:
            storage = StorageSettings.model_validate({**current.storage.model_dump(),
                                                      **update})
        except ValueError as exc:
            raise TargetError(_first_message(exc)) from None
        if storage.url:
            from pacsvault.storage.backends import StorageConfigError, parse_url

            try:
                parse_url(storage.url)
            except StorageConfigError as exc:
                raise TargetError(str(exc)) from None
    moves_index = _index_place(index) != _index_place(current.index)
    moves_storage = _storage_place(storage) != _storage_place(current.storage)
    if not moves_index and not moves_storage:
        raise TargetError("the vault already uses this index and object store; nothing "
                          "to migrate")
    return Target(index, storage, moves_index, moves_storage)


def _first_message(exc: ValueError) -> str:
    errors = getattr(exc, "errors", None)
    if callable(errors):
        found = errors()
        if found:
            text = str(found[0].get("msg", "invalid value"))
            return text.removeprefix("Value error, ")
    return "invalid target"
