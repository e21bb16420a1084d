"""Lossless transcoding of a stored object for a C-STORE sub-operation (C-GET, C-MOVE).

Why: a receiver with default settings (dcmtk ``storescp``/``getscu``, most workstations)
accepts only uncompressed syntaxes, and nothing accepts retired Explicit VR Big Endian any
more; before this module such objects simply failed to leave (issue 13, defects 1 and 2).

Rules, in order, per instance:

- the receiver accepted a context with the stored (SOP class, syntax): sent as stored,
  byte for byte (Big Endian excepted: it always leaves as little endian);
- otherwise Explicit VR Little Endian, then Implicit VR Little Endian, when accepted: the
  pixel data is *decoded* with the permitted decoders of ``dicomfile.render`` (the same ones
  WADO-RS uses). Nothing is ever re-encoded lossily; a lossy original stays marked lossy;
- otherwise the sub-operation fails (counted, and listed in the Failed SOP Instance UID List).

The stored object is never changed: conversion works on the dataset just read, in memory
(no temporary file holds the plaintext).
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Iterable

import numpy as np
from pydicom import dcmread
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.filewriter import dcmwrite
from pydicom.uid import (
    UID,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
)
from pynetdicom.presentation import PresentationContext

from pacsvault.dicomfile import render

UNCOMPRESSED = (ExplicitVRLittleEndian, ImplicitVRLittleEndian)
_WORD = {"OW": 2, "OL": 4, "OF": 4, "OD": 8, "OV": 8}
_PIXEL_DATA = 0x7FE00010


class TranscodeError(Exception):
    """The object cannot be converted losslessly (no permitted decoder, bad pixels)."""


def can_convert(stored: str) -> bool:
    """Whether an object in ``stored`` can leave decoded (uncompressed little endian)."""
    uid = UID(stored)
    return not uid.is_compressed or bool(render.plugins_for(uid))


def offered(stored_pairs: Iterable[tuple[str, str]]) -> list[tuple[str, str]]:
    """(SOP class, syntax) pairs to propose, one syntax per context, in preference order.

    The stored pairs first (so nothing has to change when the receiver takes them), then
    Explicit and Implicit VR Little Endian for every SOP class, as separate contexts so a
    receiver may accept the stored one and the uncompressed ones independently. Big
    Endian is never proposed: it leaves converted.
    """
    pairs = sorted(set(stored_pairs))
    out: list[tuple[str, str]] = [(c, t) for c, t in pairs if t != ExplicitVRBigEndian]
    classes = sorted({c for c, _ in pairs})
    for syntax in UNCOMPRESSED:
        out += [(c, syntax) for c in classes if (c, syntax) not in out]
    return out


def choose(contexts: Iterable[PresentationContext], sop_class: str, stored: str) -> str | None:
    """The syntax to send in: the stored one if accepted, else an uncompressed one, else
    None. Only contexts in which we act as the Storage SCU count (as pynetdicom checks)."""
    accepted = {str(cx.transfer_syntax[0]) for cx in contexts
                if str(cx.abstract_syntax) == sop_class and cx.as_scu and cx.transfer_syntax}
    if stored in accepted and stored != ExplicitVRBigEndian:
        return stored
    if not can_convert(stored):
        return None
    for syntax in UNCOMPRESSED:
        if syntax in accepted:
            return str(syntax)
    return None


def _swap(value: bytes, width: int) -> bytes:
    usable = len(value) - len(value) % width
    swapped = np.frombuffer(value, dtype=f">u{width}", count=usable // width)
    return swapped.astype(f"<u{width}").tobytes() + value[usable:]


def _swap_words(ds: Dataset, bits_allocated: int | None) -> None:
    """Big → little endian for the values pydicom keeps as raw bytes (OW, OL, OF, OD, OV).

    pydicom re-encodes numbers (US, SS, FL, ...) itself but writes these byte for byte;
    pixel data words are as wide as Bits Allocated (16, 32 or 64 bits; 8-bit data in OW
    is stored as 16-bit words)."""
    for elem in ds:
        if elem.VR == "SQ":
            for item in elem.value:
                _swap_words(item, None)
            continue
        width = _WORD.get(str(elem.VR))
        if not width or not isinstance(elem.value, bytes | bytearray):
            continue
        if elem.tag == _PIXEL_DATA and bits_allocated and bits_allocated > 16:
            width = bits_allocated // 8
        if width > 1:
            ds[elem.tag] = DataElement(elem.tag, elem.VR, _swap(bytes(elem.value), width))


def convert(ds: Dataset, target: str) -> Dataset:
    """A copy of ``ds`` in the uncompressed little endian ``target`` syntax (lossless).

    ``ds`` is the dataset just read from the archive (it is modified; the stored object is
    not). Raises ``TranscodeError`` when no permitted decoder handles the pixel data.
    """
    stored = UID(str(ds.file_meta.TransferSyntaxUID))
    if target not in UNCOMPRESSED:
        raise TranscodeError("only uncompressed little endian targets")
    try:
        if stored.is_compressed:
            render.decompress(ds)
        elif stored == ExplicitVRBigEndian:
            bits = ds.get("BitsAllocated")
            _swap_words(ds, int(bits) if bits is not None else None)
        ds.file_meta.TransferSyntaxUID = UID(target)
        out = io.BytesIO()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            # dcmwrite, not save_as: save_as refuses an endianness change (the words
            # that need it were swapped above)
            dcmwrite(out, ds, enforce_file_format=True)
            out.seek(0)
            return dcmread(out)
    except render.DecodeError as exc:
        raise TranscodeError(str(exc)) from None
    except (ValueError, TypeError, AttributeError, KeyError) as exc:
        raise TranscodeError(type(exc).__name__) from None


__all__ = ["UNCOMPRESSED", "TranscodeError", "can_convert", "choose", "convert", "offered"]
