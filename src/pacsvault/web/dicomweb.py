"""DICOMweb (PS3.18) under /dicom-web: QIDO-RS, WADO-RS, STOW-RS. Being built."""

from __future__ import annotations

from fastapi import APIRouter

router = APIRouter(prefix="/dicom-web")
