"""Deterministic synthetic dataset: CT series, CR images and many small MR studies.

Every run with the same size writes byte-identical files (fixed seeds, UIDs from a fixed
arc, no clock). Patients are synthetic (French-looking surnames from 200 equally frequent
three-letter prefixes, as in ``bench/query.py``), so ``DUP*`` names 0.5 % of the patients.
A ``manifest.json`` beside the files lists every instance (UIDs, sizes, date, patient
number) so that workloads can check what comes back without opening the files again.
"""

from __future__ import annotations

import datetime as dt
import json
import random
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    UID,
    ComputedRadiographyImageStorage,
    CTImageStorage,
    ExplicitVRLittleEndian,
    MRImageStorage,
)

UID_ROOT = "1.2.826.0.1.3680043.8.498.4243."  # pydicom's root + a bench arc
SEED = 20240613
DATE0 = dt.date(2020, 1, 1)
DAYS = (dt.date(2025, 1, 1) - DATE0).days
HEADS = ["Du", "Le", "Ma", "Be", "Ro", "Fa", "Gi", "Mo", "Ch", "Bo",
         "La", "Pe", "Ri", "Va", "De", "Ca", "Th", "Ga", "No", "Se"]
THIRD = "prnlcmsvtb"
TAILS = ["ONT", "UIS", "ARD", "IER", "EAU", "OT", "IN", "EL", "AS", "AND", "ET", "OU"]
GIVEN = ["Jean", "Marie", "Pierre", "Michel", "Nathalie", "Philippe", "Isabelle", "Alain",
         "Sylvie", "Nicolas", "Sophie", "Laurent", "Camille", "Thierry", "Julien", "Léa"]
WEEK = ("20230306", "20230312")
PATIENTS_PER_STUDY = 0.3


@dataclass(frozen=True)
class Size:
    """How much of each kind to generate."""

    name: str
    ct_series: int  # one CT study of this many series
    ct_slices: int  # slices per series (512x512)
    cr_images: int  # 2048x2500, two per study
    mr_studies: int  # 64x64, mr_per_study instances each
    mr_per_study: int
    index_studies: int  # total studies in the "large index" phase (filler: 1 MR each)
    date_range: tuple[str, str] = WEEK  # the date-range query (one week: ~0.4 % of studies)


SIZES = {
    "small": Size("small", 1, 8, 1, 30, 2, 200, ("20220101", "20231231")),
    "medium": Size("medium", 1, 200, 10, 150, 3, 10_000),
    "full": Size("full", 2, 300, 60, 400, 4, 10_000),
}


@dataclass
class Item:
    """One generated instance (no patient data beyond the synthetic study facts)."""

    path: str
    kind: str  # CT, CR, MR, FILL
    study: str
    series: str
    sop: str
    bytes: int
    patient: int
    date: str


@dataclass
class Corpus:
    root: Path
    main: list[Item]  # the dataset proper (ingested in every ingest cell)
    filler: list[Item]  # extra one-instance studies for the large-index phase
    patient_names: list[str]
    date_range: tuple[str, str]

    @property
    def main_bytes(self) -> int:
        return sum(i.bytes for i in self.main)

    def files(self, items: list[Item]) -> list[Path]:
        return [self.root / i.path for i in items]

    def of_kind(self, kind: str) -> list[Item]:
        return [i for i in self.main if i.kind == kind]

    def studies(self, items: list[Item]) -> dict[str, Item]:
        """First instance of each study."""
        out: dict[str, Item] = {}
        for i in items:
            out.setdefault(i.study, i)
        return out

    @property
    def name_prefix(self) -> str:
        """Three letters (one of 200 prefixes, 0.5 % of the patients, at least one)."""
        return self.patient_names[0][:3]

    def filters(self) -> dict[str, dict[str, str]]:
        lo, hi = self.date_range
        return {"name prefix": {"PatientName": self.name_prefix + "*"},
                "date range": {"StudyDate": f"{lo}-{hi}"}}

    def expected_matches(self, items: list[Item], name: bool, week: bool) -> int:
        """Studies the filters must return (the checks compare both servers to this)."""
        n = 0
        lo, hi = self.date_range
        for it in self.studies(items).values():
            if name and not self.patient_names[it.patient].startswith(self.name_prefix):
                continue
            if week and not lo <= it.date <= hi:
                continue
            n += 1
        return n


def uid(*parts: object) -> str:
    return UID_ROOT + ".".join(str(p) for p in parts)


