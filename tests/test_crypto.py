"""Unit tests of how pacsvault uses its cryptographic primitives (fast, in-process).

Covers the authenticated object format (``pacsvault-obj/1``), the wrapping of per-patient
data keys, and the master key: key file, derived keys and the recovery code.
"""

from __future__ import annotations

import base64
import os
import re
import stat
import struct
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from pacsvault.crypto import datakeys, keys, objects
from pacsvault.crypto.objects import CHUNK_SIZE, HEADER_SIZE, ObjectFormatError

TAG = 16
STEP = CHUNK_SIZE + TAG
MAX_CHUNK = 16 << 20
SOP_UID = "1.2.826.0.1.3680043.8.498.10000000000000000000000000000000001"
OTHER_UID = "1.2.826.0.1.3680043.8.498.10000000000000000000000000000000002"
VAULT_ID = "5f0c6f5e-3d0b-4a43-9d3e-1f7b2c9a8e01"
OTHER_VAULT_ID = "0b7f8a43-2a7e-4c55-8d57-91a2c1e0f7aa"
CODE_RE = re.compile(r"^[A-Z2-7]{4}(-[A-Z2-7]{4}){7}$")


# --- helpers -----------------------------------------------------------------------------


def pattern(n: int) -> bytes:
    """Deterministic, non-repeating-at-chunk-scale plaintext of n bytes."""
    block = bytes(range(251))  # prime length: chunk boundaries never line up with it
    return (block * (n // len(block) + 1))[:n]


def seal(plaintext: bytes | memoryview, data_key: bytes, identity: str = SOP_UID,
         key_id: uuid.UUID | None = None) -> bytes:
    return b"".join(objects.encrypt(plaintext, data_key, key_id or uuid.uuid4(), identity))


def chunks_of(blob: bytes) -> tuple[bytes, list[bytes]]:
    """Split an object into its header and its encrypted chunks (each chunk + tag)."""
    body = blob[HEADER_SIZE:]
    return blob[:HEADER_SIZE], [body[i : i + STEP] for i in range(0, len(body), STEP)]


def flip(blob: bytes, bit: int) -> bytes:
    out = bytearray(blob)
    out[bit // 8] ^= 1 << (bit % 8)
    return bytes(out)


@pytest.fixture(scope="module")
def data_key() -> bytes:
    return datakeys.new_data_key()[1]


@pytest.fixture(scope="module")
def big(data_key: bytes) -> tuple[bytes, bytes]:
    """3.5 chunks of plaintext and its object, shared by the tampering tests."""
    plain = pattern(CHUNK_SIZE * 7 // 2)
    return plain, seal(plain, data_key)


# --- object format: round trips ----------------------------------------------------------


@pytest.mark.parametrize(
    "size",
    [0, 1, CHUNK_SIZE - 1, CHUNK_SIZE, CHUNK_SIZE + 1, 2 * CHUNK_SIZE, CHUNK_SIZE * 7 // 2],
    ids=["empty", "1-byte", "chunk-1", "chunk", "chunk+1", "2-chunks", "3.5-chunks"],
)
def test_object_round_trip(size: int, data_key: bytes) -> None:
    plain = pattern(size)
    key_id = uuid.uuid4()
    blob = seal(plain, data_key, key_id=key_id)
    n_chunks = max(1, -(-size // CHUNK_SIZE))
    assert len(blob) == HEADER_SIZE + size + n_chunks * TAG
    assert blob.startswith(objects.MAGIC)
    header = objects.read_header(blob)
    assert header.key_id == key_id
    assert header.chunk_size == CHUNK_SIZE
    assert objects.decrypt(blob, data_key, SOP_UID) == plain


def test_encrypt_streams_header_then_chunks(data_key: bytes) -> None:
    pieces = list(objects.encrypt(pattern(CHUNK_SIZE * 7 // 2), data_key, uuid.uuid4(), SOP_UID))
    assert [len(p) for p in pieces] == [HEADER_SIZE, STEP, STEP, STEP, CHUNK_SIZE // 2 + TAG]


def test_encrypt_accepts_memoryview(data_key: bytes) -> None:
    plain = pattern(CHUNK_SIZE + 7)
    blob = seal(memoryview(plain), data_key)
    assert objects.decrypt(blob, data_key, SOP_UID) == plain


def test_ciphertext_is_randomised_and_hides_plaintext(data_key: bytes) -> None:
    plain = b"PATIENT^NAME DOE^JOHN " * 5000
    key_id = uuid.uuid4()
    one, two = seal(plain, data_key, key_id=key_id), seal(plain, data_key, key_id=key_id)
    assert one != two  # fresh salt per object: no two objects share a payload key
    assert one[HEADER_SIZE:] != two[HEADER_SIZE:]
    assert b"DOE^JOHN" not in one and b"DOE^JOHN" not in two
    assert objects.decrypt(one, data_key, SOP_UID) == objects.decrypt(two, data_key, SOP_UID)


def test_header_layout(data_key: bytes) -> None:
    key_id = uuid.uuid4()
    blob = seal(b"x", data_key, key_id=key_id)
    magic, kid, salt, chunk = struct.unpack(">16s16s16sI", blob[:HEADER_SIZE])
    assert HEADER_SIZE == 52
    assert magic == b"pacsvault-obj/1\n"
    assert kid == key_id.bytes
    assert len(set(salt)) > 1
    assert chunk == CHUNK_SIZE


# --- object format: tampering ------------------------------------------------------------


def test_every_single_bit_flip_is_detected(data_key: bytes) -> None:
    """Small object: flip each bit of header, ciphertext and tag in turn."""
    blob = seal(b"\x42" * 40, data_key)
    for bit in range(len(blob) * 8):
        with pytest.raises(ObjectFormatError):
            objects.decrypt(flip(blob, bit), data_key, SOP_UID)


@pytest.mark.parametrize(
    "where",
    ["magic", "key-id", "salt", "chunk-size-low", "chunk-size-high", "first-chunk-start",
     "first-chunk-middle", "first-chunk-tag", "second-chunk", "last-chunk-start",
     "last-byte"],
)
def test_bit_flip_in_multi_chunk_object(where: str, big: tuple[bytes, bytes],
                                        data_key: bytes) -> None:
    _, blob = big
    last_start = HEADER_SIZE + 3 * STEP
    offset = {
        "magic": 3,
        "key-id": 20,
        "salt": 40,
        "chunk-size-low": HEADER_SIZE - 1,
        "chunk-size-high": HEADER_SIZE - 4,
        "first-chunk-start": HEADER_SIZE,
        "first-chunk-middle": HEADER_SIZE + CHUNK_SIZE // 2,
        "first-chunk-tag": HEADER_SIZE + CHUNK_SIZE + 3,
        "second-chunk": HEADER_SIZE + STEP + 12345,
        "last-chunk-start": last_start,
        "last-byte": len(blob) - 1,
    }[where]
    for bit in (0, 7):
        with pytest.raises(ObjectFormatError):
            objects.decrypt(flip(blob, offset * 8 + bit), data_key, SOP_UID)


def test_truncation_at_chunk_boundary_is_detected(data_key: bytes) -> None:
    # Exactly two full chunks: dropping the last leaves a well-formed, fully authentic
    # first chunk. Only the "last chunk" flag in the nonce can reveal the truncation.
    blob = seal(pattern(2 * CHUNK_SIZE), data_key)
    header, chunks = chunks_of(blob)
    assert len(chunks) == 2 and all(len(c) == STEP for c in chunks)
    with pytest.raises(ObjectFormatError):
        objects.decrypt(header + chunks[0], data_key, SOP_UID)


def test_dropping_partial_last_chunk_is_detected(big: tuple[bytes, bytes],
                                                 data_key: bytes) -> None:
    _, blob = big
    header, chunks = chunks_of(blob)
    assert len(chunks) == 4
    for keep in (1, 2, 3):
        with pytest.raises(ObjectFormatError):
            objects.decrypt(header + b"".join(chunks[:keep]), data_key, SOP_UID)


@pytest.mark.parametrize("cut", [1, TAG - 1, TAG, TAG + 1, CHUNK_SIZE // 4])
def test_truncation_mid_chunk_is_detected(cut: int, big: tuple[bytes, bytes],
                                          data_key: bytes) -> None:
    _, blob = big
    with pytest.raises(ObjectFormatError):
        objects.decrypt(blob[:-cut], data_key, SOP_UID)


@pytest.mark.parametrize("length", [0, 1, HEADER_SIZE - 1, HEADER_SIZE, HEADER_SIZE + TAG - 1])
def test_truncation_into_header_is_detected(length: int, data_key: bytes) -> None:
    blob = seal(b"", data_key)
    assert len(blob) == HEADER_SIZE + TAG
    with pytest.raises(ObjectFormatError):
        objects.decrypt(blob[:length], data_key, SOP_UID)


def test_appended_chunk_is_detected(big: tuple[bytes, bytes], data_key: bytes) -> None:
    _, blob = big
    _, chunks = chunks_of(blob)
    for extra in (chunks[0], chunks[-1], os.urandom(STEP), os.urandom(TAG), b"\x00"):
        with pytest.raises(ObjectFormatError):
            objects.decrypt(blob + extra, data_key, SOP_UID)


def test_appended_chunk_after_full_chunk_object_is_detected(data_key: bytes) -> None:
    blob = seal(pattern(CHUNK_SIZE), data_key)
    header, chunks = chunks_of(blob)
    with pytest.raises(ObjectFormatError):
        objects.decrypt(header + chunks[0] + chunks[0], data_key, SOP_UID)


def test_swapped_chunks_are_detected(big: tuple[bytes, bytes], data_key: bytes) -> None:
    _, blob = big
    header, chunks = chunks_of(blob)
    for i, j in ((0, 1), (1, 2), (0, 2)):
        swapped = list(chunks)
        swapped[i], swapped[j] = swapped[j], swapped[i]
        with pytest.raises(ObjectFormatError):
            objects.decrypt(header + b"".join(swapped), data_key, SOP_UID)


def test_reordered_last_chunk_is_detected(big: tuple[bytes, bytes], data_key: bytes) -> None:
    _, blob = big
    header, chunks = chunks_of(blob)
    with pytest.raises(ObjectFormatError):
        objects.decrypt(header + chunks[3] + chunks[1] + chunks[2] + chunks[0],
                        data_key, SOP_UID)


def test_wrong_identity_is_detected(data_key: bytes) -> None:
    blob = seal(pattern(1000), data_key, identity=SOP_UID)
    for identity in (OTHER_UID, "", SOP_UID + "0", SOP_UID[:-1]):
        with pytest.raises(ObjectFormatError):
            objects.decrypt(blob, data_key, identity)


def test_swapping_two_objects_files_is_detected(data_key: bytes) -> None:
    """Same data key (same patient), two instances: each file only opens as itself."""
    a = seal(b"instance A", data_key, identity=SOP_UID)
    b = seal(b"instance B", data_key, identity=OTHER_UID)
    with pytest.raises(ObjectFormatError):
        objects.decrypt(b, data_key, SOP_UID)
    with pytest.raises(ObjectFormatError):
        objects.decrypt(a, data_key, OTHER_UID)


def test_splicing_header_of_another_object_is_detected(data_key: bytes) -> None:
    a = seal(pattern(2 * CHUNK_SIZE), data_key)
    b = seal(pattern(2 * CHUNK_SIZE), data_key)
    ha, ca = chunks_of(a)
    hb, cb = chunks_of(b)
    for spliced in (hb + b"".join(ca), ha + cb[0] + ca[1], ha + ca[0] + cb[1]):
        with pytest.raises(ObjectFormatError):
            objects.decrypt(spliced, data_key, SOP_UID)


def test_wrong_data_key_is_detected(big: tuple[bytes, bytes], data_key: bytes) -> None:
    _, blob = big
    other = datakeys.new_data_key()[1]
    with pytest.raises(ObjectFormatError):
        objects.decrypt(blob, other, SOP_UID)
    with pytest.raises(ObjectFormatError):
        objects.decrypt(blob, flip(data_key, 0), SOP_UID)


def test_bad_magic_is_rejected(data_key: bytes) -> None:
    blob = seal(b"payload", data_key)
    for magic in (b"pacsvault-obj/2\n", b"\x00" * 16, b"PK\x03\x04" + b"\x00" * 12):
        with pytest.raises(ObjectFormatError, match="not a pacsvault-obj/1 object"):
            objects.decrypt(magic + blob[16:], data_key, SOP_UID)
    with pytest.raises(ObjectFormatError):
        objects.decrypt(b"\x00" * 200, data_key, SOP_UID)


def _header_with_chunk_size(size: int) -> bytes:
    return struct.pack(">16s16s16sI", objects.MAGIC, uuid.uuid4().bytes, os.urandom(16), size)


@pytest.mark.parametrize("size", [0, MAX_CHUNK + 1, 1 << 31, (1 << 32) - 1])
def test_header_rejects_absurd_chunk_sizes(size: int, data_key: bytes) -> None:
    blob = _header_with_chunk_size(size) + os.urandom(64)
    with pytest.raises(ObjectFormatError, match="chunk size"):
        objects.read_header(blob)
    with pytest.raises(ObjectFormatError):
        objects.decrypt(blob, data_key, SOP_UID)


@pytest.mark.parametrize("size", [1, CHUNK_SIZE, MAX_CHUNK])
def test_header_accepts_sane_chunk_sizes(size: int) -> None:
    assert objects.read_header(_header_with_chunk_size(size)).chunk_size == size


def test_header_rejects_short_input() -> None:
    with pytest.raises(ObjectFormatError):
        objects.read_header(objects.MAGIC)


# --- data keys ---------------------------------------------------------------------------


def test_new_data_keys_are_random() -> None:
    (id1, k1), (id2, k2) = datakeys.new_data_key(), datakeys.new_data_key()
    assert len(k1) == len(k2) == 32
    assert k1 != k2 and id1 != id2


def test_data_key_wrap_round_trip() -> None:
    kek = os.urandom(32)
    key_id, key = datakeys.new_data_key()
    wrapped = datakeys.wrap(kek, key_id, key)
    assert wrapped[0] == datakeys.WRAP_AESGCM_KEK_V1
    assert len(wrapped) == 1 + 12 + 32 + 16
    assert key not in wrapped
    assert datakeys.unwrap(kek, key_id, wrapped) == key
    assert datakeys.wrap(kek, key_id, key) != wrapped  # fresh nonce each time


def test_data_key_wrong_kek_fails() -> None:
    kek = os.urandom(32)
    key_id, key = datakeys.new_data_key()
    wrapped = datakeys.wrap(kek, key_id, key)
    with pytest.raises(datakeys.DataKeyError):
        datakeys.unwrap(os.urandom(32), key_id, wrapped)


def test_data_key_wrong_key_id_fails() -> None:
    """The key id is associated data: a wrapped key moved to another row does not open."""
    kek = os.urandom(32)
    key_id, key = datakeys.new_data_key()
    wrapped = datakeys.wrap(kek, key_id, key)
    with pytest.raises(datakeys.DataKeyError):
        datakeys.unwrap(kek, uuid.uuid4(), wrapped)


def test_data_key_tampered_or_unknown_wrapping_fails() -> None:
    kek = os.urandom(32)
    key_id, key = datakeys.new_data_key()
    wrapped = datakeys.wrap(kek, key_id, key)
    for bad in (b"", bytes([2]) + wrapped[1:], wrapped[:-1], flip(wrapped, 8 * 20),
                wrapped + b"\x00"):
        with pytest.raises(datakeys.DataKeyError):
            datakeys.unwrap(kek, key_id, bad)


def test_kek_is_the_vault_derived_key() -> None:
    """Data keys wrapped under one vault's KEK do not open under another vault's."""
    master = keys.MasterKey.generate()
    key_id, key = datakeys.new_data_key()
    wrapped = datakeys.wrap(master.derive(keys.PURPOSE_KEK, VAULT_ID), key_id, key)
    assert datakeys.unwrap(master.derive(keys.PURPOSE_KEK, VAULT_ID), key_id, wrapped) == key
    for kek in (master.derive(keys.PURPOSE_KEK, OTHER_VAULT_ID),
                master.derive(keys.PURPOSE_INDEX, VAULT_ID),
                keys.MasterKey.generate().derive(keys.PURPOSE_KEK, VAULT_ID)):
        with pytest.raises(datakeys.DataKeyError):
            datakeys.unwrap(kek, key_id, wrapped)


# --- master key and key file -------------------------------------------------------------


@pytest.fixture
def umask0() -> Iterator[None]:
    old = os.umask(0)
    try:
        yield
    finally:
        os.umask(old)


@pytest.mark.usefixtures("umask0")
def test_key_file_created_0600_even_with_permissive_umask(tmp_path: Path) -> None:
    path = tmp_path / "keys" / "sub" / "master.key"
    master = keys.MasterKey.generate()
    keys.write_key_file(path, master, VAULT_ID)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    assert path.read_text().splitlines()[0] == keys.KEY_FILE_HEADER
    loaded, vault_id = keys.read_key_file(path)
    assert loaded == master
    assert vault_id == VAULT_ID


def test_key_file_never_overwritten(tmp_path: Path) -> None:
    path = tmp_path / "master.key"
    keys.write_key_file(path, keys.MasterKey.generate(), VAULT_ID)
    before = path.read_bytes()
    with pytest.raises(FileExistsError):
        keys.write_key_file(path, keys.MasterKey.generate(), VAULT_ID)
    assert path.read_bytes() == before


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o644, 0o660, 0o700 | 0o040, 0o602])
def test_key_file_readable_by_others_is_refused(tmp_path: Path, mode: int) -> None:
    path = tmp_path / "master.key"
    keys.write_key_file(path, keys.MasterKey.generate(), VAULT_ID)
    path.chmod(mode)
    with pytest.raises(keys.VaultKeyError, match="chmod 600") as info:
        keys.read_key_file(path)
    assert str(path) in str(info.value)


@pytest.mark.parametrize("mode", [0o600, 0o400])
def test_key_file_owner_only_modes_accepted(tmp_path: Path, mode: int) -> None:
    path = tmp_path / "master.key"
    master = keys.MasterKey.generate()
    keys.write_key_file(path, master, VAULT_ID)
    path.chmod(mode)
    assert keys.read_key_file(path) == (master, VAULT_ID)


def test_missing_key_file_message(tmp_path: Path) -> None:
    with pytest.raises(keys.VaultKeyError, match="key recover"):
        keys.read_key_file(tmp_path / "absent.key")


def _valid_body(master: keys.MasterKey) -> str:
    return (f"{keys.KEY_FILE_HEADER}\nvault={VAULT_ID}\n"
            f"key={base64.b64encode(master.raw).decode()}\n")


DAMAGED = {
    "empty": "",
    "garbage": "hello world\n",
    "binary": "\x00\x01\x02\xff",
    "other-header": "pacsvault-master-key/v9\nvault=x\nkey=AAAA\n",
    "no-key-line": f"{keys.KEY_FILE_HEADER}\nvault={VAULT_ID}\n",
    "no-vault-line": f"{keys.KEY_FILE_HEADER}\nkey={base64.b64encode(bytes(32)).decode()}\n",
    "empty-key": f"{keys.KEY_FILE_HEADER}\nvault={VAULT_ID}\nkey=\n",
    "short-key": f"{keys.KEY_FILE_HEADER}\nvault={VAULT_ID}\n"
                 f"key={base64.b64encode(bytes(16)).decode()}\n",
    "long-key": f"{keys.KEY_FILE_HEADER}\nvault={VAULT_ID}\n"
                f"key={base64.b64encode(bytes(33)).decode()}\n",
    "not-base64": f"{keys.KEY_FILE_HEADER}\nvault={VAULT_ID}\nkey=!!!!not*base64!!!!\n",
    "cut-base64": f"{keys.KEY_FILE_HEADER}\nvault={VAULT_ID}\n"
                  f"key={base64.b64encode(bytes(32)).decode()[:-3]}\n",
}


@pytest.mark.parametrize("name", sorted(DAMAGED))
def test_damaged_key_file_gives_clear_error(tmp_path: Path, name: str) -> None:
    path = tmp_path / "master.key"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    os.write(fd, DAMAGED[name].encode("latin-1"))
    os.close(fd)
    with pytest.raises(keys.VaultKeyError) as info:
        keys.read_key_file(path)
    message = str(info.value)
    assert str(path) in message
    assert "not a pacsvault key file" in message or "damaged" in message


def test_well_formed_key_file_parses(tmp_path: Path) -> None:
    path = tmp_path / "master.key"
    master = keys.MasterKey.generate()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    os.write(fd, _valid_body(master).encode())
    os.close(fd)
    assert keys.read_key_file(path) == (master, VAULT_ID)


def test_master_key_must_be_32_bytes() -> None:
    for n in (0, 16, 31, 33, 64):
        with pytest.raises(keys.VaultKeyError):
            keys.MasterKey(bytes(n))
    assert keys.MasterKey.generate() != keys.MasterKey.generate()


def test_master_key_repr_hides_the_key() -> None:
    master = keys.MasterKey(bytes(range(32)))
    secrets_forms = [
        master.raw.hex(), master.raw.hex().upper(), repr(master.raw),
        base64.b64encode(master.raw).decode(), "\\x00\\x01\\x02",
    ]
    for text in (repr(master), str(master), f"{master}", f"{master!r}", repr([master]),
                 repr({"k": master})):
        assert "redacted" in text
        for form in secrets_forms:
            assert form not in text


# --- derived keys ------------------------------------------------------------------------

PURPOSES = [keys.PURPOSE_INDEX, keys.PURPOSE_KEK, keys.PURPOSE_CHECK, keys.PURPOSE_TLS,
            keys.PURPOSE_EVENTS]


def test_derived_keys_differ_by_purpose_and_vault() -> None:
    master = keys.MasterKey.generate()
    derived = {(p, v): master.derive(p, v) for p in PURPOSES for v in (VAULT_ID, OTHER_VAULT_ID)}
    assert len(set(derived.values())) == len(derived)
    assert all(len(k) == 32 for k in derived.values())
    assert master.raw not in derived.values()


def test_derived_keys_are_deterministic_and_depend_on_master() -> None:
    raw = os.urandom(32)
    one, two = keys.MasterKey(raw), keys.MasterKey(raw)
    for p in PURPOSES:
        assert one.derive(p, VAULT_ID) == two.derive(p, VAULT_ID)
        assert one.derive(p, VAULT_ID) != keys.MasterKey.generate().derive(p, VAULT_ID)
    assert len(one.derive(keys.PURPOSE_INDEX, VAULT_ID, length=64)) == 64


def test_purpose_labels_are_distinct_and_versioned() -> None:
    assert len(set(PURPOSES)) == len(PURPOSES)
    assert all(p.startswith("pacsvault/v1/") for p in PURPOSES)


def test_key_check() -> None:
    master = keys.MasterKey.generate()
    check = keys.make_key_check(master, VAULT_ID)
    assert keys.verify_key_check(master, VAULT_ID, check)
    assert keys.make_key_check(master, VAULT_ID) != check  # random nonce
    assert not keys.verify_key_check(keys.MasterKey.generate(), VAULT_ID, check)
    assert not keys.verify_key_check(master, OTHER_VAULT_ID, check)
    assert master.raw.hex() not in check
    assert base64.b64encode(master.raw).decode() not in check


# --- recovery code -----------------------------------------------------------------------


def test_recovery_code_format() -> None:
    codes = {keys.new_recovery_code() for _ in range(50)}
    assert len(codes) == 50
    for code in codes:
        assert CODE_RE.match(code), code


@pytest.fixture(scope="module")
def sealed() -> tuple[keys.MasterKey, str, dict[str, str]]:
    master = keys.MasterKey.generate()
    code = keys.new_recovery_code()
    return master, code, keys.wrap_for_recovery(master, code, VAULT_ID)


def test_recovery_round_trip(sealed: tuple[keys.MasterKey, str, dict[str, str]]) -> None:
    master, code, blob = sealed
    assert set(blob) == {"kdf", "salt", "sealed"}
    assert blob["kdf"].startswith("scrypt")
    text = repr(blob)
    assert base64.b64encode(master.raw).decode() not in text
    assert code not in text and code.replace("-", "") not in text
    assert keys.unwrap_with_recovery(blob, code, VAULT_ID) == master


def test_recovery_wrapping_is_salted() -> None:
    master = keys.MasterKey.generate()
    code = keys.new_recovery_code()
    a = keys.wrap_for_recovery(master, code, VAULT_ID)
    b = keys.wrap_for_recovery(master, code, VAULT_ID)
    assert a["salt"] != b["salt"] and a["sealed"] != b["sealed"]


def test_wrong_recovery_code_fails(sealed: tuple[keys.MasterKey, str, dict[str, str]]) -> None:
    _, code, blob = sealed
    one_char_off = code[:-1] + ("A" if code[-1] != "A" else "B")
    for wrong in (keys.new_recovery_code(), one_char_off, code[:-5], ""):
        with pytest.raises(keys.VaultKeyError, match="does not open this vault"):
            keys.unwrap_with_recovery(blob, wrong, VAULT_ID)


def test_recovery_bound_to_vault_id(sealed: tuple[keys.MasterKey, str, dict[str, str]]) -> None:
    _, code, blob = sealed
    with pytest.raises(keys.VaultKeyError):
        keys.unwrap_with_recovery(blob, code, OTHER_VAULT_ID)


def test_tampered_recovery_blob_fails(sealed: tuple[keys.MasterKey, str, dict[str, str]]) -> None:
    _, code, blob = sealed
    raw = base64.b64decode(blob["sealed"])
    bad = {**blob, "sealed": base64.b64encode(flip(raw, 8 * 20)).decode()}
    with pytest.raises(keys.VaultKeyError):
        keys.unwrap_with_recovery(bad, code, VAULT_ID)


@pytest.mark.parametrize(
    "variant",
    ["lower", "no-dashes", "lower-no-dashes", "spaces", "surrounding-whitespace",
     "trailing-newline", "mixed"],
)
def test_recovery_code_normalisation(
    variant: str, sealed: tuple[keys.MasterKey, str, dict[str, str]]
) -> None:
    master, code, blob = sealed
    typed = {
        "lower": code.lower(),
        "no-dashes": code.replace("-", ""),
        "lower-no-dashes": code.replace("-", "").lower(),
        "spaces": code.replace("-", " "),
        "surrounding-whitespace": f"  {code}\t ",
        "trailing-newline": code + "\n",
        "mixed": "".join(c.lower() if i % 2 else c for i, c in enumerate(code)).replace(
            "-", " - "),
    }[variant]
    assert keys.unwrap_with_recovery(blob, typed, VAULT_ID) == master


def test_non_ascii_recovery_code_is_a_wrong_code(
    sealed: tuple[keys.MasterKey, str, dict[str, str]],
) -> None:
    _, code, blob = sealed
    with pytest.raises(keys.VaultKeyError):
        keys.unwrap_with_recovery(blob, code[:-1] + "É", VAULT_ID)
