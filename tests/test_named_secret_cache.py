"""``Vault.named_secret`` reads ``vault.json`` once per open, not once per secret (issue 15).

Why: every open asks for several named secrets (sealed material's two keys, erasure,
backups); each used to parse ``vault.json`` again. The cached table must still follow
every change: an ``update_meta``/``set_named_secret`` of this process, and a replacement
of the file by another process (a CLI command while ``serve`` runs).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pacsvault import vaultfile, vaultsecrets
from pacsvault.crypto import keys
from pacsvault.fsutil import write_atomic
from tests.helpers import VaultDir


def _count_reads(monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    reads: list[Path] = []
    real = vaultsecrets._read

    def counting(meta: Path) -> dict[str, object]:
        reads.append(meta)
        return real(meta)

    monkeypatch.setattr(vaultsecrets, "_read", counting)
    return reads


def test_named_secrets_read_vault_json_once(vault: VaultDir,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    opened = vault.open()
    try:
        reads = _count_reads(monkeypatch)
        first = [opened.named_secret(name) for name in ("a-secret", "b-secret")]
        reads.clear()  # making them wrote vault.json (update_meta): read again once
        again = [opened.named_secret(name) for name in ("a-secret", "b-secret", "a-secret")]
        assert again[:2] == first and again[2] == first[0]
        assert len(reads) == 1, reads
    finally:
        opened.close()


def test_cache_follows_this_process_and_others(vault: VaultDir,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    opened = vault.open()
    try:
        old = opened.named_secret("c-secret")
        opened.set_named_secret("c-secret", b"\x01" * 32)  # this process
        assert opened.named_secret("c-secret") == b"\x01" * 32
        assert old != b"\x01" * 32

        # another process replaces vault.json (same write path as update_meta)
        other = vault.open()
        try:
            blob = keys.wrap_secret(other._master, other.vault_id, "c-secret", b"\x02" * 32)
        finally:
            other.close()
        meta = json.loads(opened.layout.meta.read_text("utf-8"))
        meta["secrets"]["c-secret"] = blob
        generation = vaultfile.generation()
        write_atomic(opened.layout.meta, json.dumps(meta, indent=2).encode("utf-8"))
        assert vaultfile.generation() == generation  # unseen by the counter
        assert opened.named_secret("c-secret") == b"\x02" * 32
    finally:
        opened.close()
