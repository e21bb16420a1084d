"""Realistic little series for the browser tests: a knee CT and a JPEG 2000 MR.

Unlike the noise slices of ``corpus.synthetic_ct_series``, these carry the geometry a
viewer needs to stack slices (position, orientation, spacing) and a phantom whose shape
changes from slice to slice, so "the picture changed when I scrolled" is meaningful.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    UID,
    CTImageStorage,
    ExplicitVRLittleEndian,
    JPEG2000Lossless,
    MRImageStorage,
    generate_uid,
)


@dataclass(frozen=True)
class Series:
    files: list[Path]
    study_uid: str
    patient_name: str
    proposal: tuple[str, ...]  # storescu flags for the transfer syntax


def _phantom(size: int, index: int, count: int, *, background: int, body: int,
             rim: int, lesion: int) -> np.ndarray:
    y, x = np.mgrid[0:size, 0:size].astype(np.float32)
    c = (size - 1) / 2
    r = np.hypot(x - c, (y - c) * 1.25)
    image = np.full((size, size), background, np.float32)
    image[r < size * 0.42] = body
    image[(r >= size * 0.30) & (r < size * 0.34)] = rim
    # A lesion that grows then shrinks through the stack.
    radius = size * 0.12 * np.sin(np.pi * (index + 0.5) / count)
    image[np.hypot(x - c * 1.2, y - c * 0.8) < radius] = lesion
    image += np.random.default_rng(index).normal(0, 8, (size, size))
    return image


def _base(sop_class: str, modality: str, study: str, series: str, patient: tuple[str, str],
          index: int, size: int, description: str) -> Dataset:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = UID(sop_class)
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SpecificCharacterSet = "ISO_IR 192"
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
    ds.PatientName, ds.PatientID = patient
    ds.PatientBirthDate, ds.PatientSex = "19610412", "F"
    ds.StudyDate = ds.SeriesDate = dt.date.today().strftime("%Y%m%d")
    ds.StudyTime = ds.SeriesTime = "083000"
    ds.AccessionNumber = f"ACC{study[-6:]}"
    ds.StudyDescription, ds.SeriesDescription = description, f"{description} {modality}"
    ds.StudyID, ds.SeriesNumber, ds.InstanceNumber = "1", 1, index + 1
    ds.Modality = modality
    ds.FrameOfReferenceUID = generate_uid(entropy_srcs=[study])
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    ds.PixelSpacing = [0.8, 0.8]
    ds.SliceThickness = 3.0
    ds.ImagePositionPatient = [-size * 0.4, -size * 0.4, index * 3.0]
    ds.SliceLocation = index * 3.0
    ds.Rows = ds.Columns = size
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    return ds


def knee_ct(out: Path, count: int = 16, size: int = 256) -> Series:
    out.mkdir(parents=True, exist_ok=True)
    study, series = generate_uid(), generate_uid()
    name = "Lefebvre^Camille"
    files = []
    for i in range(count):
        ds = _base(CTImageStorage, "CT", study, series, (name, "PVKNEE001"), i, size,
                   "GENOU DROIT")
        ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = -1024, 1, "HU"
        ds.WindowCenter, ds.WindowWidth = 300, 1500
        hu = _phantom(size, i, count, background=-1000, body=40, rim=900, lesion=180)
        ds.PixelData = np.clip(hu + 1024, 0, 4095).astype(np.uint16).tobytes()
        path = out / f"ct{i:03d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        files.append(path)
    return Series(files, study, name, ())


def j2k_mr(out: Path, count: int = 10, size: int = 128) -> Series:
    """An MR series compressed with JPEG 2000 lossless (pydicom + openjpeg)."""
    out.mkdir(parents=True, exist_ok=True)
    study, series = generate_uid(), generate_uid()
    name = "Moreau^Théo"
    files = []
    for i in range(count):
        ds = _base(MRImageStorage, "MR", study, series, (name, "PVKNEE002"), i, size,
                   "IRM GENOU")
        ds.WindowCenter, ds.WindowWidth = 700, 1400
        image = _phantom(size, i, count, background=20, body=600, rim=1400, lesion=1100)
        ds.PixelData = np.clip(image, 0, 4095).astype(np.uint16).tobytes()
        ds.compress(JPEG2000Lossless)
        path = out / f"mr{i:03d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        files.append(path)
    return Series(files, study, name, ("-xv",))
