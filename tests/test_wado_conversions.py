"""WADO-RS conversions against the real server (issue 13, defects 2, 5 and 6).

- Defect 2: an Explicit VR Big Endian object asked for as Explicit VR Little Endian came
  back as a 200 with a truncated body; its frames and rendering must work too.
- Defect 5: frames of an uncompressed YBR_FULL_422 image were "not found" (the frame size
  was computed as three full samples per pixel; 4:2:2 holds two per pixel).
- Defect 6: a conversion that fails must never give a truncated 200: 406 for one instance,
  and a complete multipart without the unconvertible instance for a series.

The objects are stored through STOW-RS as raw Part 10 bytes (so the Big Endian one keeps
its encoding byte for byte) into one vault served by the real ``pacsvault serve``.
"""

from __future__ import annotations

import io
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import requests
from PIL import Image
from pydicom import dcmread
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pydicom.encaps import encapsulate
from pydicom.pixels.utils import get_expected_length
from pydicom.uid import (
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    generate_uid,
)

from tests.helpers import Server, VaultDir, events, make_vault, start_server

pytestmark = pytest.mark.slow

PHYSICIAN, PHYSICIAN_PW = "drwado", "amber-canyon-thistle-58-gentle-harbor"
STOW_TYPE = 'multipart/related; type="application/dicom"; boundary=pvconv'
AS_LE = f'multipart/related; type="application/dicom"; transfer-syntax={ExplicitVRLittleEndian}'
YBR_FRAMES = 3


@dataclass
class Env:
    vault: VaultDir
    server: Server
    token: str
    sessions: list[requests.Session] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.server.https_port}/dicom-web"

    def session(self) -> requests.Session:
        s = requests.Session()
        s.trust_env = False
        s.verify = str(self.vault.data / "tls" / "ca.crt")
        s.headers["Authorization"] = f"Bearer {self.token}"
        self.sessions.append(s)
        return s

    def store(self, raw: bytes) -> None:
        body = (b"--pvconv\r\nContent-Type: application/dicom\r\n\r\n" + raw
                + b"\r\n--pvconv--\r\n")
        res = self.session().post(f"{self.url}/studies", data=body,
                                  headers={"Content-Type": STOW_TYPE})
        assert res.status_code == 200, (res.status_code, res.text)


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    root = tmp_path_factory.mktemp("wadoconv")
    vault = make_vault(root / "v")
    v = vault.open()
    try:
        v.accounts.add_user(PHYSICIAN, ["physician"], PHYSICIAN_PW)
        token = v.accounts.create_token(PHYSICIAN, "1d").token
    finally:
        v.close()
    server = start_server(vault)
    try:
        env = Env(vault, server, token)
        yield env
        for s in env.sessions:
            s.close()
    finally:
        server.stop()


def _part10(ds: Dataset) -> bytes:
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def _parts(res: requests.Response) -> list[bytes]:
    """The parts of a complete multipart/related answer (closing delimiter checked: a
    truncated body fails here)."""
    assert res.status_code == 200, (res.status_code, res.text[:200])
    boundary = re.search(r"boundary=\"?([^\";]+)", res.headers["content-type"])
    assert boundary is not None
    dash = b"--" + boundary.group(1).encode()
    body = res.content
    end = b"\r\n" + dash + b"--\r\n"
    assert body.startswith(dash) and body.endswith(end), "truncated multipart body"
    return [chunk.partition(b"\r\n\r\n")[2]
            for chunk in body[len(dash):-len(end)].split(b"\r\n" + dash)]


def _instance_url(env: Env, ds: Dataset) -> str:
    return (f"{env.url}/studies/{ds.StudyInstanceUID}/series/{ds.SeriesInstanceUID}"
            f"/instances/{ds.SOPInstanceUID}")


# --- defect 2: Explicit VR Big Endian ---------------------------------------------------------


