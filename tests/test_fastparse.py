"""Issue 17: ``parse.read_received`` decodes plain received objects with ``fastparse``
instead of pydicom. Nothing may change: for every file (pydicom's test files, the test
corpus, the fixtures, the bench generator's filler and CT images, implicit VR copies of
them) and for hostile cuts
and edits of them, ``describe(read_received(raw))`` gives the same ``ParsedInstance``
(every field, the stored DICOM JSON byte for byte) or the same refusal (type and message)
as ``describe(read(raw))``, and ``identity`` the same answer. And the fast path must
really be taken for the common cases, or this proves nothing.
"""

from __future__ import annotations

import contextlib
import io
import random
import struct
from pathlib import Path
from typing import cast

import pydicom
import pytest

from pacsvault.dicomfile import fastparse, parse
from tests import corpus


def _outcome(fn: object, raw: bytes) -> tuple[str, object]:
    try:
        result = fn(raw)  # type: ignore[operator]
    except Exception as exc:
        return type(exc).__name__, str(exc)
    return "ok", dict(vars(result)) if isinstance(result, parse.ParsedInstance) else result


def _old(raw: bytes) -> parse.ParsedInstance:
    return parse.describe(parse.read(raw), raw)


def _new(raw: bytes) -> parse.ParsedInstance:
    return parse.describe(parse.read_received(raw), raw)


def _old_identity(raw: bytes) -> tuple[str, str] | None:
    return parse.identity(parse.read(raw))


def _new_identity(raw: bytes) -> tuple[str, str] | None:
    return parse.identity(parse.read_received(raw))


def _testdata(name: str) -> Path:
    return Path(cast(str, pydicom.data.get_testdata_file(name)))


def _fast(raw: bytes) -> bool:
    return fastparse.walk(raw, parse._WANTED) is not None


def _same(raw: bytes, label: str = "") -> str:
    """Both paths agree on ``raw``; the outcome's kind ("ok" or the exception name)."""
    expected, got = _outcome(_old, raw), _outcome(_new, raw)
    assert got == expected, label
    assert _outcome(_new_identity, raw) == _outcome(_old_identity, raw), label
    return got[0]


def _pydicom_files() -> list[Path]:
    return sorted(Path(p) for p in pydicom.data.get_testdata_files()
                  if Path(p).is_file() and Path(p).stat().st_size < 20_000_000)


def test_every_pydicom_test_file_and_fixture_gives_the_same_answer() -> None:
    fixtures = sorted(Path(__file__).parent.joinpath("fixtures").rglob("*.dcm"))
    paths = _pydicom_files() + fixtures
    taken = 0
    for path in paths:
        raw = path.read_bytes()
        _same(raw, path.name)
        taken += _fast(raw)
    assert len(paths) > 80
    assert taken > 40, taken  # most explicit VR little endian files go the fast way


def test_the_corpus_gives_the_same_answer_the_explicit_ones_fast(tmp_path: Path) -> None:
    files = corpus.build(tmp_path)
    for f in files:
        raw = f.path.read_bytes()
        assert _same(raw, f.path.name) == "ok"
        plain = f.transfer_syntax != pydicom.uid.DeflatedExplicitVRLittleEndian
        assert _fast(raw) == plain, f.path.name


@pytest.mark.parametrize(("charset", "name", "fast"), [
    ("ISO_IR 192", "Zorglub^Hélène=山田^太郎", True), ("ISO_IR 100", "Müller^Zoë", True),
    ("ISO_IR 192", "Bad^Utf", False), ("ISO_IR 144", "Ivanov", False)])
def test_character_sets(tmp_path: Path, charset: str, name: str, fast: bool) -> None:
    """The two character sets the walk decodes, invalid UTF-8 (pydicom replaces it with
    a warning: the walk declines) and another set (declined)."""
    ds = pydicom.dcmread(_testdata("CT_small.dcm"))
    ds.SpecificCharacterSet = charset
    ds.PatientName = name
    ds.StudyDescription = name.replace("^", " ")
    ds.save_as(tmp_path / "x.dcm", enforce_file_format=True)
    raw = (tmp_path / "x.dcm").read_bytes()
    if name == "Bad^Utf":
        raw = raw.replace(b"Bad^Utf", b"Bad^\xff\xfe\xfd")
    assert _same(raw) == "ok"
    assert _fast(raw) == fast


@pytest.fixture(scope="module")
def bench_images(tmp_path_factory: pytest.TempPathFactory) -> list[bytes]:
    from bench.compare import filler_cpu

    out = tmp_path_factory.mktemp("fastparse-bench")
    files = filler_cpu.files_for(out, 6) + filler_cpu.files_for(out, 3, "ct")
    return [p.read_bytes() for p in files]


def test_the_bench_images_go_the_fast_way_with_the_same_answer(
        bench_images: list[bytes]) -> None:
    for i, raw in enumerate(bench_images):
        assert _fast(raw), i
        assert _same(raw, str(i)) == "ok"
    record = _new(bench_images[0])
    assert record.patient_name and record.rows == 64 and record.meta_json.startswith("{")


