"""The sealed journals and HPKE data keys in isolation (no server): records open only with
the private key, in their place and order; a record cut short by a crash is ignored."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from pacsvault.crypto import datakeys
from pacsvault.sealed import journal


def _write(tmp_path: Path, private: X25519PrivateKey, n: int) -> tuple[Path, str]:
    directory = tmp_path / "journal"
    session = journal.new_session()
    writer = journal.JournalWriter(directory, session, journal.STORES, private.public_key())
    for i in range(n):
        writer.append({"i": i, "name": "Quetzal^Bartholomew"})
    writer.close()
    return directory, session


def test_records_round_trip_and_say_nothing_in_clear(tmp_path: Path) -> None:
    private = X25519PrivateKey.generate()
    directory, session = _write(tmp_path, private, 3)
    assert [r["i"] for r in journal.read(directory, session, journal.STORES, private)] \
        == [0, 1, 2]
    raw = (directory / f"{session}.{journal.STORES}").read_bytes()
    assert b"Quetzal" not in raw and b"Bartholomew" not in raw
    assert journal.sessions(directory) == [session]
    with pytest.raises(journal.JournalError):
        list(journal.read(directory, session, journal.STORES, X25519PrivateKey.generate()))


def test_a_torn_last_record_is_ignored_and_a_reordered_one_refused(tmp_path: Path) -> None:
    private = X25519PrivateKey.generate()
    directory, session = _write(tmp_path, private, 3)
    path = directory / f"{session}.{journal.STORES}"
    data = path.read_bytes()
    path.write_bytes(data[:-7])  # kill -9 in the middle of the last write
    assert [r["i"] for r in journal.read(directory, session, journal.STORES, private)] \
        == [0, 1]
    first = int.from_bytes(data[:4], "big") + 4
    second = int.from_bytes(data[first:first + 4], "big") + 4
    path.write_bytes(data[first:first + second] + data[:first])  # swapped
    with pytest.raises(journal.JournalError):
        list(journal.read(directory, session, journal.STORES, private))


def test_hpke_data_key_is_bound_to_its_id(tmp_path: Path) -> None:
    private = X25519PrivateKey.generate()
    key_id, key = datakeys.new_data_key()
    wrapped = datakeys.wrap_sealed(private.public_key(), key_id, key)
    assert wrapped[0] == datakeys.WRAP_HPKE_X25519_V1
    assert datakeys.unwrap_sealed(private, key_id, wrapped) == key
    with pytest.raises(datakeys.DataKeyError):
        datakeys.unwrap_sealed(private, uuid.uuid4(), wrapped)
    with pytest.raises(datakeys.DataKeyError):  # not an algorithm-1 key either
        datakeys.unwrap(b"\0" * 32, key_id, wrapped)


def test_a_damaged_record_is_reported_and_skipped_when_asked(tmp_path: Path) -> None:
    private = X25519PrivateKey.generate()
    directory, session = _write(tmp_path, private, 3)
    path = directory / f"{session}.{journal.STORES}"
    data = bytearray(path.read_bytes())
    first = int.from_bytes(data[:4], "big") + 4
    data[first + 40] ^= 0x01  # one bit of the second record's ciphertext
    path.write_bytes(bytes(data))
    with pytest.raises(journal.JournalError):
        list(journal.read(directory, session, journal.STORES, private))
    damaged: list[int] = []
    found = list(journal.read(directory, session, journal.STORES, private, damaged.append))
    assert [r["i"] for r in found] == [0, 2] and damaged == [1]