def test_big_endian_as_explicit_little_endian_frames_and_rendered(env: Env) -> None:
    path = get_testdata_file("MR_small_bigendian.dcm")
    assert path is not None
    raw = Path(path).read_bytes()
    original = dcmread(io.BytesIO(raw))
    assert original.file_meta.TransferSyntaxUID == ExplicitVRBigEndian
    env.store(raw)
    s = env.session()
    url = _instance_url(env, original)

    # As stored: byte for byte.
    res = s.get(url, headers={"Accept": 'multipart/related; type="application/dicom"'})
    assert _parts(res) == [raw]

    # As Explicit VR Little Endian: complete, every element equal, pixels swapped right.
    res = s.get(url, headers={"Accept": AS_LE})
    (part,) = _parts(res)
    back = dcmread(io.BytesIO(part))
    assert back.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
    assert [e.tag for e in back] == [e.tag for e in original]
    for elem in original:
        if elem.tag != 0x7FE00010:
            assert back[elem.tag].value == elem.value, elem.tag
    assert back.pixel_array.dtype == original.pixel_array.dtype.newbyteorder("<")
    assert np.array_equal(back.pixel_array, original.pixel_array)
    le_pixels = original.pixel_array.astype(original.pixel_array.dtype.newbyteorder("<"))
    assert back.PixelData == le_pixels.tobytes()

    # Frames: little endian pixel bytes.
    res = s.get(f"{url}/frames/1",
                headers={"Accept": 'multipart/related; type="application/octet-stream"'})
    assert _parts(res) == [le_pixels.tobytes()]
    # Pixel data through its BulkDataURI: the same bytes.
    res = s.get(f"{url}/bulkdata/7FE00010",
                headers={"Accept": 'multipart/related; type="application/octet-stream"'})
    assert _parts(res) == [le_pixels.tobytes()]

    # Rendered: a real image.
    res = s.get(f"{url}/rendered", headers={"Accept": "image/png"})
    assert res.status_code == 200, res.text
    assert Image.open(io.BytesIO(res.content)).size == (original.Columns, original.Rows)


# --- defect 5: uncompressed YBR_FULL_422 frames --------------------------------------------


def _ybr_422_multiframe() -> tuple[Dataset, list[bytes]]:
    path = get_testdata_file("SC_ybr_full_422_uncompressed.dcm")
    assert path is not None
    ds = dcmread(path)
    assert ds.PhotometricInterpretation == "YBR_FULL_422"
    frame = bytes(ds.PixelData)
    assert len(frame) == ds.Rows * ds.Columns * 2  # 4:2:2: two bytes per pixel at 8 bits
    frames = [frame] + [bytes((b + 37 * n) % 256 for b in frame)
                        for n in range(1, YBR_FRAMES)]
    ds.PixelData = b"".join(frames)
    ds.NumberOfFrames = YBR_FRAMES
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    return ds, frames


def test_ybr_full_422_frames_and_rendered(env: Env) -> None:
    ds, frames = _ybr_422_multiframe()
    env.store(_part10(ds))
    s = env.session()
    url = _instance_url(env, ds)
    for n in (1, YBR_FRAMES):
        res = s.get(f"{url}/frames/{n}",
                    headers={"Accept": 'multipart/related; type="application/octet-stream"'})
        assert _parts(res) == [frames[n - 1]], n
    res = s.get(f"{url}/frames/1,{YBR_FRAMES}",
                headers={"Accept": "multipart/related; type=\"application/octet-stream\"; "
                         "transfer-syntax=*"})
    assert _parts(res) == [frames[0], frames[-1]]
    res = s.get(f"{url}/frames/{YBR_FRAMES + 1}",
                headers={"Accept": 'multipart/related; type="application/octet-stream"'})
    assert res.status_code == 404
    # Rendered losslessly (PNG): pydicom's own RGB of that frame.
    res = s.get(f"{url}/frames/{YBR_FRAMES}/rendered", headers={"Accept": "image/png"})
    assert res.status_code == 200, res.text
    rendered = np.asarray(Image.open(io.BytesIO(res.content)).convert("RGB"))
    part10 = dcmread(io.BytesIO(_part10(ds)))
    assert np.array_equal(rendered, part10.pixel_array[YBR_FRAMES - 1])
    for resource in (f"frames/{YBR_FRAMES}/rendered", "rendered", "thumbnail"):
        res = s.get(f"{url}/{resource}", headers={"Accept": "image/jpeg"})
        assert res.status_code == 200, (resource, res.text)
        image = Image.open(io.BytesIO(res.content))
        assert image.mode == "RGB", resource


# --- defect 6: conversion failures before the status line ----------------------------------