def _implicit(raw: bytes) -> bytes:
    """An explicit VR little endian stream re-encoded as implicit VR little endian."""
    ds = pydicom.dcmread(io.BytesIO(raw))
    ds.file_meta.TransferSyntaxUID = pydicom.uid.ImplicitVRLittleEndian
    out = io.BytesIO()
    ds.save_as(out, implicit_vr=True, little_endian=True, enforce_file_format=True)
    return out.getvalue()


def _implicit_copy(raw: bytes) -> bytes | None:
    """``_implicit`` of an explicit VR little endian stream pydicom can re-encode."""
    with contextlib.suppress(Exception):  # some of pydicom's odd test files it cannot
        ds = pydicom.dcmread(io.BytesIO(raw), stop_before_pixels=True)
        if ds.file_meta.TransferSyntaxUID == pydicom.uid.ExplicitVRLittleEndian:
            return _implicit(raw)
    return None


def test_implicit_vr_copies_give_the_same_answer(bench_images: list[bytes]) -> None:
    """Implicit VR: VRs from the dictionaries (private ones through their creator),
    Pixel Data and the US-or-SS attributes corrected as pydicom does, or declined."""
    taken = 0
    sources = [p.read_bytes() for p in _pydicom_files() if p.suffix == ".dcm"]
    for raw in [*bench_images, *sources]:
        copy = _implicit_copy(raw)
        if copy is not None:
            _same(copy)
            taken += _fast(copy)
    assert taken > 15, taken
    assert all(_fast(_implicit(raw)) for raw in bench_images)


def _sequences_file() -> bytes:
    """A pydicom test file the fast path takes, with sequences of undefined length."""
    for path in _pydicom_files():
        raw = path.read_bytes()
        if len(raw) < 300_000 and b"\xfe\xff\xdd\xe0" in raw and _fast(raw):
            return raw
    raise AssertionError("no such file")


def _header_end(raw: bytes) -> int:
    pixel = raw.find(b"\xe0\x7f\x10\x00")
    return pixel + 12 if pixel > 0 else len(raw)


def test_truncated_anywhere_same_answer(bench_images: list[bytes]) -> None:
    for raw in (bench_images[0], _sequences_file(), _implicit(bench_images[-1])):
        step = max(1, len(raw) // 600)
        kinds = {_same(raw[:cut], f"cut {cut}") for cut in range(0, len(raw), step)}
        assert "UnreadableObject" in kinds


def test_edited_lengths_and_bytes_same_answer(bench_images: list[bytes]) -> None:
    """Every 2- and 4-byte window of the header overwritten with huge, odd, off-by-one
    values (element lengths, item lengths, tags, VRs hit in turn), then 1,000 random edits
    (which found two differences while this was written: a UID's trailing control
    character, which pydicom strips, and an IS of a lone vertical tab, which it keeps)."""
    taken = 0
    implicit = _testdata("MR_small_implicit.dcm").read_bytes()
    assert _fast(implicit)
    for raw in (bench_images[0], bench_images[-1], _sequences_file(),
                _implicit(bench_images[0]), implicit):
        end = min(_header_end(raw), 132 + 800)
        for pos in range(132, end - 4, 2):
            (word,) = struct.unpack_from("<H", raw, pos)
            (long,) = struct.unpack_from("<L", raw, pos)
            for patch in (b"\xff\xff", struct.pack("<H", (word + 1) & 0xFFFF),
                          b"\xff\xff\xff\xff", struct.pack("<L", (long + 1) & 0xFFFFFFFF)):
                edited = raw[:pos] + patch + raw[pos + len(patch):]
                _same(edited, f"{pos} {patch!r}")
                taken += _fast(edited)
    assert taken > 100  # some edits (of values) still go the fast way
    rng = random.Random(17)
    # sequences; private tags read through their creator, implicit VR
    ct_implicit = _implicit(_testdata("CT_small.dcm").read_bytes())
    assert _fast(ct_implicit)
    for raw in (_sequences_file(), ct_implicit):
        for i in range(500):  # was 1,000 per file (15 s CPU); the windows above are systematic
            changed = bytearray(raw)
            for _ in range(rng.randint(1, 4)):
                changed[rng.randrange(132, _header_end(raw))] = rng.randrange(256)
            _same(bytes(changed), f"random {i}")


def test_unusual_streams_fall_back() -> None:
    ct = _testdata("CT_small.dcm").read_bytes()
    assert _fast(ct)
    deflated = _testdata("image_dfl.dcm").read_bytes()
    big = _testdata("MR_small_bigendian.dcm").read_bytes()
    for raw in (deflated, big, ct[:-3], ct + b"\0\0\0", b"", ct[:132]):
        assert not _fast(raw)
        _same(raw)