def _names(n: int, rng: random.Random) -> list[str]:
    order = list(range(len(HEADS) * len(THIRD)))
    rng.shuffle(order)
    out = []
    for p in range(n):
        prefix = order[p % len(order)]
        head, third = HEADS[prefix // len(THIRD)], THIRD[prefix % len(THIRD)]
        out.append(f"{(head + third).upper()}{rng.choice(TAILS)}^{rng.choice(GIVEN)}")
    return out


def _base(sop_class: str, sop: str, study: str, series: str, patient: int, name: str,
          date: str, modality: str, rows: int, cols: int, pixels: bytes) -> Dataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = UID(sop_class), UID(sop)
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SpecificCharacterSet = "ISO_IR 192"
    ds.SOPClassUID, ds.SOPInstanceUID = sop_class, sop
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
    ds.PatientName, ds.PatientID = name, f"PVB{patient:07d}"
    ds.PatientBirthDate, ds.PatientSex = "19700101", "MF"[patient % 2]
    ds.StudyDate, ds.StudyTime, ds.SeriesDate = date, "101500", date
    ds.AccessionNumber, ds.StudyID = f"A{patient:07d}", "1"
    ds.ReferringPhysicianName, ds.StudyDescription = "", f"BENCH {modality}"
    ds.Modality, ds.Manufacturer = modality, "pacsvault-bench"
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.Rows, ds.Columns = rows, cols
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.PixelData = pixels
    return ds


def _disc(rows: int, cols: int) -> np.ndarray:
    yy, xx = np.mgrid[-rows // 2 : rows - rows // 2, -cols // 2 : cols - cols // 2]
    r2 = xx.astype(np.int64) ** 2 + yy.astype(np.int64) ** 2
    rad = min(rows, cols) * 0.43
    return np.where(r2 < rad**2, 1024, 0) + np.where(r2 < (rad / 7) ** 2, 700, 0)


def _pixels(base: np.ndarray, rng: np.random.Generator, sigma: float) -> bytes:
    noise = rng.normal(0.0, sigma, size=base.shape).astype(np.float32)
    return bytes(np.clip(base + noise, 0, 4095).astype("<u2").tobytes())


def _write(root: Path, rel: str, ds: Dataset) -> int:
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path.stat().st_size


def generate(root: Path, size: Size) -> Corpus:
    """Write the corpus under ``root`` (reused as is when its manifest matches ``size``)."""
    manifest = root / "manifest.json"
    if manifest.exists():
        data = json.loads(manifest.read_text())
        if data.get("size") == json.loads(json.dumps(asdict(size))):
            return Corpus(root, [Item(**i) for i in data["main"]],
                          [Item(**i) for i in data["filler"]], data["names"], size.date_range)
    rng = random.Random(SEED)
    nrng = np.random.default_rng(SEED)
    n_cr_studies = (size.cr_images + 1) // 2
    n_main_studies = 1 + n_cr_studies + size.mr_studies
    n_studies = max(size.index_studies, n_main_studies)
    names = _names(max(1, round(n_studies * PATIENTS_PER_STUDY)), rng)
    study_patient = [s if s < len(names) else rng.randrange(len(names)) for s in range(n_studies)]
    study_date = [(DATE0 + dt.timedelta(days=rng.randrange(DAYS))).strftime("%Y%m%d")
                  for _ in range(n_studies)]
    main: list[Item] = []
    filler: list[Item] = []

    def add(out: list[Item], kind: str, s: int, se: int, n: int, sop_class: str, modality: str,
            rows: int, cols: int, pixels: bytes, extra: dict[str, object]) -> None:
        study, series, sop = uid(1, s + 1), uid(2, s + 1, se + 1), uid(3, s + 1, se + 1, n + 1)
        p = study_patient[s]
        ds = _base(sop_class, sop, study, series, p, names[p], study_date[s], modality,
                   rows, cols, pixels)
        ds.SeriesNumber, ds.InstanceNumber = se + 1, n + 1
        for k, v in extra.items():
            setattr(ds, k, v)
        rel = f"{kind}/{s + 1:05d}/{se + 1:02d}/{n + 1:04d}.dcm"
        out.append(Item(rel, kind, study, series, sop, _write(root, rel, ds), p, study_date[s]))

    ct_base = _disc(512, 512)
    for se in range(size.ct_series):
        for n in range(size.ct_slices):
            z = -1.25 * n - 1000.0 * se
            add(main, "CT", 0, se, n, CTImageStorage, "CT", 512, 512,
                _pixels(ct_base, nrng, 20.0),
                {"ImagePositionPatient": [-250.0, -250.0, z], "SliceThickness": 1.25,
                 "ImageOrientationPatient": [1, 0, 0, 0, 1, 0], "PixelSpacing": [0.9765625] * 2,
                 "RescaleIntercept": -1024, "RescaleSlope": 1, "FrameOfReferenceUID": uid(4, 1)})
    cr_base = _disc(2500, 2048)
    for k in range(size.cr_images):
        add(main, "CR", 1 + k // 2, 0, k % 2, ComputedRadiographyImageStorage, "CR", 2500, 2048,
            _pixels(cr_base, nrng, 30.0), {"ImagerPixelSpacing": [0.15, 0.15]})
    mr_base = _disc(64, 64)
    first_mr = 1 + n_cr_studies
    for s in range(first_mr, first_mr + size.mr_studies):
        for n in range(size.mr_per_study):
            add(main, "MR", s, 0, n, MRImageStorage, "MR", 64, 64, _pixels(mr_base, nrng, 15.0),
                {"PixelSpacing": [3.0, 3.0]})
    for s in range(n_main_studies, n_studies):
        add(filler, "FILL", s, 0, 0, MRImageStorage, "MR", 64, 64, _pixels(mr_base, nrng, 15.0),
            {"PixelSpacing": [3.0, 3.0]})
    manifest.write_text(json.dumps({
        "size": asdict(size), "names": names,
        "main": [asdict(i) for i in main], "filler": [asdict(i) for i in filler]}))
    return Corpus(root, main, filler, names, size.date_range)