def _corrupt_j2k(study: str, series: str) -> Dataset:
    path = get_testdata_file("MR_small_jp2klossless.dcm")
    assert path is not None
    ds = dcmread(path)
    ds.PixelData = encapsulate([b"\xff\x4f\xff\x51" + bytes(range(256)) * 8])
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    return ds


def test_undecodable_pixels_never_give_a_truncated_200(env: Env) -> None:
    study, series = generate_uid(), generate_uid()
    bad = _corrupt_j2k(study, series)
    good_path = get_testdata_file("MR_small_jp2klossless.dcm")
    assert good_path is not None
    good = dcmread(good_path)
    good.StudyInstanceUID, good.SeriesInstanceUID = study, series
    good.SOPInstanceUID = good.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    env.store(_part10(bad))
    env.store(_part10(good))
    s = env.session()

    # One instance: refused before the status line.
    res = s.get(_instance_url(env, bad), headers={"Accept": AS_LE})
    assert res.status_code == 406, res.status_code
    # As stored it is still served.
    res = s.get(_instance_url(env, bad),
                headers={"Accept": 'multipart/related; type="application/dicom"'})
    assert len(_parts(res)) == 1

    # Its frames decoded, and its rendering: 406, and the server is still there (GDCM
    # used to abort the process on JPEG 2000 that openjpeg refuses).
    res = s.get(f"{_instance_url(env, bad)}/frames/1",
                headers={"Accept": 'multipart/related; type="application/octet-stream"'})
    assert res.status_code == 406, res.status_code
    res = s.get(f"{_instance_url(env, bad)}/rendered", headers={"Accept": "image/png"})
    assert res.status_code == 406, res.status_code
    assert env.server.proc.poll() is None

    # The series: a complete multipart with the convertible instance only.
    res = s.get(f"{env.url}/studies/{study}/series/{series}", headers={"Accept": AS_LE})
    parts = _parts(res)
    assert len(parts) == 1
    back = dcmread(io.BytesIO(parts[0]))
    assert back.SOPInstanceUID == good.SOPInstanceUID
    assert back.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
    assert np.array_equal(back.pixel_array, good.pixel_array)
    skipped = [e for e in events(env.vault, "dicomweb.retrieve") if e.get("skipped")]
    assert skipped and skipped[-1]["skipped"] == 1
    sop_uids = skipped[-1]["sop_uids"]
    assert isinstance(sop_uids, list) and bad.SOPInstanceUID in sop_uids

    # A series where nothing converts: 406, not an empty 200.
    lone_series = generate_uid()
    lone = _corrupt_j2k(study, lone_series)
    env.store(_part10(lone))
    res = s.get(f"{env.url}/studies/{study}/series/{lone_series}", headers={"Accept": AS_LE})
    assert res.status_code == 406


@pytest.mark.parametrize("name", ["MR_small_bigendian.dcm", "ExplVR_BigEnd.dcm",
                                  "SC_rgb_small_odd_big_endian.dcm"])
def test_every_big_endian_test_file_converts_element_equal(name: str) -> None:
    """In process, over pydicom's Big Endian files: 16-bit OW, 8-bit OB and 8-bit pixel
    data encoded as OW (bytes swapped pairwise, odd length), as Explicit and Implicit VR
    Little Endian, and their frames, equal pydicom's own decoding."""
    from pacsvault.web import wado

    path = get_testdata_file(name)
    assert path is not None
    raw = Path(path).read_bytes()
    original = dcmread(io.BytesIO(raw))
    for target in (ExplicitVRLittleEndian, ImplicitVRLittleEndian):
        back = dcmread(io.BytesIO(wado.encode_as(raw, target)))
        assert back.file_meta.TransferSyntaxUID == target
        for elem in original:
            if elem.tag.element and elem.tag != 0x7FE00010:  # group lengths are not kept
                assert back[elem.tag].value == elem.value, (name, elem.tag)
        assert np.array_equal(back.pixel_array, original.pixel_array), name
    form = wado.FrameForm(wado.OCTET, ExplicitVRLittleEndian, False)
    (frame,) = wado.frames(raw, [1], form)
    # The stored layout (planar configuration kept), little endian, one frame long.
    assert len(frame) == get_expected_length(original), name
    assert frame == bytes(back.PixelData)[:len(frame)], name
