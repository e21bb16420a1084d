"""A varied test corpus built from files shipped in the pydicom wheel (no downloads).

Each file is re-labelled with a distinctive synthetic patient, so a byte scan of the vault
can prove that no name, ID or birth date is readable at rest. Pixel data, including
encapsulated (compressed) frames, is kept exactly as shipped.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import cast

import numpy as np
from pydicom import dcmread
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    ComputedRadiographyImageStorage,
    CTImageStorage,
    ExplicitVRLittleEndian,
    generate_uid,
)

# source file -> storescu proposal flag for its transfer syntax
SOURCES: dict[str, tuple[str, ...]] = {
    "CT_small.dcm": (),                        # CT, explicit VR little endian
    "MR_small_implicit.dcm": (),               # MR, implicit VR little endian
    "image_dfl.dcm": ("-xd",),                 # deflated explicit VR little endian
    "SC_rgb_jpeg_dcmtk.dcm": ("-xy",),         # JPEG baseline
    "JPEG-lossy.dcm": ("-xx",),                # JPEG extended (12 bit)
    "SC_rgb_jpeg_gdcm.dcm": ("-xs",),          # JPEG lossless SV1
    "MR_small_jpeg_ls_lossless.dcm": ("-xt",),  # JPEG-LS lossless
    "JPEGLSNearLossless_16.dcm": ("-xu",),     # JPEG-LS near-lossless
    "MR_small_jp2klossless.dcm": ("-xv",),     # JPEG 2000 lossless
    "JPEG2000.dcm": ("-xw",),                  # JPEG 2000
    "MR_small_RLE.dcm": ("-xr",),              # RLE lossless
    "examples_ybr_color.dcm": ("-xy",),        # US multi-frame, JPEG baseline
}


@dataclass(frozen=True)
class CorpusFile:
    path: Path
    proposal: tuple[str, ...]
    patient_name: str
    patient_id: str
    birth_date: str
    sop_uid: str
    study_uid: str
    transfer_syntax: str


def _label(ds: Dataset, i: int, *, utf8: bool = False) -> tuple[str, str, str]:
    name = f"Zorglub^Hélène{i:02d}" if utf8 else f"Quetzal^Bartholomew{i:02d}"
    pid = f"PVTEST{i:04d}X"
    birth = f"19{31 + i:02d}0{1 + i % 9}1{i % 10}"
    if utf8:
        ds.SpecificCharacterSet = "ISO_IR 192"
    ds.PatientName = name
    ds.PatientID = pid
    ds.PatientBirthDate = birth
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    return name, pid, birth


def _synthetic_cr(path: Path, i: int) -> Dataset:
    """A 16-bit CR (no CR ships in the pydicom wheel)."""
    rng = np.random.default_rng(i)
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = ComputedRadiographyImageStorage
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = ComputedRadiographyImageStorage
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.Modality, ds.StudyDate, ds.StudyTime = "CR", "20240312", "101500"
    ds.SeriesNumber, ds.InstanceNumber = 1, 1
    ds.Rows, ds.Columns = 400, 320
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.PixelData = rng.integers(0, 4096, (400, 320), dtype=np.uint16).tobytes()
    return ds


def synthetic_ct_series(out: Path, count: int, *, seed: int = 7, size: int = 128) -> list[Path]:
    """Many small CT slices of one study, for batch and crash tests."""
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    study, series = generate_uid(), generate_uid()
    paths = []
    for n in range(count):
        ds = Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.SOPClassUID = CTImageStorage
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
        ds.PatientName, ds.PatientID, ds.PatientBirthDate = "Batch^Crash", "PVBATCH01", "19500505"
        ds.Modality, ds.InstanceNumber = "CT", n + 1
        ds.Rows = ds.Columns = size
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.PixelData = rng.integers(-1000, 2000, (size, size), dtype=np.int16).tobytes()
        path = out / f"ct{n:04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def build(out: Path) -> list[CorpusFile]:
    out.mkdir(parents=True, exist_ok=True)
    files: list[CorpusFile] = []
    sources: list[tuple[str | None, tuple[str, ...]]] = [*SOURCES.items(), (None, ())]
    for i, (name, proposal) in enumerate(sources):
        ds = _synthetic_cr(out, i) if name is None else dcmread(cast(str, get_testdata_file(name)))
        pname, pid, birth = _label(ds, i, utf8=(i == 1))
        path = out / f"{i:02d}_{name or 'synthetic_cr.dcm'}"
        ds.save_as(path, enforce_file_format=True)
        files.append(
            CorpusFile(path, proposal, pname, pid, birth, str(ds.SOPInstanceUID),
                       str(ds.StudyInstanceUID), str(ds.file_meta.TransferSyntaxUID))
        )
    return files


def secrets_of(files: list[CorpusFile]) -> list[str]:
    """Patient identifiers that must never be readable at rest or in logs."""
    found: set[str] = set()
    for f in files:
        found.update({f.patient_name, f.patient_id, f.birth_date})
        found.update(part for part in f.patient_name.split("^") if len(part) >= 6)
    return sorted(found)
